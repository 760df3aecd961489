"""The site policy: default deny, group matching, limits and SU pricing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm_faas.config import POLICIES
from tpm_faas.errors import ConfigError, LimitExceeded, PolicyDenied
from tpm_faas.policy import Policy, Usage, check_limit

LOCAL = POLICIES / "local-dev.yaml"


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


# -- matching by Globus group and project; examples; schema; reload; the CLI ---------------
GROUPS_POLICY = b"""
models: {m@1: {per_request: 1}}
projects:
  CHM-1: {members: [ada@uni.edu], globus_groups: [gg-chem]}
groups:
  - {name: by-group, match: {globus_groups: [gg-staff]}, modes: [query], models: [m@1],
     allocation: staff}
  - {name: by-project, match: {projects: [CHM-1]}, modes: [query], models: [m@1],
     allocation: CHM-1}
"""


def test_match_by_globus_group_and_by_project_membership() -> None:
    from tpm_faas.policy import Caller

    p = Policy.parse(GROUPS_POLICY)
    assert (
        p.decide(
            Caller("id-1", "x@y", groups=frozenset({"gg-staff"})), mode="query", model="m@1"
        ).project
        == "staff"
    )
    assert p.decide(Caller("id-2", "ada@uni.edu"), mode="query", model="m@1").project == "CHM-1"
    assert (
        p.decide(
            Caller("id-3", "bob@z", groups=frozenset({"gg-chem"})), mode="query", model="m@1"
        ).group
        == "by-project"
    )
    # A linked identity counts: the identity set is part of who the caller is.
    linked = Caller("id-4", "b@z", identity_set=frozenset({"id-4", "ada@uni.edu"}))
    assert p.decide(linked, mode="query", model="m@1").group == "by-project"
    with pytest.raises(PolicyDenied, match="no group"):
        p.decide(Caller("id-5", "eve@uni.edu"), mode="query", model="m@1")


@pytest.mark.parametrize("name", ["local-dev.yaml", "provider-site.yaml", "byo.yaml"])
def test_example_policies_are_valid(name: str) -> None:
    p = Policy.load(POLICIES / name)
    assert p.data.default == "deny" and p.data.groups


def test_published_schema_is_current() -> None:
    from tpm_faas.policy import json_schema

    assert (POLICIES / "schema.json").read_text() == json_schema()


def test_reload_swaps_atomically_and_keeps_the_old_policy_if_invalid(tmp_path: Path) -> None:
    import os

    from tpm_faas.policy import PolicyStore

    f = tmp_path / "p.yaml"
    f.write_text(LOCAL.read_text())
    store = PolicyStore(f)
    first = store.current()
    assert store.current() is first  # unchanged file: no reparse
    f.write_text(LOCAL.read_text().replace("max_new_tokens: 64", "max_new_tokens: 32"))
    os.utime(f, ns=(1, 1))
    second = store.current()
    assert second is not first and second.sha256 != first.sha256
    assert (
        second.decide(
            "reader@localhost", "reader@localhost", "query", "demo-tpm@1"
        ).limits.max_new_tokens
        == 32
    )
    f.write_text("groups: [oops")
    os.utime(f, ns=(2, 2))
    assert store.current() is second  # invalid: the old policy stays


def test_policy_check_command_names_the_bad_key(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tpm_faas.cli import main

    ok = CliRunner().invoke(main, ["policy", "check", str(LOCAL)])
    assert ok.exit_code == 0 and "valid (sha256" in ok.output
    bad = tmp_path / "p.yaml"
    bad.write_text(LOCAL.read_text().replace("write: false", "writes: false"))
    out = CliRunner().invoke(main, ["policy", "check", str(bad)])
    assert out.exit_code != 0 and "groups.1.limits.writes" in out.output


def test_policy_explain_command(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from tpm_faas.cli import main

    req = tmp_path / "r.json"
    req.write_text(
        json.dumps(
            {
                "prompt": "And God",
                "ops": [
                    {
                        "op": "add",
                        "site": "embed",
                        "vector": {
                            "dtype": "float32",
                            "shape": [256],
                            "data": "AAAA" * 341 + "AA==",
                        },
                    }
                ],
            }
        )
    )
    out = CliRunner().invoke(
        main,
        [
            "policy",
            "explain",
            str(LOCAL),
            "--identity",
            "dev@localhost",
            "--mode",
            "intervene",
            "--request",
            str(req),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "ADMIT as group developers" in out.output and "hold" in out.output
    denied = CliRunner().invoke(
        main,
        [
            "policy",
            "explain",
            str(LOCAL),
            "--identity",
            "reader@localhost",
            "--mode",
            "intervene",
            "--request",
            str(req),
        ],
    )
    assert denied.exit_code != 0 and "not allowed" in denied.output
    stranger = CliRunner().invoke(
        main, ["policy", "explain", str(LOCAL), "--identity", "eve@x", "--mode", "query"]
    )
    assert stranger.exit_code != 0 and "no group" in stranger.output
