"""The gateway's layers in order, each refusing with its own layer and code, nothing charged.

Real components (``_gateway.dead_shard_gateway``): an admitted request fails at the shard
and must be voided.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _gateway import dead_shard_gateway

from tpm_faas.config import POLICIES
from tpm_faas.errors import TPMError
from tpm_faas.gateway.pipeline import Gateway


@pytest.fixture
def site(tmp_path: Path) -> tuple[Gateway, dict[str, str], Path]:
    policy = tmp_path / "policy.yaml"
    text = (POLICIES / "local-dev.yaml").read_text()
    text = text.replace("requests_per_min: 6000", "requests_per_min: 3")
    text = text.replace("tokens_per_min: 10000000", "tokens_per_min: 400")
    policy.write_text(text)
    gw, tokens = dead_shard_gateway(tmp_path, policy)
    return gw, tokens, policy


def _refusal(gw: Gateway, token: str | None, body: dict[str, object]) -> dict[str, str]:
    with pytest.raises(TPMError) as info:
        gw.handle("query", json.dumps({"model": "demo-tpm@1", **body}), token)
    return info.value.to_record()


def test_each_layer_refuses_with_its_name_and_charges_nothing(
    site: tuple[Gateway, dict[str, str], Path],
) -> None:
    gw, tok, _ = site
    q = {"prompt": "And God said", "max_new_tokens": 8}
    cases = [
        (None, q, "auth", "token_missing"),
        (tok["dev-expired"], q, "auth", "token_expired"),
        ("tpmdev-nobody", q, "auth", "token_invalid"),
        (tok["dev"], {**q, "max_new_tokens": 100000}, "request", "bad_request"),
        (tok["dev"], {**q, "max_new_tokens": 300}, "request", "limit_exceeded"),
        (tok["broke"], q, "ledger", "insufficient_su"),
        (tok["dev"], q, "shard", "shard_timeout"),  # admitted, then the shard fails: voided
        (tok["dev"], q, "shard", "shard_timeout"),
        # 2 x (13 + 256) tokens reserved: over 400 per minute (and takes no request either)
        (
            tok["dev"],
            {"prompts": ["And God said"] * 2, "max_new_tokens": 256},
            "rate_limit",
            "rate_limited",
        ),
        (tok["dev"], q, "shard", "shard_timeout"),  # the third request this minute
        (tok["dev"], q, "rate_limit", "rate_limited"),  # 3 requests per minute
    ]
    before = {p: gw.ledger.balance(p) for p in ("demo", "broke")}
    for token, body, layer, code in cases:
        rec = _refusal(gw, token, body)
        assert (rec["layer"], rec["code"]) == (layer, code), (body, rec)
    assert "per minute" in _refusal(gw, tok["dev"], q)["message"]
    assert gw.ledger.open_holds() == []
    assert {p: gw.ledger.balance(p) for p in ("demo", "broke")} == before
    assert gw.ledger.reconcile().ok


def test_max_concurrent_counts_requests_in_flight(
    site: tuple[Gateway, dict[str, str], Path],
) -> None:
    gw, tok, policy = site
    policy.write_text(policy.read_text().replace("max_concurrent: 64", "max_concurrent: 1"))
    gw.ledger.hold("in-flight", "demo", 10, ttl_s=60, identity="dev@localhost")
    rec = _refusal(gw, tok["dev"], {"prompt": "x", "max_new_tokens": 1})
    assert rec["code"] == "rate_limited" and "1 at once" in rec["message"]
    gw.ledger.void("in-flight")
    assert _refusal(gw, tok["dev"], {"prompt": "x", "max_new_tokens": 1})["layer"] == "shard"
