"""What every benchmark records: when, where, with which versions; and where it writes."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

DISTS = ("tpm-faas", "torch", "transformers", "deepspeed", "globus-compute-endpoint", "parsl")


def record(benchmark: str, **fields: Any) -> dict[str, Any]:
    """A result record: the benchmark's name, date, device and versions, then ``fields``."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device(),
        "versions": {"python": platform.python_version(), **versions()},
        **fields,
    }


def versions() -> dict[str, str]:
    """Versions of :data:`DISTS` installed here (a GPU machine may lack some: skipped)."""
    out = {}
    for d in DISTS:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            continue
    return out


def device() -> str:
    """The CPU, and the CUDA device when there is one."""
    cpu = f"CPU: {platform.machine()}, {os.cpu_count()} cores"
    try:
        import torch
    except ImportError:
        return cpu
    if not torch.cuda.is_available():
        return cpu
    props = torch.cuda.get_device_properties(0)
    return (
        f"{cpu}; GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def write(result: dict[str, Any], out: Path) -> None:
    """Write ``result`` as JSON to ``out`` and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


def best(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (after one warm-up call), in seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_llama(dtype: Any, positions: int = 512) -> Any:
    """A Llama of about 38M parameters with random weights (byte vocabulary)."""
    import torch
    from transformers import LlamaForCausalLM

    from tpm_faas.runtime.arch import byte_llama_config

    cfg = byte_llama_config(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=positions,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def llama3_8b(device: str = "cuda") -> Any:
    """The Llama-3-8B shape with random bf16 weights, built on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


#: A Qwen3-MoE of a few billion parameters: Qwen3-30B-A3B's layer (width 2048, 32 query heads
#: over 4 of 128, experts of width 768, 8 per token, its vocabulary, untied embeddings) with
#: 64 experts instead of 128 and 16 layers instead of 48: 5.8B parameters (11.5 GB in bf16),
#: 1.2B of them read per token at batch 1.
MOE_SHAPE: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
#: The same kind of model at a size a CPU builds and decodes in seconds (smoke runs only).
MOE_TINY_SHAPE: dict[str, Any] = {
    **MOE_SHAPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 512,
}


def random_moe(shape: dict[str, Any], dtype: Any, device: str = "cuda") -> Any:
    """A ``Qwen3MoeForCausalLM`` of ``shape`` with random weights, built on ``device`` in
    ``dtype`` (no float32 copy on the way)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)  # type: ignore[no-untyped-call]
    return model.eval()
