"""Peak resident memory per rank when loading a model at tp=1 and tp=2 (shard-aware loading).

Makes a random-weight Llama of about 135M parameters (fp32, 540 MB of safetensors) in a
temporary model root, starts a real shard group through Parsl at tp=1 and then at tp=2, and
reads each rank's peak RSS and checkpoint bytes read after loading (``ping``'s ``memory``).
The baseline is the same run's tp=1 rank. Prints a table and writes JSON (``--out``).

    python bench/shard_memory.py [--out bench/out/shard_memory.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import record, write

MODEL = "bench-random@1"


def make_model(root: Path) -> int:
    import torch
    from transformers import LlamaForCausalLM

    from tpm_faas.runtime.arch import byte_llama_config

    cfg = byte_llama_config(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = root / "bench-random" / "1"
    model.save_pretrained(out, safe_serialization=True)
    (out / "tpm_model.json").write_text('{"tokenizer": "bytes"}\n')  # byte-level ids
    return sum(p.numel() for p in model.parameters())


def measure(root: Path, home: Path, tp: int) -> list[dict[str, Any]]:
    from tpm_faas.config import Settings
    from tpm_faas.launcher import ShardGroup

    settings = Settings.from_env({}, home=home, model_roots=(root,))
    with ShardGroup(MODEL, tp, settings, home / f"runs-tp{tp}") as group:
        memory: list[dict[str, Any]] = group.client().ping()["memory"]
    return memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/shard_memory.json"))
    a = p.parse_args(argv)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    with tempfile.TemporaryDirectory(prefix="tpm-mem-") as tmp:
        root = Path(tmp) / "models"
        params = make_model(root)
        rows = {tp: measure(root, Path(tmp) / f"home{tp}", tp) for tp in (1, 2)}
    base = rows[1][0]
    print(
        f"{'tp':>3} {'rank':>5} {'weights read MB':>16} {'RSS MB':>8} {'peak RSS MB':>12} "
        f"{'peak / tp=1':>12}"
    )
    for tp, ranks in rows.items():
        for m in ranks:
            ratio = m["peak_rss_mb"] / base["peak_rss_mb"]
            print(
                f"{tp:>3} {m['rank']:>5} {m['weights_mb']:>16.1f} {m['rss_mb']:>8.1f} "
                f"{m['peak_rss_mb']:>12.1f} {ratio:>12.2f}"
            )
    result = record(
        "shard_memory",
        model={"name": MODEL, "parameters": params, "dtype": "float32"},
        ranks={str(tp): ranks for tp, ranks in rows.items()},
    )
    write(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
