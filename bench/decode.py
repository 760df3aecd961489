"""Decode throughput of the serving runtime against ``transformers`` ``generate()``, same run.

For each model (the trained demo model, and a random-weight Llama of tens of millions of
parameters) and dtype, on this machine's CPU:

* **HF generate, batch 1**: ``model.generate`` greedy, ``max_new_tokens`` forced (baseline);
* **ours, batch 1**: one request through the scheduler and decoder that rank 0 runs;
* **ours, one by one**: 8 requests served sequentially (the serial baseline for batching);
* **ours, 8 concurrent**: the same 8 requests submitted together (iteration-level batching).

Figures are generated tokens per second (prefill included, as a user sees it), best of
``--repeats``. Ratios: ours b1 / HF b1 (target >= 1.0) and 8 concurrent / one by one (target
>= 2). Prints a table and writes JSON (``--out``). GPU rows need a CUDA device and are skipped
here otherwise; ``--gpu-only`` runs just them (``bench/gpu.sh``).

    python bench/decode.py [--tokens 64] [--repeats 3] [--gpu-only] [--out bench/out/decode.json]
"""

from __future__ import annotations

import argparse
import os
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
            body = {"prompts": [p], "max_new_tokens": tokens, "stop_at_eos": False}
            sched.submit(i, str(i), body)
        while sched.busy:
            sched.step()

    t_hf = best(hf_b1, repeats)
    t_b1 = best(lambda: serve(PROMPTS[:1]), repeats)
    t_serial = best(lambda: [serve([p]) for p in PROMPTS], repeats)
    t_conc = best(lambda: serve(PROMPTS), repeats)
    return {
        "hf_generate_b1_tok_s": tokens / t_hf,
        "ours_b1_tok_s": tokens / t_b1,
        "ours_one_by_one_tok_s": n * tokens / t_serial,
        "ours_8_concurrent_tok_s": n * tokens / t_conc,
        "ratio_b1_vs_hf": t_hf / t_b1,
        "ratio_concurrent_vs_one_by_one": t_serial / t_conc,
        "ratio_concurrent_vs_hf_serial": n * t_hf / t_conc,
    }


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
                body = {"prompts": [PROMPTS[i % len(PROMPTS)]], "max_new_tokens": tokens}
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


def run(tokens: int, repeats: int, gpu_only: bool = False) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    cases = (
        []
        if gpu_only
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
    return record(
        "decode",
        torch_threads=torch.get_num_threads(),
        gpu=gpu_rows(tokens, repeats) if torch.cuda.is_available() else "skipped: no CUDA device",
        tokens=tokens,
        repeats=repeats,
        rows=rows,
    )


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'model':<20} {'dtype':<9} {'HF b1':>8} {'ours b1':>8} {'x HF':>6} "
        f"{'1-by-1':>8} {'8 conc':>8} {'x 1-by-1':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<20} {r['dtype']:<9} {r['hf_generate_b1_tok_s']:>8.0f} "
            f"{r['ours_b1_tok_s']:>8.0f} {r['ratio_b1_vs_hf']:>6.2f} "
            f"{r['ours_one_by_one_tok_s']:>8.0f} {r['ours_8_concurrent_tok_s']:>8.0f} "
            f"{r['ratio_concurrent_vs_one_by_one']:>9.2f}"
        )
    lines.append("(tok/s; 'x HF' and 'x 1-by-1' are ratios measured in this run)")
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
    a = p.parse_args(argv)
    result = run(a.tokens, a.repeats, a.gpu_only)
    print(table(result))
    write(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
