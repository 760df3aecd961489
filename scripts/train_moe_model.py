"""Make the mixture-of-experts demo model, ``demo-moe@1``: a Qwen3-MoE checkpoint made here.

The same data as ``demo-chat@1`` (``train_chat_model.py``): a byte-level BPE tokenizer trained
on the bundled corpus, here in Qwen's ChatML style (``<|im_start|>``/``<|im_end|>``), the
corpus tokenized with it mixed with the chat exercises (continue a verse, say the verse that
follows) rendered with the tokenizer's own chat template. The model is a small Qwen3-MoE
(``model_type`` ``qwen3_moe``, about 4M parameters): 4 layers, the first a dense MLP
(``mlp_only_layers``), the others 8 experts of which the router picks 2 per token (top-k
weights renormalised, ``norm_topk_prob``), trained from scratch with transformers' auxiliary
load-balancing loss taken at each MoE layer (:class:`Balanced`) so that every layer uses every
expert. The checkpoint is written in the published layout (per-expert safetensors in bf16,
``generation_config.json``) and imported with :func:`tpm_faas.catalog.import_checkpoint`
(what ``tpm-faas models add --copy`` does).

Rebuild (replaces ``tpm_faas/data/models/demo-moe/1``; deterministic for a given seed, torch
version and thread count; about 10 minutes on 2 cores)::

    python scripts/train_moe_model.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from train_chat_model import (
    IGNORE,
    ChatCorpus,
    chat_batches,
    chat_corpus,
    publish,
    run_cli,
    training_info,
)
from train_demo_model import fit
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from tpm_faas.catalog import split_ref

MODEL = "demo-moe@1"
STYLE = "chatml"
VOCAB = 2048
EXPERTS = 8
TOP_K = 2
AUX_COEF = 0.05


def moe_config(corpus: ChatCorpus) -> Qwen3MoeConfig:
    """The shape of ``demo-moe@1``: width 192, 4 layers (a dense one, then 3 of 8 experts of
    width 192, 2 per token), 6 query heads over 2 of width 32, untied embeddings."""
    kw: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 192,
        "intermediate_size": 512,
        "moe_intermediate_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "max_position_embeddings": 1024,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "router_aux_loss_coef": AUX_COEF,
        "bos_token_id": corpus.bos,
        "eos_token_id": corpus.stop_ids,
        "pad_token_id": corpus.pad,
    }
    return Qwen3MoeConfig(**kw)


class Balanced(torch.nn.Module):
    """``model`` under training: its loss is the next-token cross-entropy plus ``coef`` x
    transformers' load-balancing loss taken at each MoE layer and averaged over them.
    (transformers' own, ``output_router_logits`` with ``router_aux_loss_coef``, pools the
    layers' routing counts: an expert unused at one layer goes unpunished while another layer
    uses it, and a few experts did go unused per layer.)"""

    def __init__(self, model: Any, coef: float) -> None:
        super().__init__()
        self.model = model
        self.coef = coef

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        out = self.model(input_ids=input_ids, output_router_logits=True)
        logits = out.logits[:, :-1].flatten(0, 1).float()
        ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=IGNORE)
        per_layer = [load_balancing_loss_func((g,), EXPERTS, TOP_K) for g in out.router_logits]
        aux = sum(per_layer) / len(per_layer)
        return SimpleNamespace(loss=ce + self.coef * aux)


@torch.inference_mode()
def expert_use(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, list[float]]:
    """The share of a batch's tokens routed to each expert, per MoE layer (the router's top-k
    of its own logits, as transformers routes them)."""
    out = model(input_ids=batch[0], output_router_logits=True)
    use: dict[str, list[float]] = {}
    dense = set(model.config.mlp_only_layers)
    moe_layers = [i for i in range(model.config.num_hidden_layers) if i not in dense]
    for layer, logits in zip(moe_layers, out.router_logits, strict=True):
        top = logits.float().topk(TOP_K, dim=-1).indices.flatten()
        counts = torch.bincount(top, minlength=EXPERTS).float()
        use[str(layer)] = [round(float(c), 3) for c in counts / counts.sum()]
    return use


def train(
    out_root: Path,
    *,
    steps: int,
    seed: int = 0,
    seq_len: int = 256,
    batch_size: int = 8,
    chat_rows: int = 4,
    lr: float = 3e-3,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train the tokenizer and the model, import the checkpoint as ``demo-moe@1`` under
    ``out_root`` (replacing an older one)."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="demo-moe-"))
    try:
        corpus = chat_corpus(work, STYLE, VOCAB)
        model = Qwen3MoeForCausalLM(moe_config(corpus))  # type: ignore[no-untyped-call]
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        batch = chat_batches(
            corpus, seed=seed, seq_len=seq_len, batch_size=batch_size, chat_rows=chat_rows
        )
        t0 = time.monotonic()
        loss_ema = fit(
            Balanced(model, AUX_COEF), opt, batch, steps=steps, lr=lr, log_every=log_every
        )
        train_s = time.monotonic() - t0
        use = expert_use(
            model,
            chat_batches(
                corpus, seed=seed + 1, seq_len=seq_len, batch_size=batch_size, chat_rows=chat_rows
            )(0),
        )
        publish(model, corpus, MODEL, out_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name, ver = split_ref(MODEL)
    info = training_info(
        MODEL,
        corpus,
        VOCAB,
        architecture=f"qwen3_moe: {EXPERTS} experts, {TOP_K} per token, first layer dense",
        steps=steps,
        seed=seed,
        seq_len=seq_len,
        batch_size=batch_size,
        chat_rows=chat_rows,
        lr=lr,
        balancing_loss=f"{AUX_COEF} x transformers' load_balancing_loss_func, per MoE layer",
        final_loss=round(loss_ema, 4),
        train_s=round(train_s, 1),
        wall_s=round(time.monotonic() - t0, 1),
        parameters=n_params,
        expert_share_by_layer=use,
    )
    (out_root / name / ver / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv, description=__doc__.splitlines()[0], model=MODEL, train_fn=train, steps=1200
    )


if __name__ == "__main__":
    raise SystemExit(main())
