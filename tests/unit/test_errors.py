"""The error tree: codes survive the trip across the Compute boundary as plain records."""

from __future__ import annotations

from tpm_faas.errors import LimitExceeded, RemoteError, ShardGroupError, TPMError


def test_record_round_trip_keeps_code_type_and_request_id() -> None:
    record = LimitExceeded("max_new_tokens is 9; the limit is 8").to_record("req-1")
    assert record == {
        "type": "LimitExceeded",
        "code": "limit_exceeded",
        "layer": "request",
        "message": "max_new_tokens is 9; the limit is 8",
        "request_id": "req-1",
    }
    err = RemoteError.from_record(record)
    assert err.code == err.error_code == "limit_exceeded"
    assert err.remote_type == "LimitExceeded" and err.request_id == "req-1"
    assert err.remote_layer == "request"
    assert str(err) == "[limit_exceeded] max_new_tokens is 9; the limit is 8"


def test_instance_code_overrides_class_default() -> None:
    assert ShardGroupError("x").code == "shard_unavailable"
    assert ShardGroupError("x", code="shard_timeout").code == "shard_timeout"
    assert TPMError("x").code == "internal" and ShardGroupError.code == "shard_unavailable"
    assert isinstance(LimitExceeded("x"), ValueError)


def test_every_refusal_names_its_layer() -> None:
    from tpm_faas.errors import (
        InsufficientFunds,
        PolicyDenied,
        RateLimited,
        ScopeMissing,
        TensorError,
    )

    layers = {
        TensorError: "request",
        ScopeMissing: "auth",
        PolicyDenied: "policy",
        RateLimited: "rate_limit",
        InsufficientFunds: "ledger",
        ShardGroupError: "shard",
    }
    for cls, layer in layers.items():
        assert cls("x").to_record()["layer"] == layer, cls


def _drawn_tree() -> list[tuple[str, str | None, tuple[str, ...], str, int | None]]:
    """The tree in ``tpm_faas.errors``' docstring: (name, parent, drawn bases, code, exit)."""
    import re

    from tpm_faas import errors

    doc = errors.__doc__ or ""
    lines = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    row = re.compile(
        r"^(?P<indent>[ │├└─]*?)(?P<name>[A-Z]\w*)(?:\((?P<bases>[^)]*)\))?\s+"
        r"(?P<code>\([^)]*\)|[a-z_]+)(?:\s+(?P<exit>\d+))?$"
    )
    drawn = []
    stack: list[tuple[int, str]] = []  # (depth, name) of the open ancestors
    for line in lines[1:]:  # the first line is the heading (TPMError code exit)
        m = row.match(line.strip("\n")[4:])
        assert m, f"cannot read the drawing's line {line!r}"
        depth = len(m["indent"]) // 4
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else "TPMError"
        bases = tuple(b.strip() for b in m["bases"].split(",")) if m["bases"] else ()
        exit_code = int(m["exit"]) if m["exit"] else None
        drawn.append((m["name"], parent, bases, m["code"], exit_code))
        stack.append((depth, m["name"]))
    return drawn


def test_the_drawn_tree_matches_the_classes() -> None:
    from tpm_faas import errors

    drawn = _drawn_tree()
    heading = (errors.__doc__ or "").split("::\n\n", 1)[1].splitlines()[0].split()
    assert heading == ["TPMError", "code", "exit"]
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.TPMError) and cls is not errors.TPMError
    }
    assert sorted(n for n, *_ in drawn) == sorted(classes), "drawn and defined classes differ"
    for name, parent, bases, code, exit_code in drawn:
        cls = classes[name]
        own_bases = tuple(b.__name__ for b in cls.__bases__)
        assert own_bases == (bases or (parent,)), f"{name}: bases {own_bases}, drawn {bases}"
        assert own_bases[0] == parent, f"{name} is drawn under {parent}"
        if code.startswith("("):  # no code of its own (RemoteError carries the remote one)
            assert "code" not in vars(cls), name
        else:
            assert vars(cls).get("code") == code, f"{name}: code {cls.code!r}, drawn {code!r}"
        expected_exit = exit_code if exit_code is not None else cls.__mro__[1].exit_code
        if exit_code is None:
            assert "exit_code" not in vars(cls), f"{name} sets an exit code the drawing lacks"
        assert cls.exit_code == expected_exit, f"{name}: exit {cls.exit_code}, drawn {exit_code}"


def test_the_tree_reader_reads_what_is_drawn() -> None:
    """The reader itself (so the test above can fail): depth, bases and codes come through."""
    rows = {name: rest for name, *rest in _drawn_tree()}
    assert rows["RateLimited"] == ["LimitExceeded", (), "rate_limited", None]
    assert rows["ShardTimeout"] == [
        "ShardGroupError",
        ("ShardGroupError", "TimeoutError"),
        "shard_timeout",
        None,
    ]
    assert rows["PolicyDenied"] == ["TPMError", ("TPMError", "PermissionError"), "policy_denied", 4]
    assert rows["RemoteError"][2:] == ["(the remote code)", 8]
