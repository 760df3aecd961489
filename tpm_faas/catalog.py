"""Model versions in a site's model roots: import a published checkpoint, describe, list.

A version lives in ``<root>/<name>/<version>/`` as Hugging Face publishes it: ``config.json``,
one or many ``*.safetensors`` (with ``model.safetensors.index.json``), the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json`` with the chat template or
``chat_template.jinja``) and ``generation_config.json``; the weights are served as they are
(bf16, fp16 or fp32, read by shard; DeepSeek-V3's and Kimi K2's block-scaled FP8 weights are
dequantized as they are read). Beside them the card, ``tpm_model.json``, written by
:func:`import_checkpoint` (``tpm-faas models add``): architecture, parameters, dtype,
context, tokenizer and chat template, the checkpoint hash, and any registered input adapters
and output heads (weights in ``extras.safetensors``).

Torch-free: the gateway, the CLI and the launcher read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tpm_faas.architectures import architecture_of, dims
from tpm_faas.errors import ConfigError, UnknownModel
from tpm_faas.registry import ModelInfo

CARD = "tpm_model.json"
CARD_FORMAT = 1
#: Weight dtypes served as they are (safetensors names).
SERVED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
#: What a version reference looks like (as the request models accept it).
REF = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)@([A-Za-z0-9._-]+)$")
#: The version a request or launch may name for "the newest one" (``NAME@latest``).
LATEST = "latest"
#: Files of a published checkpoint that an import takes (weights are matched by suffix).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
#: Written beside a version materialised from the version store: the manifest it was rebuilt
#: from (:mod:`tpm_faas.versions.cache`).
MARKER = "tpm_version.json"
#: Files that are not part of what a version computes (provenance, the card, the marker).
UNHASHED = frozenset({"training.json", CARD, MARKER})


def split_ref(model: str) -> tuple[str, str]:
    """``name@version`` → ``(name, version)``; :class:`UnknownModel` for anything else."""
    m = REF.fullmatch(model)
    if m is None or ".." in model:
        raise UnknownModel(f"{model!r} is not a model reference of the form name@version")
    return m.group(1), m.group(2)


def resolve(model: str, roots: Sequence[Path]) -> Path:
    """The directory of ``name@version`` under the first root that has it."""
    name, ver = split_ref(model)
    for root in roots:
        d = Path(root) / name / ver
        if (d / "config.json").is_file():
            return d
    raise UnknownModel(f"model {model} is not in any model root ({', '.join(map(str, roots))})")


def checkpoint_sha256(model_dir: Path) -> str:
    """A hash over every file that defines the version (name and content, in name order):
    config, weights, tokenizer, chat template, registered extras."""
    h = hashlib.sha256()
    files = sorted(
        p
        for p in model_dir.iterdir()
        if p.suffix in (".json", ".safetensors", ".jinja")
        and p.is_file()
        and p.name not in UNHASHED
    )
    for p in files:
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def card(model_dir: Path) -> dict[str, Any]:
    """The card of a version (``tpm_model.json``), with defaults for what it leaves out.

    A directory without a card serves with its own ``tokenizer.json``; without either, it
    cannot be tokenized and is refused (never silently byte-tokenized)."""
    p = model_dir / CARD
    data: dict[str, Any] = json.loads(p.read_text()) if p.is_file() else {}
    if "tokenizer" not in data:
        if not (model_dir / "tokenizer.json").is_file():
            raise ConfigError(
                f"{model_dir} has no tokenizer.json and no {CARD} declaring one; import it with "
                "`tpm-faas models add DIR NAME@VERSION` (`--tokenizer bytes` for byte-level ids)"
            )
        data["tokenizer"] = "hf"
    data.setdefault("adapters", {})
    data.setdefault("heads", {})
    return data


def check_servable(model_dir: Path) -> None:
    """Refuse, before any rank starts, a version the runtime cannot serve: an unsupported
    architecture (:class:`UnsupportedArchitecture`, listing the supported ones), a
    quantization the loader does not read, or no way to tokenize it (:class:`ConfigError`)."""
    from tpm_faas.runtime.model_store import fp8_block

    config = _json(model_dir / "config.json")
    what = f"model {model_dir.parent.name}@{model_dir.name}"
    architecture_of(config, what=what)
    fp8_block(config, what=what)
    dims(config)
    card(model_dir)


def model_info(name: str, model_dir: Path, *, dtype: str | None = None) -> ModelInfo:
    """What the gateway knows of a model version, from its files alone (no torch)."""
    from tpm_faas.sites import ModelShape

    config = _json(model_dir / "config.json")
    shape = ModelShape.from_config(config)
    d = dims(config)
    meta = card(model_dir)
    stored = store_marker(model_dir) or {}
    return ModelInfo(
        name=name,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        vocab_size=shape.vocab_size,
        max_positions=d.context_length,
        tokenizer=str(meta["tokenizer"]),
        checkpoint_sha256=str(meta.get("checkpoint_sha256") or checkpoint_sha256(model_dir)),
        dtype=dtype or str(meta.get("dtype") or _config_dtype(config)),
        architecture=shape.architecture,
        num_heads=shape.num_heads,
        head_dim=shape.head_dim,
        adapters=dict(meta["adapters"]),
        heads=dict(meta["heads"]),
        tokenizer_dir=str(model_dir) if meta["tokenizer"] == "hf" else "",
        chat=bool(meta.get("chat_template", (model_dir / "chat_template.jinja").is_file()))
        if meta["tokenizer"] == "hf"
        else False,
        num_experts=shape.num_experts,
        experts_per_token=shape.experts_per_token,
        moe_layers=list(shape.moe_layers),
        shared_experts=shape.shared_experts,
        manifest_sha256=str(stored.get("manifest_sha256", "")),
        committed_at=str(stored.get("created", "")),
        extras_sha256=_file_sha256(model_dir / "extras.safetensors"),
    )


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or ``""`` when there is none."""
    if not path.is_file():
        return ""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store_marker(model_dir: Path) -> dict[str, Any] | None:
    """What :data:`MARKER` says of a version materialised from the version store (the
    manifest's sha256, when it was committed), or ``None`` for a plain directory."""
    try:
        data = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(model_dir: Path, *, tokenizer: str = "auto") -> dict[str, Any]:
    """What a checkpoint directory holds, checked: the card :func:`import_checkpoint` writes.

    :param tokenizer: ``auto`` (the checkpoint's ``tokenizer.json``, required) or ``bytes``
    :raises UnsupportedArchitecture: the architecture is not served (the message lists those
        that are)
    :raises ConfigError: a missing or inconsistent file; weights of another dtype; an FP8
        checkpoint whose weights lack their block scales, or another quantization (code
        ``unsupported_quantization`` or ``missing_fp8_scale``)
    """
    from tpm_faas.runtime.model_store import (
        FP8_CARD,
        FP8_DTYPE,
        fp8_block,
        fp8_sources,
        read_header,
    )

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    config = _json(model_dir / "config.json")
    arch = architecture_of(config, what=f"the checkpoint in {model_dir.name}")
    d = dims(config)
    weights = sorted(p for p in model_dir.glob("*.safetensors") if p.name != "extras.safetensors")
    if not weights:
        raise ConfigError(f"{model_dir} has no *.safetensors weights")
    tensors: dict[str, Any] = {}
    for p in weights:
        for tname, entry in read_header(p).items():
            tensors[tname] = entry
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index).get("weight_map", {})
        absent = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if absent:
            raise ConfigError(f"the index names weight files that are missing: {absent[:3]}")
        unlisted = sorted(set(weight_map) - set(tensors))
        if unlisted:
            raise ConfigError(f"the index names tensors no file holds: {unlisted[:3]}")
    # An FP8 weight and its block scales are one parameter (the scales are not counted).
    what = f"the checkpoint in {model_dir.name}"
    sources = fp8_sources(tensors, fp8_block(config, what=what), what=what)
    counts: dict[str, int] = {}
    parameters = 0
    for source in sources.values():
        n = 1
        for s in source.shape:
            n *= s
        parameters += n
        counts[source.dtype] = counts.get(source.dtype, 0) + n
    fp8 = counts.pop(FP8_DTYPE, 0)
    floats = {k: v for k, v in counts.items() if k.startswith(("float", "bfloat"))}
    served = set(SERVED_DTYPES.values())
    if not floats or not set(floats) <= served:
        raise ConfigError(
            f"weights in {sorted(floats) or sorted(counts)}: served as they are are "
            f"{', '.join(sorted(served))} (and FP8 blocks of 128 x 128 with their scales)"
        )
    # An FP8 checkpoint is served dequantized to bf16 (the dtype its other weights and its
    # matmuls are published in).
    dtype = "bfloat16" if fp8 else max(floats, key=lambda k: floats[k])
    info: dict[str, Any] = {
        "format": CARD_FORMAT,
        "architecture": arch.model_type,
        "family": arch.families,
        "parameters": parameters,
        "dtype": dtype,
        "context_length": d.context_length,
        "layers": d.num_layers,
        "hidden_size": d.hidden_size,
        "attention_heads": d.num_heads,
        "kv_heads": d.num_kv_heads,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab_size,
        "tied_embeddings": d.tie_word_embeddings,
        "tensor_parallel": arch.tensor_parallel,
        "weight_files": len(weights),
    }
    if fp8:
        info["quantization"] = FP8_CARD
    info.update(_tokenizer_facts(model_dir, tokenizer, d.vocab_size))
    return info


def _tokenizer_facts(model_dir: Path, tokenizer: str, vocab_size: int) -> dict[str, Any]:
    from tpm_faas.tokenizer import ByteTokenizer, HFTokenizer

    if tokenizer == "bytes":
        tok = ByteTokenizer()
        if vocab_size < tok.vocab_size:
            raise ConfigError(
                f"byte-level ids need a vocabulary of {tok.vocab_size}; the model has {vocab_size}"
            )
        return {
            "tokenizer": "bytes",
            "tokenizer_vocab": tok.vocab_size,
            "bos_token_id": tok.bos_id,
            "eos_token_ids": [tok.eos_id],
            "chat_template": False,
        }
    if tokenizer != "auto":
        raise ConfigError(f"unknown tokenizer {tokenizer!r} (auto, bytes)")
    if not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(
            f"{model_dir} has no tokenizer.json; a model is served with its own tokenizer "
            "(say --tokenizer bytes only for a model trained on byte-level ids)"
        )
    hf = HFTokenizer(model_dir, vocab_size=vocab_size)
    if hf.vocab_size > vocab_size:
        raise ConfigError(
            f"the tokenizer knows {hf.vocab_size} ids but the model embeds {vocab_size}"
        )
    if not hf.eos_ids:
        raise ConfigError("neither generation_config.json nor the tokenizer names an EOS token")
    return {
        "tokenizer": "hf",
        "tokenizer_vocab": hf.vocab_size,
        "bos_token_id": hf.bos_id,
        "eos_token_ids": list(hf.eos_ids),
        "chat_template": hf.chat_template is not None,
        "token_str_json_max": hf.token_str_json_max,
        "text_json_per_token": hf.text_json_per_token,
    }


def import_checkpoint(
    source: Path, model: str, root: Path, *, tokenizer: str = "auto", copy: bool = False
) -> dict[str, Any]:
    """Make the checkpoint in ``source`` the model version ``model`` under ``root``.

    Checks it (:func:`describe`), then places its files in ``<root>/<name>/<version>/``
    (hard links where ``source`` is on the same filesystem and ``copy`` is false, else
    copies; the weights are never converted), writes the card with the checkpoint hash, and
    renames the finished directory into place: a version appears whole or not at all, and an
    existing version is never replaced.
    """
    name, version = split_ref(model)
    if version == LATEST:
        raise ConfigError(f"{model}: '{LATEST}' names the newest version; import a concrete one")
    source = source.resolve()
    if not source.is_dir():
        raise ConfigError(f"{source.name} is not a directory")
    info = describe(source, tokenizer=tokenizer)
    dest = root / name / version
    if dest.exists():
        raise ConfigError(f"model {model} already exists in {root}; versions are immutable")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{version}.import-"))
    try:
        files = [p for p in sorted(source.iterdir()) if p.is_file() and _taken(p)]
        for p in files:
            _place(p, tmp / p.name, copy=copy)
        info["checkpoint_sha256"] = checkpoint_sha256(tmp)
        card_ = {
            "name": name,
            "version": version,
            **info,
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "adapters": {},
            "heads": {},
        }
        (tmp / CARD).write_text(json.dumps(card_, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the version from the service accounts
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card_


def _taken(p: Path) -> bool:
    return p.name in CHECKPOINT_FILES or (
        p.suffix == ".safetensors" and p.name != "extras.safetensors"
    )


def _place(src: Path, dst: Path, *, copy: bool) -> None:
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(src, dst)


def versions(roots: Sequence[Path]) -> list[tuple[str, Path]]:
    """Every ``name@version`` in ``roots`` (the first root that has one wins), sorted."""
    seen: dict[str, Path] = {}
    for root in roots:
        if not Path(root).is_dir():
            continue
        for cfg in sorted(Path(root).glob("*/*/config.json")):
            d = cfg.parent
            ref = f"{d.parent.name}@{d.name}"
            if REF.fullmatch(ref) and ref not in seen:
                seen[ref] = d
    return sorted(seen.items())


def summary(model: str, model_dir: Path) -> dict[str, Any]:
    """One row of ``tpm-faas models list``: the card, or what the files say without one."""
    path = model_dir / CARD
    meta: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if "architecture" not in meta:  # a version not imported by models add
        try:
            config = _json(model_dir / "config.json")
            d = dims(config)
            meta = {
                **meta,
                "architecture": d.model_type,
                "context_length": d.context_length,
                "dtype": _config_dtype(config),
                "layers": d.num_layers,
                "hidden_size": d.hidden_size,
            }
        except ConfigError as e:
            meta = {**meta, "error": e.message}
    return {"model": model, **meta}


def _config_dtype(config: dict[str, Any]) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path.name} is missing") from None
    except ValueError as e:
        raise ConfigError(f"{path.name} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} is not a JSON object")
    return data
