"""A small lineage for the version-store tests: the bundled demo model and descendants of it
with a few tensors moved, as plain Hugging Face directories (config, tokenizer, card copied)."""

from __future__ import annotations

import shutil
from pathlib import Path

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
        import json

        data = json.loads(card.read_text())
        data.pop("checkpoint_sha256", None)
        card.write_text(json.dumps(data, indent=2))
    return dest
