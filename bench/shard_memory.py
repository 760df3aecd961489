"""Peak resident memory per rank when loading a model at tp=1 and tp=2 (shard-aware loading),
and a mixture of experts at ep=1 and ep=2 (expert parallelism).

Makes a random-weight Llama of about 135M parameters (fp32, 540 MB of safetensors) in a
temporary model root, starts a real shard group through Parsl at tp=1 and then at tp=2, and
reads each rank's peak RSS and checkpoint bytes read after loading (``ping``'s ``memory``).
The MoE rows do the same for a random-weight Qwen3-MoE of 107M parameters (16 experts of
which 2 per token in each of 8 layers; the experts are 94% of the weights) at tp=1 with ep=1,
then ep=2 (each rank holds half the experts), then tp=2 with ep=2 (attention split as well).
The baseline of each model is the same run's single rank. Prints a table and writes JSON
(``--out``).

    python bench/shard_memory.py [--only dense|moe] [--out bench/out/shard_memory.json]
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
MOE_MODEL = "bench-moe@1"


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


def make_moe_model(root: Path) -> tuple[int, int]:
    """A random Qwen3-MoE on the byte tokenizer; returns its parameters and routed experts'."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tpm_faas.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    shape: dict[str, Any] = dict(
        vocab_size=tok.vocab_size,
        hidden_size=512,
        moe_intermediate_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    cfg = Qwen3MoeConfig(**shape)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)  # type: ignore[no-untyped-call]
    out = root / "bench-moe" / "1"
    model.save_pretrained(out, safe_serialization=True)  # the published per-expert layout
    (out / "tpm_model.json").write_text('{"tokenizer": "bytes"}\n')
    params = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return params, experts


def measure(root: Path, home: Path, tp: int, ep: int = 1, model: str = MODEL) -> list[Any]:
    from tpm_faas.config import Settings
    from tpm_faas.launcher import ShardGroup

    settings = Settings.from_env({}, home=home, model_roots=(root,))
    runs = home / f"runs-tp{tp}-ep{ep}"
    with ShardGroup(model, tp, settings, runs, ep_size=ep) as group:
        memory: list[dict[str, Any]] = group.client().ping()["memory"]
    return memory


def _table(label: str, rows: dict[tuple[int, int], list[dict[str, Any]]]) -> None:
    base = rows[(1, 1)][0]
    print(
        f"{label:<6} {'tp':>3} {'ep':>3} {'rank':>5} {'weights read MB':>16} {'RSS MB':>8} "
        f"{'peak RSS MB':>12} {'peak / 1 rank':>14}"
    )
    for (tp, ep), ranks in rows.items():
        for m in ranks:
            ratio = m["peak_rss_mb"] / base["peak_rss_mb"]
            print(
                f"{label:<6} {tp:>3} {ep:>3} {m['rank']:>5} {m['weights_mb']:>16.1f} "
                f"{m['rss_mb']:>8.1f} {m['peak_rss_mb']:>12.1f} {ratio:>14.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/shard_memory.json"))
    p.add_argument("--only", choices=("dense", "moe"), help="one model (default: both)")
    a = p.parse_args(argv)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    fields: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tpm-mem-") as tmp:
        root = Path(tmp) / "models"
        if a.only in (None, "dense"):
            params = make_model(root)
            dense = {(tp, 1): measure(root, Path(tmp) / f"home{tp}", tp) for tp in (1, 2)}
            _table("dense", dense)
            fields["model"] = {"name": MODEL, "parameters": params, "dtype": "float32"}
            fields["ranks"] = {str(tp): ranks for (tp, _), ranks in dense.items()}
        if a.only in (None, "moe"):
            params, experts = make_moe_model(root)
            moe = {
                (tp, ep): measure(root, Path(tmp) / f"moe{tp}{ep}", tp, ep, MOE_MODEL)
                for tp, ep in ((1, 1), (1, 2), (2, 2))
            }
            _table("moe", moe)
            fields["moe_model"] = {
                "name": MOE_MODEL,
                "parameters": params,
                "routed_expert_parameters": experts,
                "dtype": "float32",
            }
            fields["moe_ranks"] = {f"tp{tp}-ep{ep}": r for (tp, ep), r in moe.items()}
    write(record("shard_memory", **fields), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
