"""The content-addressed version store: commit, export bit-identically, verify, log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")
pytest.importorskip("zstandard")

from _versions import file_hashes, store_objects  # noqa: E402

from tpm_faas.errors import VersionError  # noqa: E402
from tpm_faas.versions import store  # noqa: E402

CHANGED = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight")


def _tensors(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, object] = {}
    t["model.embed_tokens.weight"] = (torch.randn(64, 32, generator=g) * 0.02).bfloat16()
    for i in range(2):
        p = f"model.layers.{i}"
        t[f"{p}.self_attn.q_proj.weight"] = (torch.randn(32, 32, generator=g) * 0.02).bfloat16()
        t[f"{p}.mlp.up_proj.weight"] = (torch.randn(64, 32, generator=g) * 0.02).bfloat16()
        t[f"{p}.input_layernorm.weight"] = torch.ones(32, dtype=torch.float32)
    t["model.norm.weight"] = torch.randn(32, generator=g).float()
    t["position_ids"] = torch.arange(16, dtype=torch.int64)
    return t


def _write(d: Path, tensors: dict[str, object]) -> Path:
    d.mkdir(parents=True)
    first = dict(list(tensors.items())[:4])
    rest = dict(list(tensors.items())[4:])
    st.save_file(first, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    st.save_file(rest, str(d / "model-00002-of-00002.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (d / "tokenizer.json").write_text(json.dumps({"vocab": {str(i): i for i in range(64)}}))
    return d


def _perturb(tensors: dict[str, object], seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    for k in CHANGED:
        w = tensors[k]
        assert isinstance(w, torch.Tensor)
        out[k] = (w.float() + torch.randn(w.shape, generator=g) * 2e-4).bfloat16()
    return out


@pytest.fixture
def lineage(tmp_path: Path) -> tuple[Path, Path, Path, store.Manifest, store.Manifest]:
    t1 = _tensors()
    v1 = _write(tmp_path / "src1", t1)
    v2 = _write(tmp_path / "src2", _perturb(t1, 1))
    root = tmp_path / "store"
    m1 = store.commit(v1, root, "llama@1")
    m2 = store.commit(v2, root, "llama@2", parent="llama@1")
    return root, v1, v2, m1, m2


def test_export_is_bit_identical_and_unchanged_tensors_cost_nothing(
    lineage: tuple[Path, Path, Path, store.Manifest, store.Manifest], tmp_path: Path
) -> None:
    root, v1, v2, m1, m2 = lineage
    for ref, src in (("llama@1", v1), ("llama@2", v2)):
        out = tmp_path / f"out-{ref}"
        store.export(root, ref, out)
        assert file_hashes(out) == file_hashes(src)
        assert store.verify(root, ref) == []
    t1, t2 = m1.tensors(), m2.tensors()
    for name, entry in t2.items():
        if name in CHANGED:
            assert entry["encoding"]["encoding"] in ("xor", "step")
            assert entry["base"] == "llama@1" and entry["depth"] == 1
        else:
            assert entry["object"] == t1[name]["object"]
    assert t2["position_ids"]["encoding"] is None  # int64: raw
    assert m2.stored_bytes < 0.25 * m2.full_bytes
    assert m1.stored_bytes <= m1.full_bytes
    assert m2.data["parent_manifest_sha256"] == m1.manifest_sha256
    assert m2.manifest_sha256 == store.load(root, "llama@2").manifest_sha256
    for p in (root / "objects").rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o644
    entries = store.log(root, "llama")
    assert [(e.version, e.parent) for e in entries] == [("1", None), ("2", "llama@1")]
    assert entries[1].share < 0.25


def test_unchanged_tensors_add_only_changed_objects(tmp_path: Path) -> None:
    t1 = _tensors()
    root = tmp_path / "store"
    store.commit(_write(tmp_path / "a", t1), root, "m@1")
    before = store_objects(root)
    store.commit(_write(tmp_path / "b", _perturb(t1, 2)), root, "m@2", parent="m@1")
    assert len(store_objects(root) - before) == len(CHANGED)


def test_keyframe_forced_after_k(tmp_path: Path) -> None:
    t = _tensors()
    root = tmp_path / "store"
    srcs = []
    for i in range(4):
        src = _write(tmp_path / f"s{i}", t)
        srcs.append(src)
        parent = f"m@{i - 1}" if i else None
        man = store.commit(src, root, f"m@{i}", parent=parent, keyframe_every=2)
        depths = {man.tensors()[k]["depth"] for k in CHANGED}
        assert depths == ({0} if i % 2 == 0 else {1}), i
        t = _perturb(t, 10 + i)
    for i, src in enumerate(srcs):
        out = tmp_path / f"o{i}"
        store.export(root, f"m@{i}", out)
        assert file_hashes(out) == file_hashes(src)


def test_corruption_detected_and_refused_by_name(
    lineage: tuple[Path, Path, Path, store.Manifest, store.Manifest], tmp_path: Path
) -> None:
    root, _, _, _, m2 = lineage
    flipped = m2.tensors()[CHANGED[0]]["object"]
    path = root / "objects" / flipped[:2] / flipped
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    problems = store.verify(root, "llama@2")
    assert problems and any(flipped in p and "corrupted" in p for p in problems)
    with pytest.raises(VersionError, match=flipped):
        store.export(root, "llama@2", tmp_path / "bad")

    gone = m2.files["config.json"]["object"]
    (root / "objects" / gone[:2] / gone).unlink()
    assert any(gone in p and "missing" in p for p in store.verify(root, "llama@1"))
    with pytest.raises(VersionError, match=gone):
        store.export(root, "llama@1", tmp_path / "bad1")


def test_existing_version_is_never_replaced(
    lineage: tuple[Path, Path, Path, store.Manifest, store.Manifest],
) -> None:
    root, v1, v2, m1, _ = lineage
    with pytest.raises(VersionError, match="never replaced"):
        store.commit(v2, root, "llama@1")
    assert store.load(root, "llama@1").manifest_sha256 == m1.manifest_sha256
    with pytest.raises(VersionError, match="NAME@VERSION"):
        store.commit(v1, root, "../x@1")


def test_diff_agrees_with_torch(
    lineage: tuple[Path, Path, Path, store.Manifest, store.Manifest],
) -> None:
    root, v1, v2, _, _ = lineage
    t1 = st.load_file(str(v1 / "model-00001-of-00002.safetensors"))
    t1 |= st.load_file(str(v1 / "model-00002-of-00002.safetensors"))
    t2 = st.load_file(str(v2 / "model-00001-of-00002.safetensors"))
    t2 |= st.load_file(str(v2 / "model-00002-of-00002.safetensors"))
    d = store.diff(root, "llama@1", "llama@2")
    assert {t.name for t in d.changed} == set(CHANGED)
    for t in d.changed:
        a, b = t1[t.name], t2[t.name]
        words = (a.view(torch.int16) != b.view(torch.int16)).double().mean().item()
        assert t.changed_share == pytest.approx(words)
        assert t.max_abs_diff == (a.double() - b.double()).abs().max().item()
    assert all(t.max_abs_diff == 0 for t in d.tensors if t.status == "unchanged")


def test_fp8_values_agree_with_torch() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = patterns.view(torch.float8_e4m3fn).double().numpy()
    got = store._e4m3fn_values()
    assert ((got == want) | (np.isnan(got) & np.isnan(want))).all()
