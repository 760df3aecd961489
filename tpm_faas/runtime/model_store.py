"""Read a model version's weights by shard: each rank reads only its rows or columns.

Where versions live and what they are is :mod:`tpm_faas.catalog`; this module is the loading
side (safetensors headers and slices read with plain file I/O, AutoTP shard offsets).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpm_faas.architectures import SUPPORTED, architecture_of
from tpm_faas.errors import ConfigError


def check_tp(name: str, model_dir: Path, tp_size: int) -> None:
    """Refuse ``tp_size > 1`` for an architecture DeepSpeed AutoTP cannot shard (its
    ``tensor_parallel`` flag in :data:`tpm_faas.architectures.SUPPORTED`), and any
    architecture the runtime does not serve, from ``config.json`` alone, before any rank
    starts."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture_of(config, what=name)
    if tp_size > 1 and not arch.tensor_parallel:
        sharded = ", ".join(a.model_type for a in SUPPORTED.values() if a.tensor_parallel)
        raise ConfigError(
            f"{name} is a {arch.model_type} model, which DeepSpeed AutoTP does not shard; "
            f"serve it with tp=1 (tensor parallelism: {sharded})"
        )


def hf_config(model_dir: Path) -> Any:
    """The ``transformers`` config of a version: its ``config.json`` as ``transformers`` reads
    it, or, for a ``model_type`` ``transformers`` does not know but serves under another
    (Kimi K2's ``kimi_k2``: ``served_as`` in :data:`tpm_faas.architectures.SUPPORTED`), the
    same fields read by that architecture's config class (no remote code)."""
    from transformers import AutoConfig

    raw = json.loads((model_dir / "config.json").read_text())
    arch = architecture_of(raw, what=model_dir.name)
    if arch.served_as is None:
        return AutoConfig.from_pretrained(model_dir)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    return AutoConfig.for_model(arch.served_as, **fields)


#: safetensors dtype names -> torch dtype names.
_ST_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of a safetensors file (read with plain file I/O; nothing is mapped)."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= _MAX_HEADER:
            raise ConfigError(f"{path} is not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if e["dtype"] not in _ST_DTYPES:
            raise ConfigError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
        a, b = e["data_offsets"]
        out[name] = TensorEntry(path, _ST_DTYPES[e["dtype"]], tuple(e["shape"]), base + a, base + b)
    return out


def weight_files(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the ``model*.safetensors`` files of a version (extras excluded)."""
    out: dict[str, TensorEntry] = {}
    for path in sorted(model_dir.glob("model*.safetensors")):
        out.update(read_header(path))
    return out


def read_tensor(entry: TensorEntry, dim: int | None = None, start: int = 0, length: int = 0) -> Any:
    """Read a tensor, or ``length`` indices from ``start`` along ``dim``, with ``os.pread``.

    Plain reads, not a memory map: a rank's resident memory holds what it keeps and nothing
    of the file, and a shard along dimension 1 reads each row's piece without touching the
    rest of the row's bytes in this process.
    """
    import torch

    dtype = getattr(torch, entry.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    shape = list(entry.shape) or [1]  # a scalar reads as one element
    if dim is None:
        dim, start, length = 0, 0, shape[0]
    if start < 0 or length < 0 or start + length > shape[dim]:
        raise ConfigError(f"slice {start}:{start + length} of dim {dim} is outside {shape}")
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1 :]) * item  # bytes of one index along ``dim``
    chunk, stride = length * inner, shape[dim] * inner
    out = bytearray(outer * chunk)
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        for o in range(outer if chunk else 0):  # one contiguous piece per outer index
            view = memoryview(out)[o * chunk : (o + 1) * chunk]
            if os.preadv(fd, [view], entry.begin + o * stride + start * inner) != chunk:
                raise ConfigError(f"{entry.path} ended early reading a tensor")
    finally:
        os.close(fd)
    new_shape = [*shape[:dim], length, *shape[dim + 1 :]] if entry.shape else []
    if not out:
        return torch.empty(new_shape, dtype=dtype)
    return torch.frombuffer(out, dtype=dtype).reshape(new_shape)


@dataclass(frozen=True)
class FusedExperts:
    """A fused expert parameter of ``transformers`` 5 (``experts.gate_up_proj``
    ``[experts, 2 * inner, hidden]``, ``experts.down_proj`` ``[experts, hidden, inner]``) in a
    checkpoint that stores one 2-D tensor per expert, as Mixtral and Qwen3-MoE are published
    (``experts.3.w1.weight``, ``experts.3.gate_proj.weight``): expert ``e``'s rows are its
    ``parts[e]`` one after the other (gate then up)."""

    parts: tuple[tuple[TensorEntry, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0]
        return (len(self.parts), sum(p.shape[0] for p in first), first[0].shape[1])


#: The per-expert tensors of each fused parameter, by checkpoint naming: Mixtral's
#: ``w1``/``w3``/``w2``, and the ``gate_proj``/``up_proj``/``down_proj`` of Qwen-MoE and DeepSeek.
_EXPERT_PARTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
_FUSED = re.compile(r"(.+)\.experts\.(gate_up_proj|down_proj)")
#: Module names a published checkpoint spells differently: (``transformers`` 5, published).
_ALIASES = ((".mlp.", ".block_sparse_moe."),)  # Mixtral


def published_entries(
    params: dict[str, Any], entries: dict[str, TensorEntry]
) -> dict[str, TensorEntry | FusedExperts]:
    """Checkpoint sources of the parameters ``entries`` lacks by name: a module the checkpoint
    names otherwise (:data:`_ALIASES`), and a fused expert parameter from its per-expert
    tensors (:class:`FusedExperts`; as many experts as the checkpoint holds)."""
    out: dict[str, TensorEntry | FusedExperts] = {}
    for name in params:
        if name in entries:
            continue
        spellings = [name, *(name.replace(a, b) for a, b in _ALIASES if a in name)]
        alias = next((n for n in spellings[1:] if n in entries), None)
        if alias is not None:
            out[name] = entries[alias]
            continue
        match = _FUSED.fullmatch(name)
        if match is None:
            continue
        for prefix in (s.rsplit(".experts.", 1)[0] for s in spellings):
            for names in _EXPERT_PARTS[match.group(2)]:
                parts: list[tuple[TensorEntry, ...]] = []
                while all(f"{prefix}.experts.{len(parts)}.{n}.weight" in entries for n in names):
                    parts.append(
                        tuple(entries[f"{prefix}.experts.{len(parts)}.{n}.weight"] for n in names)
                    )
                if parts:
                    out[name] = FusedExperts(tuple(parts))
                    break
            if name in out:
                break
    return out


def read_source(
    source: TensorEntry | FusedExperts, dim: int | None = None, start: int = 0, length: int = 0
) -> Any:
    """:func:`read_tensor` of a tensor or of a fused expert parameter (reading only the experts,
    rows or columns of the slice)."""
    import torch

    if isinstance(source, TensorEntry):
        return read_tensor(source, dim, start, length)
    experts, rows = range(len(source.parts)), (0, source.shape[1])
    if dim == 0:
        experts = range(start, start + length)
    elif dim == 1:
        rows = (start, start + length)
    out = []
    for e in experts:
        pieces, offset = [], 0
        for part in source.parts[e]:
            lo, hi = max(rows[0], offset), min(rows[1], offset + part.shape[0])
            offset += part.shape[0]
            if lo >= hi:
                continue
            if dim == 2:
                pieces.append(read_tensor(part, 1, start, length))
            elif hi - lo < part.shape[0]:
                pieces.append(read_tensor(part, 0, lo - (offset - part.shape[0]), hi - lo))
            else:
                pieces.append(read_tensor(part))
        out.append(torch.cat(pieces))
    return torch.stack(out)


def load_shard(module: Any, model_dir: Path, *, rank: int, tp_size: int) -> int:
    """Fill ``module``'s parameters with this rank's share of the checkpoint; returns bytes read.

    ``module`` was built on the meta device and sharded by AutoTP, so each parameter already
    has its local shape. Parameters are found by name; a mixture of experts' fused expert
    parameters are also read from the per-expert tensors of a published checkpoint
    (:class:`FusedExperts`), as ``transformers`` converts them at load. Persistent buffers
    the checkpoint holds are read too.

    The local shapes of every rank are gathered: a parameter whose shape differs from the
    checkpoint's along one dimension on any rank is a shard along it, and this rank's piece
    starts at the sum of the lower ranks' sizes, so whatever split AutoTP chose is read exactly
    (uneven ones included: AutoTP splits in grains of 64, so a rank may hold the whole of a
    small tensor and another none of it). Only those rows or columns are read from the
    safetensors files, onto :func:`rank_device`: no rank ever holds the whole model.
    """
    import torch

    device = rank_device()
    files = weight_files(model_dir)
    params = dict(module.named_parameters())
    entries: dict[str, TensorEntry | FusedExperts] = {**files}
    entries.update(_tied_entries(module, params, files))
    entries.update(published_entries(params, files))
    missing = sorted(set(params) - set(entries))
    if missing:
        raise ConfigError(f"checkpoint {model_dir} lacks tensors: {', '.join(missing[:5])}")
    names = list(params)
    every = _gather_shapes([tuple(params[n].shape) for n in names], tp_size=tp_size)
    split: dict[str, tuple[int, int]] = {}  # name -> (dimension, this rank's start)
    for i, name in enumerate(names):
        full = entries[name].shape
        shapes = [ranks[i] for ranks in every]
        if any(len(s) != len(full) for s in shapes):
            raise ConfigError(
                f"{name}: local shape {list(shapes[rank])} vs checkpoint {list(full)}"
            )
        dims = sorted({d for s in shapes for d in range(len(full)) if s[d] != full[d]})
        if len(dims) > 1:
            raise ConfigError(
                f"{name}: local shape {list(shapes[rank])} vs checkpoint {list(full)}"
            )
        if dims:
            d = dims[0]
            sizes = [s[d] for s in shapes]
            if sum(sizes) != full[d]:
                raise ConfigError(
                    f"{name}: shards of {sizes} along dimension {d} do not make up {full[d]}"
                )
            split[name] = (d, sum(sizes[:rank]))
    nbytes = 0
    with torch.no_grad():
        for name, p in params.items():
            if name in split:
                d, start = split[name]
                t = read_source(entries[name], d, start, p.shape[d])
            else:
                t = read_source(entries[name])
            p.data = t.to(device=device, dtype=p.dtype)
            nbytes += t.numel() * t.element_size()
        # Persistent buffers the checkpoint holds (DeepSeek's e_score_correction_bias), whole
        # on every rank and in the buffer's own dtype (transformers keeps that one in fp32).
        persistent = set(module.state_dict())
        for name, buf in list(module.named_buffers()):
            if name in persistent and name in files:
                t = read_tensor(files[name])
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner).register_buffer(
                    leaf, t.to(device=device, dtype=buf.dtype)
                )
                nbytes += t.numel() * t.element_size()
    return nbytes


def _tied_entries(
    module: Any, params: dict[str, Any], entries: dict[str, TensorEntry]
) -> dict[str, TensorEntry]:
    """Checkpoint entries for an output embedding tied to the input one (GPT-2 saves only
    ``transformer.wte.weight``): once AutoTP has replaced ``lm_head`` by its own (sharded)
    parameter, that parameter is read from the input embedding's tensor."""
    config = getattr(module, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    inputs, outputs = module.get_input_embeddings(), module.get_output_embeddings()
    if inputs is None or outputs is None:
        return {}
    by_id = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    source = by_id.get(id(inputs.weight))
    out_name = next((n for n, p in params.items() if p is getattr(outputs, "weight", None)), None)
    if source is None or source not in entries or out_name is None or out_name in entries:
        return {}
    return {out_name: entries[source]}


def _gather_shapes(local: list[tuple[int, ...]], *, tp_size: int) -> list[list[tuple[int, ...]]]:
    """Every rank's local shapes of the same parameters (in rank order); one all-gather."""
    if tp_size == 1:
        return [local]
    import torch
    import torch.distributed as dist

    width = max((len(s) for s in local), default=0)
    table = [[*s, *[-1] * (width - len(s))] for s in local]
    mine = torch.tensor(table, dtype=torch.int64, device=rank_device()).reshape(len(local), width)
    every = [torch.zeros_like(mine) for _ in range(tp_size)]
    dist.all_gather(every, mine)
    # -1 pads a shape to the table's width (sizes are never negative)
    return [[tuple(int(x) for x in row if x >= 0) for row in t.cpu().tolist()] for t in every]


def rank_device() -> Any:
    """This rank's device: its GPU (one per rank, NCCL), else the CPU (gloo).

    Weights, the KV cache and the tensors of collectives all live there.
    """
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
