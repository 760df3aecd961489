"""The site policy: default deny, group matching, limits and SU pricing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm_faas.config import SOURCE_POLICIES
from tpm_faas.errors import ConfigError, LimitExceeded, PolicyDenied
from tpm_faas.gateway.policy import Policy, Usage, check_limit

LOCAL = SOURCE_POLICIES / "local-dev.yaml"


def test_local_dev_policy_loads() -> None:
    p = Policy.load(LOCAL)
    assert len(p.sha256) == 64
    d = p.decide("dev@localhost", "dev@localhost", "intervene", "demo-tpm@1")
    assert d.project == "demo" and d.limits.write


def test_default_deny() -> None:
    with pytest.raises(PolicyDenied, match="no group"):
        Policy.load(LOCAL).decide("stranger@x", "stranger@x", "query", "demo-tpm@1")


def test_mode_not_allowed() -> None:
    with pytest.raises(PolicyDenied, match="'embed' mode"):
        Policy.load(LOCAL).decide("reader@localhost", "reader@localhost", "embed", "demo-tpm@1")


def test_model_not_allowed() -> None:
    with pytest.raises(PolicyDenied, match="model other@1"):
        Policy.load(LOCAL).decide("dev@localhost", "dev@localhost", "query", "other@1")


def test_domain_match() -> None:
    text = b"""
models: {m@1: {per_request: 1}}
groups:
  - {name: uni, match: {domains: [uni.edu]}, modes: [query], models: [m@1], allocation: p}
"""
    p = Policy.parse(text)
    assert p.decide("uuid", "alice@uni.edu", "query", "m@1").group == "uni"
    with pytest.raises(PolicyDenied):
        p.decide("uuid", "alice@evil.uni.edu.com", "query", "m@1")


def test_unknown_key_named_with_path(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(LOCAL.read_text().replace("max_new_tokens: 256", "max_new_tokenz: 256"))
    with pytest.raises(ConfigError, match=r"groups\.0\.limits\.max_new_tokenz"):
        Policy.load(bad)


def test_unknown_tier_refused() -> None:
    text = (
        b"models: {m@1: {}}\n"
        b"groups: [{name: g, match: {}, modes: [query], models: [m@1], allocation: p, tier: gold}]"
    )
    with pytest.raises(ConfigError, match="tier"):
        Policy.parse(text)


def test_price_is_exact_integer_micro_su() -> None:
    d = Policy.load(LOCAL).decide("dev@localhost", "dev@localhost", "query", "demo-tpm@1")
    # 0.001 + 10 x 0.00001 + 20 x 0.00004 + 1 GB x 1.0 + 3 x 0.0001 SU
    u = Usage(input_tokens=10, output_tokens=20, bytes_returned=10**9, hooked_sites=3)
    assert d.price_micro(u) == 1000 + 100 + 800 + 1_000_000 + 300
    assert d.price_micro(Usage()) == 1000
    assert d.price_micro(Usage(bytes_returned=1)) == 1001  # rounded up, never down


def test_check_limit() -> None:
    check_limit("x", 3, 3)
    with pytest.raises(LimitExceeded, match="x is 4; the limit for your group is 3"):
        check_limit("x", 4, 3)
