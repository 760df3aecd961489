"""Large results go by reference: a safetensors file in the results directory, with its sha256.

Globus Compute returns at most 10 MB per task. When the tensors of a result add up to more
than the inline limit (4 MB by default), every tensor payload of the result is written to one
``<request id>.safetensors`` file, replaced in the result by its dtype, shape and key, and the
result gains a ``tensors_ref`` naming the file, its size and its sha256. The client loads the
file transparently (``tpm_faas.client``), after checking the hash.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path
from typing import Any

#: Keys of a tensor payload (see :class:`tpm_faas.schemas.TensorPayload`).
PAYLOAD_KEYS = frozenset({"dtype", "shape", "data"})
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._:-]")


def payloads(obj: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every tensor payload in a JSON-able result, with its dotted path (in document order)."""
    if isinstance(obj, dict):
        if obj.keys() >= PAYLOAD_KEYS:
            return [(path, obj)]
        out = []
        for k, v in obj.items():
            out += payloads(v, f"{path}.{k}" if path else str(k))
        return out
    if isinstance(obj, list):
        out = []
        for i, v in enumerate(obj):
            out += payloads(v, f"{path}.{i}" if path else str(i))
        return out
    return []


def offload(output: dict[str, Any], request_id: str, results_dir: Path, limit: int) -> int:
    """Move ``output``'s tensors to a file when they exceed ``limit`` bytes (in place).

    Returns the bytes written (0 when everything stays inline).
    """
    found = payloads(output)
    inline = sum(3 * len(p["data"]) // 4 for _, p in found)
    if inline <= limit:
        return 0
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {}
    for key, p in found:
        if p["dtype"] != "float32":
            raise ValueError(f"result tensor {key} has dtype {p['dtype']}; expected float32")
        arrays[key] = np.frombuffer(base64.b64decode(p["data"]), dtype=np.float32).reshape(
            p["shape"]
        )
    results_dir.mkdir(parents=True, exist_ok=True)
    name = _SAFE_NAME.sub("_", request_id) + ".safetensors"
    path = results_dir / name
    tmp = results_dir / f".{name}.tmp"
    save_file(arrays, str(tmp), metadata={"request_id": request_id})
    digest = _sha256(tmp)
    os.replace(tmp, path)
    for key, p in found:
        del p["data"]
        p["key"] = key
    size = path.stat().st_size
    output["tensors_ref"] = {
        "name": name,
        "uri": path.resolve().as_uri(),
        "sha256": digest,
        "bytes": size,
        "format": "safetensors",
    }
    return size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
