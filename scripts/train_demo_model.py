"""Make the project's own demo model, ``demo-tpm@1``: nothing is downloaded.

A small Llama-architecture model (about 3M parameters, byte-level vocabulary) trained from
scratch on the bundled public-domain corpus until its greedy continuations are recognisable
text, plus a registered input adapter and output head:

* ``adapters.features-linear``: a seeded linear projection of 16-wide feature vectors into the
  model's embedding space (the shape of a user's input adapter; untrained);
* ``heads.regression``: a linear head on the mean-pooled final hidden state, fitted by ridge
  regression to predict ``log(characters)`` of a verse.

Rebuild (deterministic for a given seed, torch version and thread count)::

    python scripts/train_demo_model.py --steps 1500

The weights it writes (``tpm_faas/data/models/demo-tpm/1``) ship with the package; this
script does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tpm_faas.runtime.arch import byte_llama_config
from tpm_faas.tokenizer import ByteTokenizer

# The source tree's package data: the corpus it trains on and where the weights go.
DATA = Path(__file__).resolve().parents[1] / "tpm_faas" / "data"
CORPUS = DATA / "corpus" / "kjv-genesis.txt"
OUT = DATA / "models" / "demo-tpm" / "1"
ADAPTER_IN = 16


def demo_config() -> LlamaConfig:
    """The shape of ``demo-tpm@1`` (3.1M parameters)."""
    return byte_llama_config(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )


def lr_at(step: int, *, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5 % of ``steps``, then cosine decay to 2 % of ``lr``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) + lr * 0.02


def fit(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    log_every: int = 50,
) -> float:
    """Train ``model`` for ``steps`` steps on ``batch(step)`` (input ids, labels: -100 is not
    scored); returns the final loss (an exponential moving average)."""
    t0 = time.monotonic()
    tokens = 0
    loss_ema = float("nan")
    model.train()
    for step in range(steps):
        ids, labels = batch(step)
        tokens += int((labels != -100).sum())
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps=steps, lr=lr)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        if step % log_every == 0 or step == steps - 1:
            el = time.monotonic() - t0
            print(
                f"step {step:5d}  loss {loss_ema:.3f}  {tokens / el:,.0f} tok/s  {el:.0f} s",
                flush=True,
            )
    model.eval()
    return loss_ema


def train(
    corpus: Path,
    out_dir: Path,
    *,
    steps: int,
    seed: int = 0,
    seq_len: int = 256,
    batch_size: int = 16,
    lr: float = 3e-3,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train from scratch on ``corpus`` and save the model (bf16 safetensors) to ``out_dir``."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    tok = ByteTokenizer()
    text = corpus.read_text()
    data = torch.tensor(tok.encode(text, add_special=False), dtype=torch.long)
    model = LlamaForCausalLM(demo_config())
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    bos = torch.full((batch_size, 1), tok.bos_id, dtype=torch.long)

    def batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        chunk = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        ids = torch.cat([bos, chunk], dim=1)
        return ids, ids

    t0 = time.monotonic()
    loss_ema = fit(model, opt, batch, steps=steps, lr=lr, log_every=log_every)
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers types PreTrainedModel.to oddly; the call is nn.Module.to.
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)  # type: ignore[arg-type]
    (out_dir / "generation_config.json").unlink(missing_ok=True)
    model.to(torch.float32)  # type: ignore[arg-type]
    head_fit = _write_extras(model, text, out_dir, seed)
    info = {
        "model": "demo-tpm@1",
        "corpus": corpus.name,
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "steps": steps,
        "seed": seed,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "final_loss": round(loss_ema, 4),
        "wall_s": round(time.monotonic() - t0, 1),
        "parameters": n_params,
        "regression_head_r2": head_fit,
        "versions": {d: version(d) for d in ("torch", "transformers", "safetensors")},
    }
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


#: The card's declarations of what :func:`fit_extras` makes (``extras.safetensors``).
EXTRAS_CARD: dict[str, Any] = {
    "adapters": {
        "features-linear": {
            "kind": "linear",
            "in_features": ADAPTER_IN,
            "description": "seeded linear projection of feature vectors into embedding space",
        }
    },
    "heads": {
        "regression": {
            "kind": "linear",
            "out_features": 1,
            "description": "predicts log(characters) of a text from its mean-pooled final "
            "hidden state (ridge fit on Genesis verses)",
        }
    },
}


@torch.inference_mode()
def fit_extras(
    model: LlamaForCausalLM, encode: Callable[[str], Sequence[int]], text: str, seed: int
) -> tuple[dict[str, torch.Tensor], float]:
    """The input adapter ``features-linear`` (seeded) and the head ``regression`` (a ridge fit
    on verses tokenized with ``encode``), as the tensors of ``extras.safetensors``; and the
    head's R²."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(seed + 1)
    emb_std = float(model.model.embed_tokens.weight.float().std())
    adapter_w = torch.randn(d, ADAPTER_IN, generator=g) * emb_std / math.sqrt(ADAPTER_IN)
    verses = [v for v in text.splitlines() if v.strip()][:600]
    feats, target = [], []
    for v in verses:
        ids = torch.tensor([list(encode(v))[:256]])
        h = model.model(input_ids=ids).last_hidden_state[0].float().mean(0)
        feats.append(h)
        target.append(math.log(len(v)))
    x = torch.stack(feats)
    y = torch.tensor(target)
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    w = torch.linalg.solve(xc.T @ xc + 1.0 * torch.eye(d), xc.T @ yc)
    b = ym - xm @ w
    pred = x @ w + b
    r2 = float(1 - ((pred - y) ** 2).sum() / (yc**2).sum())
    tensors = {
        "adapters.features-linear.weight": adapter_w.contiguous(),
        "adapters.features-linear.bias": torch.zeros(d),
        "heads.regression.weight": w.reshape(1, d).contiguous(),
        "heads.regression.bias": b.reshape(1).contiguous(),
    }
    return tensors, round(r2, 4)


def _write_extras(model: LlamaForCausalLM, text: str, out_dir: Path, seed: int) -> float:
    """The extras and the card of ``demo-tpm@1`` (byte-level ids); returns the head's R²."""
    tok = ByteTokenizer()
    tensors, r2 = fit_extras(model, tok.encode, text, seed)
    save_file(tensors, str(out_dir / "extras.safetensors"))
    card = {"tokenizer": "bytes", **EXTRAS_CARD}
    (out_dir / "tpm_model.json").write_text(json.dumps(card, indent=2) + "\n")
    return r2


@torch.inference_mode()
def sample(model_dir: Path, prompt: str, max_new_tokens: int = 60) -> str:
    """Greedy continuation with plain transformers (for checking a checkpoint by eye)."""
    tok = ByteTokenizer()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    return tok.decode(out[0, ids.shape[1] :].tolist())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    info = train(a.corpus, a.out, steps=a.steps, seed=a.seed, batch_size=a.batch_size, lr=a.lr)
    print(json.dumps(info, indent=2))
    for prompt in ("In the beginning God created", "And the LORD said unto", "And Abraham"):
        print(f"{prompt!r} -> {sample(a.out, prompt)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
