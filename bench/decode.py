"""Decode throughput of the serving runtime against ``transformers`` ``generate()``, same run.

For each model (the trained demo model, and a random-weight Llama of tens of millions of
parameters) and dtype, on this machine's CPU:

* **HF generate, batch 1**: ``model.generate`` greedy, ``max_new_tokens`` forced (baseline);
* **ours, batch 1**: one request through the scheduler and decoder that rank 0 runs;
* **ours, one by one**: 8 requests served sequentially (the serial baseline for batching);
* **ours, 8 concurrent**: the same 8 requests submitted together (iteration-level batching).

Then the same four figures for each served family (``llama``, ``llama3.1`` with ``llama3``
RoPE scaling, ``mistral``, ``qwen2``, ``qwen3``, ``gpt2``, and the mixtures of experts
``mixtral``, ``qwen3_moe``, ``deepseek_v3``, ``kimi_k2``): a random-weight model of the family's
shape from ``tests/_families.py`` (4 layers, width 256, fp32, byte vocabulary; 8 experts of
which 2 per token for the mixtures of experts).

Figures are generated tokens per second (prefill included, as a user sees it), best of
``--repeats``, the contenders of a row timed in turn (so a busy machine slows all of them
alike). Ratios: ours b1 / HF b1 (target >= 1.0) and 8 concurrent / one by one (target >= 2).
Prints a table and writes JSON (``--out``). GPU rows need a CUDA device and are skipped here
otherwise; ``--gpu-only`` runs just them (``bench/gpu.sh``), ``--families-only`` just the
family rows, ``--families a,b`` just those families' rows.

    python bench/decode.py [--tokens 64] [--repeats 3] [--threads N] [--gpu-only]
                           [--families-only] [--families mixtral,qwen3_moe]
                           [--out bench/out/decode.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import best, llama3_8b, random_llama, record, write
from transformers import AutoModelForCausalLM

from tpm_faas.config import BUNDLED_MODELS
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.scheduler import Scheduler
from tpm_faas.tokenizer import ByteTokenizer

PROMPTS = [
    "And God said, Let there be light: and there was light.",
    "In the beginning God created the heaven and the earth.",
    "And Abraham rose up early in the morning,",
    "And it came to pass after these things, that God did tempt Abraham,",
    "Now the serpent was more subtil than any beast of the field",
    "And Jacob went out from Beersheba, and went toward Haran.",
    "These are the generations of the sons of Noah, Shem, Ham, and Japheth:",
    "And the LORD said unto Noah, Come thou and all thy house into the ark;",
]


#: Every family at one benchmark size (the test fixtures' kinds: GQA, RoPE scaling, biases,
#: q/k norms, tying), with room for the longest prompt plus the generated tokens.
LLAMA_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
}
FAMILY_SHAPES: dict[str, dict[str, Any]] = {
    "llama": LLAMA_SHAPE,
    "llama3.1": LLAMA_SHAPE,
    "mistral": {**LLAMA_SHAPE, "sliding_window": 512},
    "qwen2": LLAMA_SHAPE,
    "qwen3": LLAMA_SHAPE,
    "gpt2": {"n_embd": 256, "n_layer": 4, "n_head": 8, "n_positions": 512},
}
#: The mixtures of experts at the same width: 8 experts of a quarter of the dense MLP's width,
#: 2 per token (Qwen3-MoE's first layer and DeepSeek's first layer dense); MLA with the ratios
#: of DeepSeek-V3 (values and non-rotary key parts of a head's width, half of it rotary).
MOE = {"intermediate_size": 688, "num_experts_per_tok": 2}
MLA_SHAPE = {
    **MOE,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "moe_intermediate_size": 172,
    "n_routed_experts": 8,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 512,
}
FAMILY_SHAPES.update(
    {
        "mixtral": {
            **LLAMA_SHAPE,
            **MOE,
            "intermediate_size": 172,
            "num_local_experts": 8,
            "sliding_window": None,
        },
        "qwen3_moe": {
            **LLAMA_SHAPE,
            **MOE,
            "moe_intermediate_size": 172,
            "num_experts": 8,
            "mlp_only_layers": [0],
        },
        "deepseek_v3": {
            **MLA_SHAPE,
            "n_group": 4,
            "topk_group": 2,
            "rope_scaling": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        },
        "kimi_k2": {
            **MLA_SHAPE,
            "rope_scaling": {
                "rope_type": "yarn",
                "rope_theta": 50000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 1.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        },
    }
)


def family_model(family: str) -> Any:
    """The family's random-weight model at the benchmark size (``tests/_families.py``)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from _families import random_model

    return random_model(family, **FAMILY_SHAPES[family])


def demo_model(dtype: torch.dtype) -> Any:
    return AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODELS / "demo-tpm" / "1", dtype=dtype
    ).eval()


def measure(model: Any, tokens: int, repeats: int) -> dict[str, float]:
    tok = ByteTokenizer()
    ids = tok.encode(PROMPTS[0])
    n = len(PROMPTS)

    @torch.inference_mode()
    def hf_b1() -> None:
        model.generate(
            torch.tensor([ids]),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tok.pad_id,
        )

    sched = Scheduler(Decoder(model, slots=n, max_len=512).run_plan, slots=n, max_len=512)

    def serve(prompts: list[str]) -> None:
        for i, p in enumerate(prompts):
            body = {"prompt_ids": [tok.encode(p)], "max_new_tokens": tokens, "stop_at_eos": False}
            sched.submit(i, str(i), body)
        while sched.busy:
            sched.step()

    t = best_in_turn(
        {
            "hf": hf_b1,
            "b1": lambda: serve(PROMPTS[:1]),
            "serial": lambda: [serve([p]) for p in PROMPTS],
            "conc": lambda: serve(PROMPTS),
        },
        repeats,
    )
    return {
        "hf_generate_b1_tok_s": tokens / t["hf"],
        "ours_b1_tok_s": tokens / t["b1"],
        "ours_one_by_one_tok_s": n * tokens / t["serial"],
        "ours_8_concurrent_tok_s": n * tokens / t["conc"],
        "ratio_b1_vs_hf": t["hf"] / t["b1"],
        "ratio_concurrent_vs_one_by_one": t["serial"] / t["conc"],
        "ratio_concurrent_vs_hf_serial": n * t["hf"] / t["conc"],
    }


def best_in_turn(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` timed calls of each function (after one warm-up call each),
    calling them in turn, so load from elsewhere falls on every contender alike."""
    for fn in fns.values():
        fn()
    times: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)
    return times


def copy_bandwidth(repeats: int, nbytes: int = 2 << 30) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    return 2 * nbytes / best(copy, repeats)


def gpu_rows(tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Llama-3-8B shape, random bf16 weights, one CUDA device: batch 1 and 16 vs roofline."""
    model = llama3_8b()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Roofline: device-to-device copy bandwidth (read + write) over the weight bytes.
    bandwidth = copy_bandwidth(repeats)
    roofline = bandwidth / weight_bytes
    ids = ByteTokenizer().encode(PROMPTS[0])

    @torch.inference_mode()
    def hf_b1() -> None:
        x = torch.tensor([ids], device="cuda")
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()

    rows = []
    t_hf = best(hf_b1, repeats)
    for batch in (1, 16):
        dec = Decoder(model, slots=batch, max_len=512, cuda_graphs=True)
        sched = Scheduler(dec.run_plan, slots=batch, max_len=512)

        def serve(n: int = batch, s: Scheduler = sched) -> None:
            for i in range(n):
                ids = ByteTokenizer().encode(PROMPTS[i % len(PROMPTS)])
                body = {"prompt_ids": [ids], "max_new_tokens": tokens}
                s.submit(i, str(i), {**body, "stop_at_eos": False})
            while s.busy:
                s.step()
            torch.cuda.synchronize()

        t = best(serve, repeats)
        rate = batch * tokens / t
        rows.append(
            {
                "model": "Llama-3-8B shape (random)",
                "dtype": "bfloat16",
                "batch": batch,
                "ours_tok_s": rate,
                "hf_generate_eager_b1_tok_s": tokens / t_hf,
                "roofline_b1_tok_s": roofline,
                "fraction_of_roofline": rate / batch / roofline if batch == 1 else None,
                "copy_bandwidth_gb_s": bandwidth / 1e9,
            }
        )
        del dec, sched
    return rows


def run(
    tokens: int,
    repeats: int,
    gpu_only: bool = False,
    families_only: bool = False,
    threads: int | None = None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    rows = []
    cases = (
        []
        if gpu_only or families_only or only
        else [
            ("demo-tpm@1 (3.1M)", demo_model, torch.float32),
            ("demo-tpm@1 (3.1M)", demo_model, torch.bfloat16),
            ("random Llama (38M)", random_llama, torch.float32),
        ]
    )
    for name, make, dtype in cases:
        model = make(dtype)
        params = sum(p.numel() for p in model.parameters())
        row = {"model": name, "parameters": params, "dtype": str(dtype).removeprefix("torch.")}
        row.update(measure(model, tokens, repeats))
        rows.append(row)
        print(f"  measured {name} {row['dtype']}", flush=True)
    families = []
    for family in [] if gpu_only else (only or FAMILY_SHAPES):
        model = family_model(family)
        params = sum(p.numel() for p in model.parameters())
        row = {
            "model": f"{family} ({params / 1e6:.1f}M)",
            "family": family,
            "model_type": model.config.model_type,
            "parameters": params,
            "dtype": "float32",
            "shape": FAMILY_SHAPES[family],
        }
        row.update(measure(model, tokens, repeats))
        families.append(row)
        print(f"  measured family {family}", flush=True)
    return record(
        "decode",
        torch_threads=torch.get_num_threads(),
        gpu=gpu_rows(tokens, repeats) if torch.cuda.is_available() else "skipped: no CUDA device",
        tokens=tokens,
        repeats=repeats,
        rows=rows,
        families=families,
    )


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'model':<20} {'dtype':<9} {'HF b1':>8} {'ours b1':>8} {'x HF':>6} "
        f"{'1-by-1':>8} {'8 conc':>8} {'x 1-by-1':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in [*result["rows"], *result.get("families", [])]:
        lines.append(
            f"{r['model']:<20} {r['dtype']:<9} {r['hf_generate_b1_tok_s']:>8.0f} "
            f"{r['ours_b1_tok_s']:>8.0f} {r['ratio_b1_vs_hf']:>6.2f} "
            f"{r['ours_one_by_one_tok_s']:>8.0f} {r['ours_8_concurrent_tok_s']:>8.0f} "
            f"{r['ratio_concurrent_vs_one_by_one']:>9.2f}"
        )
    lines.append(
        f"(tok/s, {result['torch_threads']} torch threads; 'x HF' and 'x 1-by-1' are ratios "
        "measured in this run)"
    )
    if isinstance(result["gpu"], list):
        for g in result["gpu"]:
            frac = g["fraction_of_roofline"]
            lines.append(
                f"GPU {g['model']} batch {g['batch']}: {g['ours_tok_s']:.0f} tok/s "
                f"(HF eager b1 {g['hf_generate_eager_b1_tok_s']:.1f}; roofline b1 "
                f"{g['roofline_b1_tok_s']:.0f}"
                + (f", {100 * frac:.0f}% of it)" if frac is not None else ")")
            )
    else:
        lines.append(f"GPU: {result['gpu']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/out/decode.json"))
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU rows (bench/gpu.sh)")
    p.add_argument("--families-only", action="store_true", help="only the family rows (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--families", default="", help="only these family rows, comma-separated")
    a = p.parse_args(argv)
    only = [f for f in a.families.split(",") if f]
    unknown = sorted(set(only) - set(FAMILY_SHAPES))
    if unknown:
        p.error(f"unknown families {unknown}; known: {', '.join(FAMILY_SHAPES)}")
    result = run(a.tokens, a.repeats, a.gpu_only, a.families_only, a.threads, only)
    print(table(result))
    write(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
