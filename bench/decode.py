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

``--moe-gpu`` runs only the mixture-of-experts GPU row (``bench/gpu.sh``): a random-weight
Qwen3-MoE of 5.8B parameters (``_common.MOE_SHAPE``: 16 layers, 64 experts of which 8 per
token), bf16, built on the GPU; decode tok/s at batch 1 and 16 through the scheduler and
decoder, each against the roofline of the bytes a decode step must read: the non-expert
weights plus the experts the batch's tokens are routed to (distinct experts per layer and
step counted by hooks on the routers in a ``generate()`` of the same prompts; the uniform
routing expectation ``E * (1 - (1 - k/E)^b)`` beside it), over the device's HBM bandwidth
(from its name, or ``--hbm-gbs``). ``--tiny`` builds a small model of the same kind instead,
which also runs on a CPU (a smoke run of the code path; its figures are not results).

    python bench/decode.py [--tokens 64] [--repeats 3] [--threads N] [--gpu-only]
                           [--families-only] [--families mixtral,qwen3_moe]
                           [--moe-gpu [--tiny] [--hbm-gbs 3350]]
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
from _common import (
    MOE_SHAPE,
    MOE_TINY_SHAPE,
    best,
    llama3_8b,
    random_llama,
    random_moe,
    record,
    write,
)
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


#: HBM bandwidth in GB/s from the data sheets, by a piece of the device's name (first match).
HBM_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)


def hbm_gbs(name: str) -> float | None:
    """The HBM bandwidth (GB/s) of a device named ``name``, if :data:`HBM_GBS` knows it."""
    return next((gbs for key, gbs in HBM_GBS if key in name), None)


def distinct_experts(model: Any, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Experts the decode steps of a greedy ``generate()`` of ``prompts`` (one batch, left
    padded) are routed to: for each decode step, the number of distinct experts per MoE
    layer over the batch's tokens. Read from hooks on the models' routers (``*TopKRouter``,
    whose outputs end with the chosen indices), so this is ``transformers``' routing of the
    same model and prompts, not a count inside the decoder (which a CUDA graph replays)."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    pad = ByteTokenizer().pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    if not routers:
        raise RuntimeError(f"no *TopKRouter module in {type(model).__name__}")
    chosen: list[list[torch.Tensor]] = [[] for _ in routers]

    def hook(layer: int) -> Callable[..., None]:
        def record_choice(_m: Any, _a: Any, out: Any) -> None:
            index = out[-1]
            if index.shape[0] == batch:  # a decode step (one token per sequence)
                chosen[layer].append(index.detach().clone())

        return record_choice

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        with torch.inference_mode():
            model.generate(
                ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad,
            )
    finally:
        for h in handles:
            h.remove()
    steps = min(len(c) for c in chosen)
    return [[int(c[s].unique().numel()) for c in chosen] for s in range(steps)]


def moe_bytes(model: Any) -> dict[str, Any]:
    """What a decode step of ``model`` may read, in parameters: the experts (their count per
    layer, one expert's size, the layers that have them), the input embedding (a step reads
    only its tokens' rows) and everything else (read whole at every step)."""
    expert_params = embed_params = total = 0
    moe_layers: set[str] = set()
    experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name:
            expert_params += p.numel()
            moe_layers.add(name.split(".experts.")[0])
            experts = p.shape[0]
        elif p is model.get_input_embeddings().weight:
            embed_params += p.numel()
    return {
        "parameters": total,
        "expert_parameters": expert_params,
        "embedding_parameters": embed_params,
        "non_expert_parameters": total - expert_params - embed_params,
        "moe_layers": len(moe_layers),
        "experts": experts,
        "params_per_expert": expert_params // max(len(moe_layers) * experts, 1),
        "bytes_per_param": next(model.parameters()).element_size(),
    }


def serve_timed(
    sched: Scheduler, prompts: list[list[int]], tokens: int
) -> tuple[float, float, int]:
    """Serve one request of ``tokens`` new tokens per prompt, all submitted together: (seconds
    in all, seconds of the decode steps after the first, those steps). Raises if a request
    failed."""
    for i, ids in enumerate(prompts):
        body = {"prompt_ids": [ids], "max_new_tokens": tokens, "stop_at_eos": False}
        sched.submit(i, str(i), body)
    t0 = time.perf_counter()
    out = sched.step()  # every prefill, then the first decode step
    sync()
    t1 = time.perf_counter()
    steps = 0
    while sched.busy:
        out += sched.step()
        steps += 1
    sync()
    t2 = time.perf_counter()
    failed = [r["error"] for _, r in out if not r["ok"]]
    if failed or len(out) != len(prompts):
        raise RuntimeError(f"{len(out)} of {len(prompts)} requests answered; {failed[:1]}")
    return t2 - t0, t2 - t1, steps


def sync() -> None:
    """Wait for the CUDA device, if there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def moe_rows(
    tokens: int,
    repeats: int,
    tiny: bool = False,
    hbm: float | None = None,
    batches: tuple[int, ...] = (1, 16),
) -> dict[str, Any]:
    """The MoE row: decode tok/s of the random-weight MoE at each batch size through the
    scheduler and decoder, against the roofline of the bytes each step reads (see the module
    docstring). On a CUDA device in bf16, on a CPU (``tiny`` only) in fp32; the decode step
    CUDA-graphed or eager as the decoder chooses by default (eager instead if its capture
    fails; both recorded)."""
    if tokens < 3:
        raise ValueError("--tokens must be at least 3 (prefill, first decode step, then timed)")
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not tiny:
        raise SystemExit("the MoE row needs a CUDA device (or --tiny for a CPU smoke run)")
    shape = MOE_TINY_SHAPE if tiny else MOE_SHAPE
    dev = "cuda" if cuda else "cpu"
    model = random_moe(shape, torch.bfloat16 if cuda else torch.float32, dev)
    sizes = moe_bytes(model)
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    hbm_source = "--hbm-gbs" if hbm is not None else "data sheet, by device name"
    hbm = hbm if hbm is not None else hbm_gbs(name)
    copy_gbs = copy_bandwidth(repeats, 1 << 30) / 1e9 if cuda else None
    print(f"  MoE model built in {time.perf_counter() - t_start:.1f} s: {sizes}", flush=True)

    n_exp, k = shape["num_experts"], shape["num_experts_per_tok"]
    tok = ByteTokenizer()
    per_param = sizes["bytes_per_param"]
    expert_bytes = sizes["params_per_expert"] * per_param
    prompts_of = {b: [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(b)] for b in batches}
    # Routing first, on the model as built, before any decoder holds it.
    t0 = time.perf_counter()
    routed = {b: distinct_experts(model, prompts_of[b], tokens) for b in batches}
    print(f"  routing counted in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for batch in batches:
        prompts, counts = prompts_of[batch], routed[batch]
        flat = [c for step in counts for c in step]
        hit = sum(flat) / len(flat)
        uniform = n_exp * (1 - (1 - k / n_exp) ** batch)

        def step_bytes(experts_hit: float, b: int = batch) -> float:
            reads = sizes["non_expert_parameters"] + b * shape["hidden_size"]  # embedding rows
            return (reads + sizes["moe_layers"] * experts_hit * sizes["params_per_expert"]) * (
                per_param
            )

        graph_error = None
        t0 = time.perf_counter()
        # The decoder's own choice of CUDA-graph decode, as rank 0 serves (recorded).
        dec = Decoder(model, slots=batch, max_len=512)
        sched = Scheduler(dec.run_plan, slots=batch, max_len=512)
        graphs = dec.cuda_graphs

        try:
            serve_timed(sched, prompts, tokens)  # warm-up: captures the CUDA graph
        except RuntimeError as e:
            if not graphs:
                raise
            graph_error = f"{type(e).__name__}: {e}"[:500]
            print(f"  CUDA-graph decode failed, eager instead: {graph_error}", flush=True)
            graphs = False
            del dec, sched
            dec = Decoder(model, slots=batch, max_len=512, cuda_graphs=False)
            sched = Scheduler(dec.run_plan, slots=batch, max_len=512)
            serve_timed(sched, prompts, tokens)
        runs = [serve_timed(sched, prompts, tokens) for _ in range(repeats)]
        total_s = min(r[0] for r in runs)
        decode_s, steps = min((r[1], r[2]) for r in runs)
        print(f"  decode b{batch} timed in {time.perf_counter() - t0:.1f} s", flush=True)
        rate = batch * steps / decode_s
        measured_bytes, uniform_bytes = step_bytes(hit), step_bytes(uniform)
        roof = batch * hbm * 1e9 / measured_bytes if hbm else None
        rows.append(
            {
                "batch": batch,
                "decode_tok_s": rate,
                "tok_s_prefill_included": batch * tokens / total_s,
                "decode_steps_timed": steps,
                "cuda_graphs": graphs,
                "cuda_graph_error": graph_error,
                "experts_hit_per_layer_mean": hit,
                "experts_hit_per_layer_min": min(flat),
                "experts_hit_per_layer_max": max(flat),
                "experts_hit_steps_counted": len(counts),
                "experts_hit_uniform_expectation": uniform,
                "bytes_per_step": measured_bytes,
                "bytes_per_step_uniform": uniform_bytes,
                "roofline_tok_s": roof,
                "roofline_uniform_tok_s": batch * hbm * 1e9 / uniform_bytes if hbm else None,
                "fraction_of_roofline": rate / roof if roof else None,
                "roofline_copy_bandwidth_tok_s": (
                    batch * copy_gbs * 1e9 / measured_bytes if copy_gbs else None
                ),
            }
        )
        del dec, sched
        if cuda:
            torch.cuda.empty_cache()
    return record(
        "decode_moe",
        model=(
            f"Qwen3-MoE shape{' (tiny)' if tiny else ''}, random "
            f"({sizes['parameters'] / 1e6:,.1f}M; {n_exp} experts, {k} per token)"
        ),
        shape=shape,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device_name=name,
        hbm_gb_s=hbm,
        hbm_source=hbm_source if hbm is not None else "unknown device: pass --hbm-gbs",
        copy_bandwidth_gb_s=copy_gbs,
        expert_bytes=expert_bytes,
        tokens=tokens,
        repeats=repeats,
        seconds=time.perf_counter() - t_start,
        **sizes,
        rows=rows,
        notes=(
            "decode_tok_s: batch x decode steps / their seconds, the steps after the first "
            "(prefills and first step excluded), best of repeats. Roofline: batch x HBM "
            "bandwidth / bytes per step; bytes per step = (non-expert parameters + the "
            "batch's embedding rows + MoE layers x distinct experts hit per layer x "
            "parameters per expert) x bytes per parameter; KV-cache reads left out (at most "
            "tokens + prompt positions per sequence). Experts hit: counted per layer and "
            "decode step in transformers' generate() of the same prompts (hooks on the "
            "routers); uniform expectation E * (1 - (1 - k/E)^batch) beside it."
        ),
    )


def moe_table(result: dict[str, Any]) -> str:
    """The MoE row as lines of text."""
    hbm = result["hbm_gb_s"]
    lines = [
        f"{result['model']}, {result['dtype']}, {result['device_name']}: "
        f"{result['non_expert_parameters'] / 1e6:,.1f}M non-expert parameters (embedding "
        f"aside), "
        f"{result['moe_layers']} MoE layers x {result['experts']} experts of "
        f"{result['params_per_expert'] / 1e6:.2f}M; HBM {hbm} GB/s ({result['hbm_source']})"
    ]
    for r in result["rows"]:
        roof = r["roofline_tok_s"]
        lines.append(
            f"  batch {r['batch']:>2}: decode {r['decode_tok_s']:.0f} tok/s "
            f"({r['tok_s_prefill_included']:.0f} with prefill; "
            f"{'CUDA graph' if r['cuda_graphs'] else 'eager'}); experts hit per layer "
            f"{r['experts_hit_per_layer_mean']:.1f} "
            f"(uniform {r['experts_hit_uniform_expectation']:.1f}), "
            f"{r['bytes_per_step'] / 1e9:.3f} GB/step; "
            + (
                f"roofline {roof:.0f} tok/s, {100 * r['fraction_of_roofline']:.0f}% of it"
                if roof
                else "no roofline (unknown HBM bandwidth)"
            )
        )
    return "\n".join(lines)


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
    p.add_argument("--moe-gpu", action="store_true", help="only the MoE GPU row (bench/gpu.sh)")
    p.add_argument("--tiny", action="store_true", help="MoE row: a tiny model (CPU smoke run)")
    p.add_argument("--hbm-gbs", type=float, default=None, help="MoE row: HBM bandwidth, GB/s")
    a = p.parse_args(argv)
    if a.moe_gpu:
        torch.set_num_threads(a.threads or os.cpu_count() or 1)
        moe = moe_rows(a.tokens, a.repeats, a.tiny, a.hbm_gbs)
        print(moe_table(moe))
        write(moe, a.out)
        return 0
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
