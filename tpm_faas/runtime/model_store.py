"""Read a model version's weights by shard: each rank reads only its rows or columns.

Where versions live and what they are is :mod:`tpm_faas.catalog`; this module is the loading
side (safetensors headers and slices read with plain file I/O, AutoTP shard offsets, FP8
block-scaled weights dequantized as they are read).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpm_faas.architectures import SUPPORTED, architecture_of, moe_of
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


def routed_experts(config: dict[str, Any]) -> int:
    """The routed experts of each MoE layer of a supported ``config.json`` (0 for a dense
    model, or a mixture of experts configured without MoE layers)."""
    moe = moe_of(config)
    return moe.num_experts if moe is not None and moe.layers else 0


def check_parallel(name: str, model_dir: Path, tp_size: int, ep_size: int = 1) -> int:
    """Check a shard group's layout from ``config.json`` alone, before any rank starts;
    returns the group's size, ``max(tp_size, ep_size)`` ranks.

    ``tp_size`` and ``ep_size`` are each 1 or the group's size: attention and dense layers
    are split by DeepSpeed AutoTP over every rank (tp > 1) or replicated (tp = 1), and the
    routed experts of a mixture of experts are split evenly over every rank (ep > 1; rank
    ``r`` holds experts ``[r * E / ep, (r + 1) * E / ep)``) or replicated (ep = 1).

    :raises ConfigError: a size below 1, sizes that are neither 1 nor the group's, ep > 1 for
        a dense model or one that does not divide the routed experts, tp > 1 for an
        architecture AutoTP does not shard (:func:`check_tp`),
        or an architecture the runtime does not serve
    """
    for flag, value in (("tp", tp_size), ("ep", ep_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: {flag}={value!r}: must be a number of ranks, 1 or more")
    size = max(tp_size, ep_size)
    if tp_size not in (1, size) or ep_size not in (1, size):
        raise ConfigError(
            f"{name}: tp={tp_size} with ep={ep_size}: each must be 1 or the group's size "
            f"({size} ranks)"
        )
    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture_of(config, what=name)
    experts = routed_experts(config)
    if ep_size > 1 and not experts:
        moe = ", ".join(a.model_type for a in SUPPORTED.values() if a.moe)
        raise ConfigError(
            f"{name} is a {arch.model_type} model, which has no experts to spread; serve it "
            f"with ep=1 (expert parallelism: {moe})"
        )
    if ep_size > 1 and experts % ep_size:
        raise ConfigError(
            f"{name} has {experts} routed experts per layer, which ep={ep_size} does not "
            "divide; use an ep that divides it"
        )
    if tp_size > 1 and experts and not arch.tensor_parallel:
        raise ConfigError(
            f"{name} is a {arch.model_type} model, whose attention DeepSpeed AutoTP does not "
            f"shard; serve it with tp=1 (--ep {tp_size} spreads its experts over "
            f"{tp_size} ranks)"
        )
    check_tp(name, model_dir, tp_size)
    return size


def hf_config(model_dir: Path) -> Any:
    """The ``transformers`` config of a version: its ``config.json`` as ``transformers`` reads
    it, or, for a ``model_type`` ``transformers`` does not know but serves under another
    (Kimi K2's ``kimi_k2``: ``served_as`` in :data:`tpm_faas.architectures.SUPPORTED`), the
    same fields read by that architecture's config class (no remote code). Without its
    ``quantization_config``: an FP8 checkpoint is served dequantized (:class:`Fp8Block`)."""
    from transformers import AutoConfig

    raw = json.loads((model_dir / "config.json").read_text())
    arch = architecture_of(raw, what=model_dir.name)
    fp8_block(raw, what=model_dir.name)  # a quantization the loader cannot read is refused
    if arch.served_as is None:
        config = AutoConfig.from_pretrained(model_dir)
    else:
        drop = ("model_type", "auto_map", "quantization_config")
        fields = {k: v for k, v in raw.items() if k not in drop}
        config = AutoConfig.for_model(arch.served_as, **fields)
    # FP8 weights are dequantized at load (Fp8Block): the model is built with plain Linear
    # layers of the serving dtype, never transformers' FP8 modules.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


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
    "F8_E4M3": "float8_e4m3fn",
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


# -- FP8 block-scaled weights (DeepSeek-V3, Kimi K2) -------------------------------------------
#: The one quantization the loader reads, as DeepSeek-V3 and Kimi K2 publish it
#: (``quantization_config``): e4m3 weights, one float32 scale per block of 128 x 128.
FP8_METHOD, FP8_FORMAT, FP8_BLOCK = "fp8", "e4m3", (128, 128)
#: The torch dtype of safetensors' ``F8_E4M3``.
FP8_DTYPE = "float8_e4m3fn"
#: The companion of an FP8 weight ``<name>``: ``<name>_scale_inv`` (``...weight_scale_inv``).
SCALE_SUFFIX = "_scale_inv"
#: What the card of an FP8 checkpoint says it holds (``quantization``).
FP8_CARD = "fp8-e4m3-block128"
_FP8_SERVED = "FP8 block-scaled weights (quant_method fp8, fmt e4m3, weight_block_size [128, 128])"
_UNSUPPORTED = "unsupported_quantization"
_SCALE_DTYPES = ("float32", "bfloat16", "float16")


def fp8_block(config: dict[str, Any], *, what: str = "the checkpoint") -> tuple[int, int] | None:
    """The weight block of an FP8 checkpoint (``config.json``'s ``quantization_config``):
    ``(128, 128)``, or None for a checkpoint without quantization. Any other quantization
    (method, format, block, static activation scales) is refused: :class:`ConfigError` with
    code ``unsupported_quantization``."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{what}: quantization_config is not an object", code=_UNSUPPORTED)
    method, fmt = qc.get("quant_method"), qc.get("fmt", FP8_FORMAT)
    block, scheme = qc.get("weight_block_size"), qc.get("activation_scheme", "dynamic")
    if method != FP8_METHOD:
        problem = f"quant_method {method!r}"
    elif fmt != FP8_FORMAT:
        problem = f"FP8 format {fmt!r}"
    elif not isinstance(block, list) or block != list(FP8_BLOCK):
        problem = f"weight_block_size {block!r}"
    elif scheme != "dynamic":
        problem = f"activation_scheme {scheme!r}"
    else:
        return FP8_BLOCK
    raise ConfigError(
        f"{what}: {problem} is not served; the loader reads {_FP8_SERVED}", code=_UNSUPPORTED
    )


@dataclass(frozen=True)
class Fp8Block:
    """A block-scaled FP8 weight: ``weight`` (e4m3, ``[..., rows, cols]``) and its
    ``weight_scale_inv`` ``scale`` (``[..., ceil(rows / 128), ceil(cols / 128)]``, float32).
    The real weight is ``weight.float() * scale`` with each scale broadcast over its block of
    the last two dimensions (the last block of a dimension not a multiple of 128 is partial),
    as DeepSeek's ``weight_dequant`` and ``transformers``' ``Fp8Dequantize`` compute it.

    :func:`read_source` reads a slice of it dequantized (float32): the e4m3 bytes of the slice
    exactly, and of the scales only the rows or columns of the blocks the slice touches."""

    weight: TensorEntry
    scale: TensorEntry
    block: tuple[int, int] = FP8_BLOCK

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    @property
    def dtype(self) -> str:
        return self.weight.dtype


def fp8_sources(
    entries: dict[str, TensorEntry], block: tuple[int, int] | None, *, what: str = "the checkpoint"
) -> dict[str, TensorEntry | Fp8Block]:
    """``entries`` with each FP8 weight and its ``*_scale_inv`` made one :class:`Fp8Block`
    under the weight's name (the scales are not parameters of the model). ``block`` is
    :func:`fp8_block` of the config. Refused (:class:`ConfigError`): an FP8 tensor in a
    checkpoint whose config declares no FP8 quantization, an FP8 weight without its scale
    (code ``missing_fp8_scale``) or with a scale of another shape, and a scale without an FP8
    weight."""
    fp8 = {n for n, e in entries.items() if e.dtype == FP8_DTYPE}
    scales = {n for n in entries if n.endswith(SCALE_SUFFIX)}
    if fp8 and block is None:
        raise ConfigError(
            f"{what}: {min(fp8)} is FP8 ({FP8_DTYPE}) but config.json declares no "
            f"quantization_config; the loader reads {_FP8_SERVED}",
            code=_UNSUPPORTED,
        )
    orphans = sorted(scales - {n + SCALE_SUFFIX for n in fp8})
    if orphans:
        raise ConfigError(
            f"{what}: {orphans[0]} scales no FP8 weight ({len(orphans)} such)", code=_UNSUPPORTED
        )
    out: dict[str, TensorEntry | Fp8Block] = {}
    for name, entry in entries.items():
        if name in scales:
            continue
        if name not in fp8:
            out[name] = entry
            continue
        assert block is not None
        scale = entries.get(name + SCALE_SUFFIX)
        if scale is None:
            missing = sorted(n for n in fp8 if n + SCALE_SUFFIX not in entries)
            raise ConfigError(
                f"{what}: FP8 weight {name} has no {name}{SCALE_SUFFIX} "
                f"({len(missing)} FP8 weights without their block scales)",
                code="missing_fp8_scale",
            )
        rows_cols = entry.shape[-2:] if len(entry.shape) >= 2 else (0, 0)
        want = (*entry.shape[:-2], *(-(-n // b) for n, b in zip(rows_cols, block, strict=True)))
        if len(entry.shape) < 2 or scale.shape != want or scale.dtype not in _SCALE_DTYPES:
            raise ConfigError(
                f"{what}: {name}{SCALE_SUFFIX} is {scale.dtype} {list(scale.shape)}; a weight "
                f"of {list(entry.shape)} in blocks of {list(block)} needs float {list(want)}",
                code=_UNSUPPORTED,
            )
        out[name] = Fp8Block(entry, scale, block)
    return out


def _read_fp8(source: Fp8Block, dim: int | None, start: int, length: int) -> tuple[Any, int]:
    """A slice of an FP8 weight dequantized to float32, and the bytes read for it."""
    import torch

    nd = len(source.shape)
    if dim is None:
        dim, start, length = 0, 0, source.shape[0]
    if length == 0 or 0 in source.shape:  # nothing to scale
        return read_tensor(source.weight, dim, start, length).to(torch.float32), 0
    weight = read_tensor(source.weight, dim, start, length)
    offsets = [0, 0]  # where the slice starts in its first block, along the last two dims
    axis = dim - (nd - 2)  # which block axis the slice is along (negative: a leading dim)
    if axis < 0:
        scale = read_tensor(source.scale, dim, start, length)
    else:
        b = source.block[axis]
        first, last = start // b, -(-(start + length) // b)
        scale = read_tensor(source.scale, dim, first, last - first)
        offsets[axis] = start - first * b
    nbytes = weight.numel() * weight.element_size() + scale.numel() * scale.element_size()
    scale = scale.to(torch.float32)
    for k in (0, 1):
        d = nd - 2 + k
        scale = scale.repeat_interleave(source.block[k], dim=d).narrow(
            d, offsets[k], weight.shape[d]
        )
    return weight.to(torch.float32) * scale, nbytes


@dataclass(frozen=True)
class FusedExperts:
    """A fused expert parameter of ``transformers`` 5 (``experts.gate_up_proj``
    ``[experts, 2 * inner, hidden]``, ``experts.down_proj`` ``[experts, hidden, inner]``) in a
    checkpoint that stores one 2-D tensor per expert, as Mixtral and Qwen3-MoE are published
    (``experts.3.w1.weight``, ``experts.3.gate_proj.weight``): expert ``e``'s rows are its
    ``parts[e]`` one after the other (gate then up). A part may be an FP8 weight
    (:class:`Fp8Block`: DeepSeek-V3's and Kimi K2's experts), dequantized as it is read."""

    parts: tuple[tuple[TensorEntry | Fp8Block, ...], ...]

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


#: What a parameter is read from: a tensor, an FP8 weight and its scales, or the per-expert
#: tensors of a fused expert parameter.
Source = TensorEntry | Fp8Block | FusedExperts


def published_entries(
    params: dict[str, Any], entries: Mapping[str, TensorEntry | Fp8Block]
) -> dict[str, Source]:
    """Checkpoint sources of the parameters ``entries`` lacks by name: a module the checkpoint
    names otherwise (:data:`_ALIASES`), and a fused expert parameter from its per-expert
    tensors (:class:`FusedExperts`; as many experts as the checkpoint holds)."""
    out: dict[str, Source] = {}
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
                parts: list[tuple[TensorEntry | Fp8Block, ...]] = []
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


def read_source(source: Source, dim: int | None = None, start: int = 0, length: int = 0) -> Any:
    """:func:`read_tensor` of a tensor, of an FP8 weight (dequantized to float32,
    :class:`Fp8Block`) or of a fused expert parameter (reading only the experts, rows or
    columns of the slice)."""
    return _read(source, dim, start, length)[0]


def _read(source: Source, dim: int | None = None, start: int = 0, length: int = 0) -> Any:
    """:func:`read_source`, and the bytes of the files it read."""
    import torch

    if isinstance(source, TensorEntry):
        t = read_tensor(source, dim, start, length)
        return t, t.numel() * t.element_size()
    if isinstance(source, Fp8Block):
        return _read_fp8(source, dim, start, length)
    nbytes = 0
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
                piece, n = _read(part, 1, start, length)
            elif hi - lo < part.shape[0]:
                piece, n = _read(part, 0, lo - (offset - part.shape[0]), hi - lo)
            else:
                piece, n = _read(part)
            pieces.append(piece)
            nbytes += n
        out.append(torch.cat(pieces))
    return torch.stack(out), nbytes


def load_shard(module: Any, model_dir: Path, *, rank: int, tp_size: int) -> int:
    """Fill ``module``'s parameters with this rank's share of the checkpoint; returns bytes read.

    ``module`` was built on the meta device and sharded by AutoTP, so each parameter already
    has its local shape. Parameters are found by name; a mixture of experts' fused expert
    parameters are also read from the per-expert tensors of a published checkpoint
    (:class:`FusedExperts`), as ``transformers`` converts them at load. FP8 weights
    (DeepSeek-V3, Kimi K2: e4m3 with their ``*_scale_inv``) are dequantized as they are read
    (:class:`Fp8Block`), then cast to the parameter's dtype. Persistent buffers the
    checkpoint holds are read too. The bytes returned are those read from the files (e4m3
    bytes and scales for an FP8 weight).

    The local shapes of every rank are gathered: a parameter whose shape differs from the
    checkpoint's along one dimension on any rank is a shard along it, and this rank's piece
    starts at the sum of the lower ranks' sizes, so whatever split AutoTP chose is read exactly
    (uneven ones included: AutoTP splits in grains of 64, so a rank may hold the whole of a
    small tensor and another none of it). Only those rows or columns are read from the
    safetensors files, onto :func:`rank_device`: no rank ever holds the whole model.
    """
    import torch

    device = rank_device()
    config = json.loads((model_dir / "config.json").read_text())
    what = f"checkpoint {model_dir}"
    files = fp8_sources(weight_files(model_dir), fp8_block(config, what=what), what=what)
    params = dict(module.named_parameters())
    entries: dict[str, Source] = {**files}
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
                t, n = _read(entries[name], d, start, p.shape[d])
            else:
                t, n = _read(entries[name])
            p.data = t.to(device=device, dtype=p.dtype)
            nbytes += n
        # Persistent buffers the checkpoint holds (DeepSeek's e_score_correction_bias), whole
        # on every rank and in the buffer's own dtype (transformers keeps that one in fp32).
        persistent = set(module.state_dict())
        for name, buf in list(module.named_buffers()):
            if name in persistent and name in files:
                t, n = _read(files[name])
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner).register_buffer(
                    leaf, t.to(device=device, dtype=buf.dtype)
                )
                nbytes += n
    return nbytes


def _tied_entries(
    module: Any, params: dict[str, Any], entries: Mapping[str, TensorEntry | Fp8Block]
) -> dict[str, TensorEntry | Fp8Block]:
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
