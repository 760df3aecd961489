"""Functions shipped to the local endpoint as source text (PureSourceTextInspect).

The worker execs each function's source alone, in an empty namespace: no module globals,
so every import lives inside the body, and annotations name builtins only.
"""


def echo_upper(s: str) -> str:
    """Return ``s`` upper-cased, with the worker's pid (proves it ran elsewhere)."""
    import os

    return f"{s.upper()}|{os.getpid()}"


def boom(s: str) -> str:
    """Always raise, naming the argument."""
    raise ValueError(f"boom: refused {s!r}")


def read_env(name: str) -> str | None:
    """Return an environment variable as the worker sees it."""
    import os

    return os.environ.get(name)


def add(a: int, b: int = 0) -> dict:
    """Return a small JSON document (exercises kwargs and a non-str result)."""
    return {"sum": a + b, "args": [a, b]}


def nap(seconds: float) -> float:
    """Sleep, then return how long."""
    import time

    time.sleep(seconds)
    return seconds
