"""Bad input through the whole path: a clear error with a code, nothing charged, and the
shard group keeps serving the next request."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tpm_faas.client import parse_reply
from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite

pytestmark = pytest.mark.integration


def _tensor(shape: list[int], dtype: str = "float32", nbytes: int | None = None) -> dict[str, Any]:
    n = nbytes if nbytes is not None else 4 * int(__import__("math").prod(shape))
    return {"dtype": dtype, "shape": shape, "data": base64.b64encode(b"\1" * n).decode()}


def q(**kw: Any) -> str:
    return json.dumps({"model": "demo-tpm@1", "prompts": ["Hi"], "max_new_tokens": 4, **kw})


def e(**kw: Any) -> str:
    return json.dumps({"model": "demo-tpm@1", **kw})


def i(**kw: Any) -> str:
    return json.dumps({"model": "demo-tpm@1", "prompt": "Hi", **kw})


# (case id, mode, raw request JSON, dev user, expected code, phrase the message must contain)
CASES: list[tuple[str, str, str, str | None, str, str]] = [
    (
        "malformed-json",
        "query",
        '{"model": "demo-tpm@1", "prompts": [',
        "dev",
        "malformed_json",
        "not valid JSON",
    ),
    ("not-an-object", "query", "[1, 2]", "dev", "malformed_json", "JSON object"),
    ("unknown-field", "query", q(temprature=0.5), "dev", "bad_request", "temprature"),
    ("unknown-model", "query", q(model="gpt-9@1"), "dev", "unknown_model", "gpt-9@1"),
    ("prompt-over-limit", "query", q(prompts=["x" * 450]), "dev", "limit_exceeded", "prompts[0]"),
    (
        "max-new-tokens-over-limit",
        "query",
        q(max_new_tokens=257),
        "dev",
        "limit_exceeded",
        "max_new_tokens",
    ),
    (
        "max-new-tokens-out-of-range",
        "query",
        q(max_new_tokens=0),
        "dev",
        "bad_request",
        "max_new_tokens",
    ),
    (
        "tensor-wrong-dtype",
        "embed",
        e(inputs_embeds=_tensor([1, 2, 256], "int64", 4096)),
        "dev",
        "bad_tensor",
        "floating-point",
    ),
    (
        "tensor-wrong-shape",
        "embed",
        e(inputs_embeds=_tensor([1, 2, 100])),
        "dev",
        "bad_tensor",
        "needs 256",
    ),
    (
        "tensor-wrong-size",
        "embed",
        e(inputs_embeds=_tensor([1, 2, 256], nbytes=100)),
        "dev",
        "bad_tensor",
        "base64 characters",
    ),
    (
        "tensor-oversize",
        "embed",
        e(inputs_embeds={"dtype": "float32", "shape": [4096, 4096, 256], "data": "AAAA"}),
        "dev",
        "bad_tensor",
        "limit",
    ),
    (
        "steering-vector-wrong-width",
        "intervene",
        i(ops=[{"op": "add", "site": "blocks.0.hook_resid_post", "vector": _tensor([8])}]),
        "dev",
        "bad_tensor",
        "needs [256]",
    ),
    (
        "layer-out-of-range",
        "intervene",
        i(ops=[{"op": "save", "site": "hook_resid_post", "layers": [9]}]),
        "dev",
        "bad_request",
        "out of range",
    ),
    ("token-missing", "query", q(), None, "token_missing", "no access token"),
    ("token-unknown", "query", q(), "not-a-real-token", "token_invalid", "not active"),
    ("token-expired", "query", q(), "dev-expired", "token_expired", "expired"),
    (
        "scope-missing",
        "embed",
        e(adapter="features-linear", adapter_input=_tensor([1, 16])),
        "dev-query-only",
        "scope_missing",
        "/embed",
    ),
    (
        "mode-not-allowed-by-policy",
        "embed",
        e(adapter="features-linear", adapter_input=_tensor([1, 16])),
        "reader",
        "policy_denied",
        "'embed' mode",
    ),
    (
        "write-not-allowed-by-policy",
        "intervene",
        i(ops=[{"op": "add", "site": "blocks.0.hook_resid_post", "vector": _tensor([256])}]),
        "reader",
        "policy_denied",
        "add",
    ),
    ("insufficient-su", "query", q(), "broke", "insufficient_su", "available"),
]


@pytest.mark.parametrize(
    "case,mode,request_json,user,code,phrase", CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_and_not_charged(
    site: EmbeddedSite,
    case: str,
    mode: str,
    request_json: str,
    user: str | None,
    code: str,
    phrase: str,
) -> None:
    ledger = site.ledger()
    before = {p: ledger.balance(p) for p in ("demo", "readers", "broke")}
    token = None if user is None else site.tokens.get(user, user)
    reply = site.transport.submit(mode, request_json, token).result(timeout=120)
    with pytest.raises(RemoteError) as err:
        parse_reply(reply)
    assert err.value.error_code == code, err.value
    assert phrase in err.value.message, err.value.message
    after = {p: ledger.balance(p) for p in before}
    assert after == before, f"{case}: the ledger changed"
    assert ledger.open_holds() == []
    ledger.close()
    # The shard group keeps serving.
    assert (
        site.client()
        .generate("And", max_new_tokens=2)
        .output["completions"][0]["completion_tokens"]
        == 2
    )


def test_remote_error_carries_request_id(site: EmbeddedSite) -> None:
    with pytest.raises(RemoteError) as err:
        site.client().generate("x" * 450, max_new_tokens=4)
    assert err.value.request_id and err.value.code == "limit_exceeded"


def test_shard_failure_voids_the_hold(site: EmbeddedSite) -> None:
    """A request the shard group fails is not charged: its hold is voided."""
    import threading

    import zmq

    from tpm_faas.registry import GroupEntry, Registry

    # A rank 0 that fails every request, registered in place of the real one.
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def fail_once() -> None:
        ident, _, _body = sock.recv_multipart()
        record = {"type": "ShardGroupError", "code": "shard_unavailable", "message": "rank 1 died"}
        sock.send_multipart([ident, b"", json.dumps({"ok": False, "error": record}).encode()])

    t = threading.Thread(target=fail_once, daemon=True)
    t.start()
    reg = Registry(site.settings.registry_dir)
    real = reg.lookup("demo-tpm@1")
    ledger = site.ledger()
    before = ledger.balance("demo")
    reg.register(GroupEntry(**{**real.__dict__, "address": f"tcp://127.0.0.1:{port}"}))
    try:
        reply = site.transport.submit("query", q(), site.tokens["dev"]).result(timeout=120)
    finally:
        reg.register(real)
        t.join(timeout=10)
        sock.close()
    with pytest.raises(RemoteError) as err:
        parse_reply(reply)
    assert err.value.code == "shard_unavailable" and "rank 1 died" in err.value.message
    assert ledger.balance("demo") == before and ledger.open_holds() == []
    ledger.close()
    assert site.client().generate("And", max_new_tokens=2).text is not None
