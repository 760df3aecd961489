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
