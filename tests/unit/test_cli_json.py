"""``--json`` on policy check/explain and results prune: machine-readable, same facts as text."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.config import POLICIES

LOCAL = POLICIES / "local-dev.yaml"


def test_policy_check_json() -> None:
    r = CliRunner().invoke(main, ["policy", "check", str(LOCAL), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["valid"] and len(d["sha256"]) == 64
    assert {g["name"] for g in d["groups"]} >= {"developers"}
    assert "demo-tpm@1" in d["models"]


def test_policy_explain_json_admits_and_denies() -> None:
    r = CliRunner().invoke(
        main,
        ["policy", "explain", str(LOCAL), "--identity", "dev@localhost", "--mode", "query",
         "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["admit"] and d["decision"]["group"] == "developers" and d["denied"] is None
    assert any(g["group"] == "developers" and g["allows"] for g in d["groups"])
    denied = CliRunner().invoke(
        main,
        ["policy", "explain", str(LOCAL), "--identity", "eve@x", "--mode", "query", "--json"],
    )
    assert denied.exit_code == 4
    doc = denied.output[: denied.output.rindex("}") + 1]
    d = json.loads(doc)
    assert not d["admit"] and "no group" in d["denied"]
    assert not any(g["matches"] for g in d["groups"])


def test_results_prune_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPM_FAAS_HOME", str(tmp_path))
    where = tmp_path / "results"
    where.mkdir()
    old = where / "old.safetensors"
    old.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - 9 * 86400,) * 2)
    (where / "new.safetensors").write_bytes(b"y")
    r = CliRunner().invoke(main, ["results", "prune", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {
        "directory": str(where),
        "dry_run": True,
        "older_than_s": 7 * 86400.0,
        "files": 1,
        "bytes": 100,
        "kept": 1,
        "skipped": 0,
    }
    assert old.exists()
