"""The version store's gc (bases kept, objects swept, crash leftovers, the lock), diff and
parallel decode, on checkpoints written with numpy alone."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zstandard")

from _versions import (
    file_hashes,
    store_objects,
    tiny_checkpoint,
    tiny_perturb,
    tiny_tensors,
)

from tpm_faas.errors import VersionError
from tpm_faas.versions import store

CHANGED = ("layers.0.q.weight", "norm.weight")


def _referenced(root: Path) -> set[str]:
    out: set[str] = set()
    for m in root.glob("*/*/manifest.json"):
        for f in json.loads(m.read_text())["files"].values():
            if f["kind"] == "blob":
                out.add(f["object"])
            else:
                out.add(f["header"])
                out.update(t["object"] for t in f["tensors"])
    return out


def _lineage(tmp_path: Path, n: int, keyframe_every: int = 2) -> tuple[Path, list[Path]]:
    """m@1..m@n, each changing the same tensors, keyframes every ``keyframe_every``."""
    root, srcs, t = tmp_path / "store", [], tiny_tensors()
    for i in range(1, n + 1):
        srcs.append(tiny_checkpoint(tmp_path / f"src{i}", t))
        parent = f"m@{i - 1}" if i > 1 else None
        store.commit(srcs[-1], root, f"m@{i}", parent=parent, keyframe_every=keyframe_every)
        t = tiny_perturb(t, i)
    return root, srcs


def test_gc_keeps_asked_newest_and_bases_and_sweeps_the_rest(tmp_path: Path) -> None:
    root, srcs = _lineage(tmp_path, 5)  # chains: 1 <- 2, 3 <- 4, 5 (keyframes 1, 3, 5)
    assert [e.chain for e in store.log(root, "m")] == [0, 1, 0, 1, 0]
    before = store_objects(root)
    dry = store.gc(root, keep={"m@2": "charged in the ledger"}, dry_run=True)
    assert store_objects(root) == before and len(store.log(root, "m")) == 5
    report = store.gc(root, keep={"m@2": "charged in the ledger", "x@9": "not here"})
    assert report.removed == dry.removed == ("m@3", "m@4")
    assert report.kept == {
        "m@1": "base of m@2",
        "m@2": "charged in the ledger",
        "m@5": "newest of m",
    }
    assert (report.objects_freed, report.bytes_freed) == (dry.objects_freed, dry.bytes_freed)
    assert report.objects_freed > 0 and report.bytes_freed > 0
    assert store_objects(root) == _referenced(root)  # nothing live lost, nothing dead left
    assert len(before - store_objects(root)) == report.objects_freed
    for i in (1, 2, 5):  # m@5's parent m@4 is gone: it is a keyframe and still exports
        out = tmp_path / f"out{i}"
        store.export(root, f"m@{i}", out)
        assert file_hashes(out) == file_hashes(srcs[i - 1])
        assert store.verify(root, f"m@{i}") == []
    assert store.gc(root, keep={"m@2": "charged"}).removed == ()


def test_gc_keep_last_and_lineages(tmp_path: Path) -> None:
    root, _ = _lineage(tmp_path, 4, keyframe_every=8)  # one chain: every version a base
    other = tiny_checkpoint(tmp_path / "o", tiny_tensors(7))
    store.commit(other, root, "o@1")
    report = store.gc(root, keep_last=0, dry_run=True)
    assert set(report.removed) == {"m@1", "m@2", "m@3", "m@4", "o@1"} and not report.kept
    report = store.gc(root, keep_last=1)
    assert report.kept["m@4"] == "newest of m" and report.kept["o@1"] == "newest of o"
    assert report.kept["m@1"] == "base of m@2" and report.removed == ()
    with pytest.raises(VersionError, match="negative"):
        store.gc(root, keep_last=-1)
    with pytest.raises(VersionError, match="no version store"):
        store.gc(tmp_path / "nowhere")


def test_gc_cleans_what_a_crash_left(tmp_path: Path) -> None:
    root, _ = _lineage(tmp_path, 2)
    trash = root / "m" / ".trash-1-deadbeef"  # a gc that crashed between rename and delete
    (root / "m" / "1").rename(trash)
    assert [e.version for e in store.log(root, "m")] == ["2"]
    stale = next((root / "objects").iterdir()) / ".tmp-crashed"
    stale.write_bytes(b"half an object")
    report = store.gc(root, keep_last=1)
    assert not trash.exists() and not stale.exists()
    assert report.removed == () and report.objects_freed >= 1
    assert store_objects(root) == _referenced(root)
    # m@2 was a delta on m@1, whose manifest is gone: the missing base is named.
    assert any("m@1" in p for p in store.verify(root, "m@2"))


def test_gc_refuses_an_unreadable_manifest(tmp_path: Path) -> None:
    root, _ = _lineage(tmp_path, 2)
    (root / "m" / "1" / "manifest.json").write_text("{not json")
    before = store_objects(root)
    with pytest.raises(VersionError, match="gc stops"):
        store.gc(root, keep_last=0)
    assert store_objects(root) == before


def test_gc_waits_for_a_commit_in_progress(tmp_path: Path) -> None:
    root, _ = _lineage(tmp_path, 2)
    done = threading.Event()

    def collect() -> None:
        store.gc(root, keep_last=1)
        done.set()

    with store._locked(root):  # what commit holds from its first object to its manifest
        t = threading.Thread(target=collect)
        t.start()
        time.sleep(0.2)
        assert not done.is_set() and len(store.log(root, "m")) == 2
    t.join(10)
    assert done.is_set()


def test_parallel_decode_is_bit_identical(tmp_path: Path) -> None:
    root, srcs = _lineage(tmp_path, 3, keyframe_every=8)
    for workers in (1, 3, None):
        out = tmp_path / f"out-{workers}"
        store.export(root, "m@3", out, workers=workers)
        assert file_hashes(out) == file_hashes(srcs[2])
        assert store.verify(root, "m@3", workers=workers) == []
    with pytest.raises(VersionError, match="workers"):
        store.verify(root, "m@3", workers=0)


def test_parallel_export_of_a_corrupted_tensor_names_it_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    root, _ = _lineage(tmp_path, 2)
    obj = store.load(root, "m@1").tensors()["embed.weight"]["object"]
    path = root / "objects" / obj[:2] / obj
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    problems = store.verify(root, "m@2", workers=4)
    got = hashlib.sha256(data).hexdigest()
    assert problems == [
        f"model.safetensors: object {obj} (tensor 'embed.weight') is corrupted: "
        f"its bytes hash to {got}"
    ]
    out = tmp_path / "bad"
    with pytest.raises(VersionError, match=obj):
        store.export(root, "m@2", out, workers=4)
    assert not (out / "model.safetensors").exists()
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())


def test_diff_counts_words_and_decodes_values(tmp_path: Path) -> None:
    root = tmp_path / "store"
    t1 = tiny_tensors()
    t2 = tiny_perturb(t1, 1)
    del t2["position_ids"]
    t2["extra.bias"] = ("F32", np.zeros(4, dtype="<f4"))
    fp8 = t1["scales.fp8"][1].copy()
    fp8[0, 0] = 0x38  # 1.0
    fp8[0, 1] = 0x7E  # 448
    t1["scales.fp8"] = ("F8_E4M3", fp8)
    fp8b = fp8.copy()
    fp8b[0, 0] = 0x40  # 2.0
    fp8b[0, 1] = 0xFE  # -448
    t2["scales.fp8"] = ("F8_E4M3", fp8b)
    a = tiny_checkpoint(tmp_path / "a", t1)
    b = tiny_checkpoint(tmp_path / "b", t2)
    (b / "config.json").write_text("{}")
    (b / "generation_config.json").write_text("{}")
    store.commit(a, root, "m@1")
    store.commit(b, root, "m@2", parent="m@1")
    d = store.diff(root, "m@1", "m@2", workers=2)
    by = {t.name: t for t in d.tensors}
    assert by["embed.weight"].status == "unchanged" and by["embed.weight"].changed_share == 0
    q = by["layers.0.q.weight"]
    w1, w2 = t1["layers.0.q.weight"][1], t2["layers.0.q.weight"][1]
    assert q.status == "changed" and q.changed_share == pytest.approx(np.mean(w1 != w2))
    f1 = (w1.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    f2 = (w2.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    assert q.max_abs_diff == pytest.approx(np.abs(f1 - f2).max(), rel=0, abs=0)
    assert q.encoding in ("xor", "step") and q.stored_bytes > 0
    norm = by["norm.weight"]
    assert norm.changed_share == 1.0
    assert norm.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    s = by["scales.fp8"]
    assert s.changed_share == pytest.approx(2 / 64) and s.max_abs_diff == 896.0
    assert by["position_ids"].status == "removed" and by["extra.bias"].status == "added"
    assert d.files_added == ("generation_config.json",)
    assert d.files_changed == ("config.json", "model.safetensors") and d.files_removed == ()
    assert {t.name for t in d.changed} == {
        "layers.0.q.weight", "norm.weight", "scales.fp8", "position_ids", "extra.bias"
    }  # fmt: skip
    doc = d.to_json()
    assert doc["unchanged"] == 2 and json.loads(json.dumps(doc)) == doc


def test_e4m3fn_values() -> None:
    v = store._e4m3fn_values()
    assert v[0x38] == 1.0 and v[0x7E] == 448.0 and v[0x01] == 2.0**-9 and v[0x08] == 2.0**-6
    assert v[0xB8] == -1.0 and v[0x80] == 0.0
    assert np.isnan(v[0x7F]) and np.isnan(v[0xFF]) and np.isfinite(v[:0x7F]).all()


def test_a_version_name_gc_removed_is_never_reused(tmp_path: Path) -> None:
    root, srcs = _lineage(tmp_path, 3, keyframe_every=1)  # three keyframes
    report = store.gc(root, keep_last=1)
    assert report.removed == ("m@1", "m@2")
    assert [e.version for e in store.log(root, "m")] == ["3"]
    with pytest.raises(VersionError, match="never reused"):
        store.commit(srcs[0], root, "m@1")
    store.commit(srcs[0], root, "m@4")  # a new name for the same weights is fine
    assert store.gc(root, keep_last=2).removed == ()
