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
