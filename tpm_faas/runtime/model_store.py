"""Find a model version on disk and describe it.

A version lives in ``<root>/<name>/<version>/``: a transformers ``config.json``, one or more
``*.safetensors`` files, and optionally ``tpm_model.json`` (tokenizer, registered input
adapters and output heads, whose weights are in ``extras.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tpm_faas.errors import UnknownModel


def resolve(model: str, roots: Sequence[Path]) -> Path:
    """The directory of ``name@version`` under the first root that has it."""
    name, _, ver = model.partition("@")
    if not name or not ver or "/" in model or ".." in model:
        raise UnknownModel(f"{model!r} is not a model reference of the form name@version")
    for root in roots:
        d = Path(root) / name / ver
        if (d / "config.json").is_file():
            return d
    raise UnknownModel(f"model {model} is not in any model root ({', '.join(map(str, roots))})")


def checkpoint_sha256(model_dir: Path) -> str:
    """A hash over every file that defines the version (name and content, in name order)."""
    h = hashlib.sha256()
    files = sorted(
        p for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors") and p.is_file()
    )
    for p in files:
        if p.name == "training.json":
            continue  # provenance, not part of the model
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def card(model_dir: Path) -> dict[str, Any]:
    """``tpm_model.json`` (empty defaults when absent)."""
    p = model_dir / "tpm_model.json"
    data: dict[str, Any] = json.loads(p.read_text()) if p.is_file() else {}
    data.setdefault("tokenizer", "bytes")
    data.setdefault("adapters", {})
    data.setdefault("heads", {})
    return data
