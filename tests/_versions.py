"""What the version-store tests share: tiny checkpoints written with numpy alone (every dtype
the codec handles, and one it does not), file and object listings, and a lineage of the bundled
demo model with a few tensors moved (plain Hugging Face directories, card copied)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from tpm_faas.config import BUNDLED_MODELS

#: The bundled checkpoint the lineage starts from (bf16 safetensors, byte tokenizer card).
BASE = BUNDLED_MODELS / "demo-tpm" / "1"
#: Tensors a descendant moves.
MOVED = ("model.layers.3.mlp.down_proj.weight", "lm_head.weight")


def descendant(src: Path, dest: Path, *, seed: int, scale: float = 2e-3) -> Path:
    """A copy of ``src`` with :data:`MOVED` nudged (bf16 kept), as continued training would."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("tpm_version.json"))
    g = torch.Generator().manual_seed(seed)
    for f in sorted(dest.glob("*.safetensors")):
        if f.name == "extras.safetensors":
            continue
        tensors = load_file(str(f))
        for k in MOVED:
            if k in tensors:
                w = tensors[k]
                tensors[k] = (w.float() + torch.randn(w.shape, generator=g) * scale).to(w.dtype)
        f.unlink()
        save_file(tensors, str(f), metadata={"format": "pt"})
    card = dest / "tpm_model.json"
    if card.is_file():  # the card's hash names the files it was written for
        data = json.loads(card.read_text())
        data.pop("checkpoint_sha256", None)
        card.write_text(json.dumps(data, indent=2))
    return dest


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 words (truncated)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def tiny_tensors(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": ("BF16", bf16(rng.normal(0, 0.02, (64, 32)))),
        "layers.0.q.weight": ("BF16", bf16(rng.normal(0, 0.02, (32, 32)))),
        "layers.0.up.weight": ("F16", rng.normal(0, 0.02, (16, 32)).astype("<f2")),
        "norm.weight": ("F32", rng.normal(1, 0.1, 32).astype("<f4")),
        "scales.fp8": ("F8_E4M3", rng.integers(0, 0x7E, (8, 8), dtype=np.uint8)),
        "position_ids": ("I64", np.arange(16, dtype="<i8")),
    }


def tiny_perturb(
    t: dict[str, tuple[str, np.ndarray]], seed: int
) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = dict(t)
    dt, w = t["layers.0.q.weight"]
    f = (w.astype(np.uint32) << 16).view(np.float32)
    out["layers.0.q.weight"] = (dt, bf16(f + rng.normal(0, 2e-4, f.shape).astype(np.float32)))
    dt, n = t["norm.weight"]
    out["norm.weight"] = (dt, (n + np.float32(1e-3)).astype("<f4"))
    return out


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, (dtype, a) in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def tiny_checkpoint(d: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    d.mkdir(parents=True)
    write_safetensors(d / "model.safetensors", tensors)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return d


def file_hashes(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def store_objects(root: Path) -> set[str]:
    return {p.name for p in (root / "objects").rglob("*") if p.is_file()}
