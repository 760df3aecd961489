"""``tpm-faas models commit/log/diff/verify/export/gc`` on tiny checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

pytest.importorskip("zstandard")

from _versions import file_hashes, tiny_checkpoint, tiny_perturb, tiny_tensors

from tpm_faas.cli import main
from tpm_faas.config import POLICIES
from tpm_faas.gateway.ledger import Ledger


def _run(*args: str, code: int = 0) -> Result:
    r = CliRunner().invoke(main, ["models", *args])
    assert r.exit_code == code, r.output
    return r


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home, a ledger, a policy pinning o@1, and the store in TPM_FAAS_VERSION_STORE."""
    monkeypatch.setenv("TPM_FAAS_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("TPM_FAAS_LEDGER", f"sqlite:///{tmp_path / 'home' / 'ledger.sqlite'}")
    policy = yaml.safe_load((POLICIES / "local-dev.yaml").read_text())
    policy["groups"][0]["models"] += ["o@1", "m@*"]
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    monkeypatch.setenv("TPM_FAAS_POLICY", str(tmp_path / "policy.yaml"))
    monkeypatch.setenv("TPM_FAAS_VERSION_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def test_commit_log_diff_verify_export(site: Path, tmp_path: Path) -> None:
    t1 = tiny_tensors()
    a = tiny_checkpoint(tmp_path / "a", t1)
    b = tiny_checkpoint(tmp_path / "b", tiny_perturb(t1, 1))
    out = _run("commit", str(a), "m@1").output
    assert "committed m@1" in out and "keyframe" in out and "manifest    sha256" in out
    doc = json.loads(_run("commit", str(b), "m@2", "--parent", "m@1", "--json").output)
    assert (doc["tensors"], doc["changed"], doc["unchanged"], doc["chain"]) == (6, 2, 4, 1)
    assert sum(doc["encodings"].values()) == 2 and set(doc["encodings"]) <= {"xor", "step"}
    assert doc["stored_bytes"] < doc["full_bytes"] and len(doc["manifest_sha256"]) == 64

    table = _run("log", "m").output.splitlines()
    assert table[0].split()[:3] == ["VERSION", "PARENT", "COMMITTED"]
    assert table[1].split()[:2] == ["1", "-"] and "keyframe" in table[1]
    assert table[2].split()[:2] == ["2", "m@1"] and "1 delta deep" in table[2]
    entries = json.loads(_run("log", "m", "--json").output)
    assert [e["chain"] for e in entries] == [0, 1]
    assert entries[1]["manifest_sha256"] == doc["manifest_sha256"]

    diff = _run("diff", "m@1", "m@2").output
    assert "layers.0.q.weight" in diff and "norm.weight" in diff and "embed.weight" not in diff
    assert "m@1 -> m@2: 2 of 6 tensors changed" in diff
    d = json.loads(_run("diff", "m@1", "m@2", "--json").output)
    assert {t["name"] for t in d["changed"]} == {"layers.0.q.weight", "norm.weight"}
    assert d["files_changed"] == ["model.safetensors"]

    assert _run("verify", "m@2").output.startswith("ok m@2")
    assert json.loads(_run("verify", "m@2", "--json").output)["ok"] is True
    _run("export", "m@2", str(tmp_path / "out"), "--workers", "2")
    assert file_hashes(tmp_path / "out") == file_hashes(b)


def test_a_flipped_byte_is_named_and_refused(site: Path, tmp_path: Path) -> None:
    a = tiny_checkpoint(tmp_path / "a", tiny_tensors())
    _run("commit", str(a), "m@1")
    obj = json.loads((site / "m" / "1" / "manifest.json").read_text())["files"]["config.json"]
    sha = obj["object"]
    path = site / "objects" / sha[:2] / sha
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    r = _run("verify", "m@1", code=7)
    assert sha in r.output and "corrupted" in r.output and "version_error" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = _run("verify", "m@1", "--json", code=7)
    assert sha in r.output and '"ok": false' in r.output
    r = _run("export", "m@1", str(tmp_path / "out"), code=7)
    assert sha in r.output and not (tmp_path / "out" / "config.json").exists()


def test_gc_keeps_charged_pinned_newest_and_bases(site: Path, tmp_path: Path) -> None:
    t = tiny_tensors()
    for i in range(1, 6):  # keyframes m@1, m@3, m@5; m@2 and m@4 deltas on the one before
        src = tiny_checkpoint(tmp_path / f"m{i}", t)
        parent = ["--parent", f"m@{i - 1}"] if i > 1 else []
        _run("commit", str(src), f"m@{i}", *parent, "--keyframe-every", "2")
        t = tiny_perturb(t, i)
    for i in (1, 2):
        _run("commit", str(tiny_checkpoint(tmp_path / f"o{i}", tiny_tensors(10 + i))), f"o@{i}")
    ledger = Ledger(f"sqlite:///{tmp_path / 'home' / 'ledger.sqlite'}")
    ledger.credit("p", 10_000)
    ledger.hold("r1", "p", 100, ttl_s=60, model="m@2")
    ledger.post("r1", 50)
    ledger.hold("r2", "p", 100, ttl_s=60, model="m@3")
    ledger.void("r2")  # never charged: does not keep m@3
    ledger.close()
    objects = {p.name for p in (site / "objects").rglob("*") if p.is_file()}

    dry = json.loads(_run("gc", "--dry-run", "--json").output)
    assert dry["removed"] == ["m@3", "m@4"] and dry["dry_run"]
    assert {p.name for p in (site / "objects").rglob("*") if p.is_file()} == objects
    out = _run("gc").output
    assert "kept m@2: charged in the ledger" in out
    assert "kept m@1: base of m@2" in out
    assert "kept o@1: pinned by the site policy" in out
    assert "kept m@5: newest of m" in out and "kept o@2: newest of o" in out
    assert "removed m@3" in out and "removed m@4" in out
    assert f"freed {dry['objects_freed']} objects" in out and dry["objects_freed"] > 0
    left = {p.name for p in (site / "objects").rglob("*") if p.is_file()}
    assert len(objects - left) == dry["objects_freed"]
    assert _run("log", "m", "--json").output.count('"version"') == 3
    for ref in ("m@1", "m@2", "m@5", "o@1", "o@2"):
        _run("verify", ref)


def test_gc_refuses_without_a_ledger_unless_told(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run("commit", str(tiny_checkpoint(tmp_path / "a", tiny_tensors())), "m@1")
    monkeypatch.setenv("TPM_FAAS_LEDGER", f"sqlite:///{tmp_path / 'no' / 'such' / 'l.sqlite'}")
    r = _run("gc", code=5)
    assert "--no-ledger" in r.output and "cannot read" in r.output
    assert "kept m@1: newest of m" in _run("gc", "--no-ledger").output


def test_store_comes_from_the_option_or_the_environment(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TPM_FAAS_VERSION_STORE")
    r = _run("log", "m", code=7)
    assert "--store" in r.output and "TPM_FAAS_VERSION_STORE" in r.output
    a = tiny_checkpoint(tmp_path / "a", tiny_tensors())
    _run("commit", str(a), "m@1", "--store", str(tmp_path / "other"))
    assert json.loads(_run("log", "m", "--store", str(tmp_path / "other"), "--json").output)
    _run("verify", "m@9", "--store", str(tmp_path / "other"), code=7)
    _run("commit", str(a), "bad ref", "--store", str(tmp_path / "other"), code=7)
