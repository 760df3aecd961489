"""The functions registered with Globus Compute: one per mode, from the registry of modes.

Each takes a JSON request string and the caller's access token for the TPM resource server,
runs the gateway pipeline in the endpoint's worker and returns a JSON string: a result with
usage and receipt, or an error record with a code. Each is defined at the top of its mode's
module and registered as source text (``PureSourceTextInspect``), so its body imports what it
needs; arguments and results travel as JSON only.
"""

from __future__ import annotations

from collections.abc import Callable

from tpm_faas.modes import MODES

#: The function of every mode, by mode name (its registered name too).
MODE_FUNCTIONS: dict[str, Callable[..., str]] = {m.name: m.function for m in MODES.values()}


def __getattr__(name: str) -> Callable[..., str]:
    """``tpm_faas.functions.query`` and so on: each mode's function by its name."""
    try:
        return MODE_FUNCTIONS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
