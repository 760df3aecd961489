"""What interventions cost in the serving runtime, against the same runs without them.

Two workloads, each measured in one run as a ratio to its own baseline:

* **capture**: a long prefill that saves every layer's ``hook_resid_post`` at every position
  (what a probe-training or logit-lens sweep asks for), against the same prefill with no spec.
  Timed until the saved values are on the host. Reference row: ``transformers`` forward with
  eager module hooks that copy each layer's output to the host, against the plain forward.
* **steering**: batch-1 generation with an ``add`` at every layer's ``hook_resid_post`` on
  the prompt and every generated token, against plain generation (decode tokens per second
  from the runtime's own timing). Reference row: ``transformers`` ``generate()`` with eager
  forward hooks adding the vector, against plain ``generate()``.

Overhead = time with / time without - 1. Targets (GPU): <= 2 % each. On CPU there is no copy to
overlap and no graph to capture, so the CPU rows measure the cost of the tensor ops themselves.
GPU rows (Llama-3-8B shape, bf16, prefill 2048) need a CUDA device and are skipped otherwise.

    python bench/interventions.py [--repeats 5] [--gpu-only] [--out bench/out/interventions.json]
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
from tpm_faas.modes import MODES
from tpm_faas.policy import Limits
from tpm_faas.protocol.requests import InterveneRequest
from tpm_faas.registry import ModelInfo
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.scheduler import Scheduler
from tpm_faas.tokenizer import ByteTokenizer

TEXT = (BUNDLED_MODELS.parent / "corpus" / "kjv-genesis.txt").read_text()
LIMITS = Limits(
    max_prompt_tokens=1 << 20,
    max_new_tokens=1 << 20,
    max_bytes_returned=1 << 40,
    max_hook_sites=1 << 20,
    allowed_ops=["save", "add"],
    write=True,
)


def info(model: Any) -> ModelInfo:
    c = model.config
    return ModelInfo(
        name="bench@1",
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        vocab_size=c.vocab_size,
        max_positions=c.max_position_embeddings,
        tokenizer="bytes",
        checkpoint_sha256="0" * 64,
        dtype="float32",
        architecture=c.model_type,
        num_heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
    )


def spec(model: Any, prompt: str, ops: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    req = InterveneRequest.model_validate({"model": "bench@1", "prompt": prompt, "ops": ops, **kw})
    return MODES["intervene"].admit(req, info(model), LIMITS).body


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def capture(model: Any, prefill: int, repeats: int) -> dict[str, Any]:
    """Save every layer's resid_post at every position of a ``prefill``-token prompt."""
    dev = next(model.parameters()).device
    prompt = TEXT[: prefill - 1]  # the byte tokenizer adds BOS
    ids = ByteTokenizer().encode(prompt)
    n_layers = model.config.num_hidden_layers
    body = spec(model, prompt, [{"op": "save", "site": "hook_resid_post", "layers": "*"}])
    dec = Decoder(model, slots=1, max_len=len(ids) + 1)

    def plain() -> None:
        dec.prefill(0, ids)
        sync(dev)

    def ours() -> None:
        dec.run_plan(
            {"op": "prefill", "slot": 0, "ids": ids, "iv": {"request": 1, "index": 0, "spec": body}}
        )
        # Waits for the side-stream copies; leaves the values as host tensors.
        out = dec.release(1, encode=False)
        assert out is not None and len(out[0]["saved"]) == n_layers

    captured: list[torch.Tensor] = []

    def hooks(layer: Any) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            h = out[0] if isinstance(out, tuple) else out
            captured.append(h.detach().to("cpu", torch.float32))  # synchronous copy

        return hook

    @torch.inference_mode()
    def hf_plain() -> None:
        model(torch.tensor([ids], device=dev))
        sync(dev)

    @torch.inference_mode()
    def hf_hooked() -> None:
        handles = [b.register_forward_hook(hooks(b)) for b in model.model.layers]
        try:
            model(torch.tensor([ids], device=dev))
            sync(dev)
        finally:
            for h in handles:
                h.remove()
            captured.clear()

    t0, t1 = best(plain, repeats), best(ours, repeats)
    h0, h1 = best(hf_plain, repeats), best(hf_hooked, repeats)
    return {
        "prefill_tokens": len(ids),
        "layers": n_layers,
        "bytes_captured": len(ids) * n_layers * model.config.hidden_size * 4,
        "plain_ms": 1000 * t0,
        "ours_ms": 1000 * t1,
        "overhead_pct": 100 * (t1 / t0 - 1),
        "hf_plain_ms": 1000 * h0,
        "hf_eager_hooks_cpu_copy_ms": 1000 * h1,
        "hf_overhead_pct": 100 * (h1 / h0 - 1),
    }


def steering(model: Any, tokens: int, repeats: int) -> dict[str, Any]:
    """Batch-1 generation with an ``add`` at every layer on every token."""
    dev = next(model.parameters()).device
    prompt = "And God said, Let there be light: and there was light."
    d = model.config.hidden_size
    import numpy as np

    from tpm_faas.client import encode_array

    vec = np.random.default_rng(0).standard_normal(d).astype(np.float32) * 0.01
    body = spec(
        model,
        prompt,
        [
            {
                "op": "add",
                "site": "hook_resid_post",
                "layers": "*",
                "vector": encode_array(vec),
                "generation": True,
            }
        ],
        max_new_tokens=tokens,
        stop_at_eos=False,
    )
    plain_body = {
        "prompt_ids": [ByteTokenizer().encode(prompt)],
        "max_new_tokens": tokens,
        "stop_at_eos": False,
    }
    dec = Decoder(model, slots=1, max_len=512)
    sched = Scheduler(dec.run_plan, slots=1, max_len=512)
    rates: dict[str, list[float]] = {"plain": [], "ours": []}

    def serve(kind: str) -> None:
        if kind == "ours":
            sched.submit(0, "s", body, intervene=True)
        else:
            sched.submit(0, "p", plain_body)
        out = []
        while sched.busy:
            out += sched.step()
        sync(dev)
        rates[kind].append(out[0][1]["result"]["timing"]["decode_tok_s"])

    for _ in range(repeats + 1):  # interleaved, so drift hits both alike
        serve("plain")
        serve("ours")
    r0, r1 = max(rates["plain"][1:]), max(rates["ours"][1:])

    ids = torch.tensor([ByteTokenizer().encode(prompt)], device=dev)
    v = torch.from_numpy(vec).to(dev, next(model.parameters()).dtype)

    def add(_m: Any, _a: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (out[0] + v, *out[1:])
        return out + v

    @torch.inference_mode()
    def hf(hooked: bool) -> None:
        handles = [b.register_forward_hook(add) for b in model.model.layers] if hooked else []
        try:
            model.generate(
                ids,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=ByteTokenizer().pad_id,
            )
            sync(dev)
        finally:
            for h in handles:
                h.remove()

    h0, h1 = best(lambda: hf(False), repeats), best(lambda: hf(True), repeats)
    return {
        "tokens": tokens,
        "plain_decode_tok_s": r0,
        "ours_decode_tok_s": r1,
        "overhead_pct": 100 * (r0 / r1 - 1),
        "hf_generate_s": h0,
        "hf_generate_eager_hooks_s": h1,
        "hf_overhead_pct": 100 * (h1 / h0 - 1),
    }


def gpu_rows(repeats: int) -> list[dict[str, Any]]:
    model = llama3_8b()
    name = "Llama-3-8B shape (random), bf16, CUDA graphs"
    return [
        {"model": name, "workload": "capture", **capture(model, 2048, repeats)},
        {"model": name, "workload": "steering", **steering(model, 128, repeats)},
    ]


def run(repeats: int, gpu_only: bool = False) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    if not gpu_only:
        cpu_rows(rows, repeats)
    return record(
        "interventions",
        torch_threads=torch.get_num_threads(),
        gpu=gpu_rows(repeats) if torch.cuda.is_available() else "skipped: no CUDA device",
        repeats=repeats,
        rows=rows,
    )


def cpu_rows(rows: list[dict[str, Any]], repeats: int) -> None:
    demo = AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODELS / "demo-tpm" / "1", dtype=torch.float32
    ).eval()
    big = random_llama(torch.float32, positions=2048)
    for name, model, prefill in (
        ("demo-tpm@1 (3.1M)", demo, 512),
        ("random Llama (38M)", big, 1024),
    ):
        rows.append(
            {
                "model": name,
                "dtype": "float32",
                "workload": "capture",
                **capture(model, prefill, repeats),
            }
        )
        rows.append(
            {
                "model": name,
                "dtype": "float32",
                "workload": "steering",
                **steering(model, 128, repeats),
            }
        )
        print(f"  measured {name}", flush=True)


def table(result: dict[str, Any]) -> str:
    rows = [*result["rows"], *(result["gpu"] if isinstance(result["gpu"], list) else [])]
    head = f"{'model':<46} {'workload':<9} {'ours':>9} {'HF eager hooks':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<46} {r['workload']:<9} {r['overhead_pct']:>+8.1f}% "
            f"{r['hf_overhead_pct']:>+14.1f}%"
        )
        if r["workload"] == "capture":
            lines.append(
                f"{'':<46}   prefill {r['prefill_tokens']} tokens x {r['layers']} layers: "
                f"{r['plain_ms']:.1f} -> {r['ours_ms']:.1f} ms"
            )
        else:
            lines.append(
                f"{'':<46}   decode {r['plain_decode_tok_s']:.0f} -> "
                f"{r['ours_decode_tok_s']:.0f} tok/s"
            )
    lines.append("(overhead = with / without - 1, both measured in this run)")
    if not isinstance(result["gpu"], list):
        lines.append(f"GPU: {result['gpu']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/out/interventions.json"))
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU rows (bench/gpu.sh)")
    a = p.parse_args(argv)
    result = run(a.repeats, a.gpu_only)
    print(table(result))
    write(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
