"""Make the chat demo model, ``demo-chat@1``: a checkpoint as a hub publishes one, made here.

The real serving path end to end, with nothing downloaded: a byte-level BPE tokenizer in the
Llama 3 chat style (``tokenizer.json``, ``tokenizer_config.json`` with its chat template and
special tokens, :func:`tpm_faas.testing.checkpoints.train_tokenizer`) trained on the bundled
corpus, and a small Llama-architecture model (about 4M parameters) trained from scratch on
the corpus tokenized with it, mixed with chat-formatted exercises rendered with the
tokenizer's own chat template, so that a chat request gets an answer that ends with
``<|eot_id|>``:

* user ``Continue: <first part of a verse>`` -> assistant ``<the rest of it>``;
* user ``What comes after this verse? <a verse>`` -> assistant ``<the next verse>``;

half of them after a system turn. The checkpoint is written in the published layout
(safetensors in bf16, ``generation_config.json``) and imported with
:func:`tpm_faas.catalog.import_checkpoint` (what ``tpm-faas models add --copy`` does); then
the input adapter ``features-linear`` and the output head ``regression`` of ``demo-tpm@1``
(:func:`train_demo_model.fit_extras`) are fitted for it and registered in its card.

Rebuild (replaces ``tpm_faas/data/models/demo-chat/1``; deterministic for a given seed, torch
version and thread count)::

    python scripts/train_chat_model.py
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from train_demo_model import CORPUS, DATA, EXTRAS_CARD, fit, fit_extras
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tpm_faas.catalog import CARD, checkpoint_sha256, import_checkpoint, split_ref
from tpm_faas.testing.checkpoints import STYLES, train_tokenizer, write_checkpoint
from tpm_faas.tokenizer import HFTokenizer

MODEL = "demo-chat@1"
ROOT = DATA / "models"
STYLE = "llama3"
VOCAB = 2048
STYLE_BOS = STYLES[STYLE].bos or ""
CHECK_VERSE = "In the beginning God created the heaven and the earth."
#: Ignored by the loss (padding of packed chat rows).
IGNORE = -100

SYSTEMS = (
    "You are a scribe who knows the Book of Genesis by heart.",
    "Answer with the words of the King James Bible.",
    "You are a helpful assistant.",
)
CONTINUE = ("Continue: {}", "Continue the verse: {}", "Finish this verse: {}")
NEXT = ("What comes after this verse? {}", "Say the verse that follows: {}")
#: Chats whose answers are printed after training (the last one is the demo's).
CHECK_CHATS = (
    [{"role": "user", "content": "Continue: And God called the light Day,"}],
    [
        {"role": "system", "content": SYSTEMS[0]},
        {"role": "user", "content": "Continue: And the LORD God planted a garden"},
    ],
    [{"role": "user", "content": "What comes after this verse? " + CHECK_VERSE}],
)


def chat_config(ids: dict[str, int], **shape: Any) -> LlamaConfig:
    """The shape of ``demo-chat@1``: ``demo-tpm@1``'s blocks on a 2,048-id BPE vocabulary;
    ``shape`` overrides any of its fields (``hidden_size=384``: a wider model of the same
    kind, as ``bench/versions.py`` trains)."""
    chat = STYLES[STYLE]
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[STYLE_BOS],
        eos_token_id=[ids[s] for s in chat.stop],
        pad_token_id=ids[chat.eos],
    )
    return LlamaConfig(**(fields | shape))


def exercise(verses: list[str], rng: random.Random) -> list[dict[str, str]]:
    """One chat: a verse to continue, or the verse that follows another; half of them after a
    system turn."""
    i = rng.randrange(len(verses) - 1)
    if rng.random() < 0.7:
        words = verses[i].split(" ")
        cut = max(1, min(len(words) - 1, round(len(words) * rng.uniform(0.25, 0.7))))
        ask = rng.choice(CONTINUE).format(" ".join(words[:cut]))
        answer = " ".join(words[cut:])
    else:
        ask = rng.choice(NEXT).format(verses[i])
        answer = verses[i + 1]
    chat = [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.5:
        chat.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
    return chat


@dataclass
class ChatCorpus:
    """The bundled corpus and its chat exercises, tokenized with a freshly trained BPE
    tokenizer of one chat style (the tokenizer's files are in ``work``)."""

    work: Path
    style: str
    ids: dict[str, int]
    tok: HFTokenizer
    text: str
    verses: list[str]
    #: The whole corpus as token ids (no special tokens).
    data: torch.Tensor

    @property
    def pad(self) -> int:
        return self.ids[STYLES[self.style].eos]

    @property
    def stop_ids(self) -> list[int]:
        return [self.ids[s] for s in STYLES[self.style].stop]

    @property
    def bos(self) -> int | None:
        chat = STYLES[self.style]
        return self.ids[chat.bos] if chat.bos is not None else None


def chat_corpus(work: Path, style: str = STYLE, vocab_size: int = VOCAB) -> ChatCorpus:
    """Train the tokenizer of ``style`` into ``work`` and tokenize the corpus with it."""
    ids = train_tokenizer(work, style, vocab_size=vocab_size)
    # The tokenizer as the gateway reads it (EOS ids from generation_config.json).
    (work / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [ids[s] for s in STYLES[style].stop]})
    )
    tok = HFTokenizer(work)
    text = CORPUS.read_text()
    verses = [v for v in text.splitlines() if v.strip()]
    data = torch.tensor(tok.encode(text, add_special=False), dtype=torch.long)
    return ChatCorpus(work, style, ids, tok, text, verses, data)


def chat_batches(
    corpus: ChatCorpus,
    *,
    seed: int,
    seq_len: int,
    batch_size: int,
    chat_rows: int,
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``batch_size`` rows of ``seq_len + 1`` ids (input ids, labels): random
    stretches of the corpus (after BOS where the style has one), then ``chat_rows`` rows of
    whole chat exercises packed and padded (the padding not scored)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    data = corpus.data
    prefix = [] if corpus.bos is None else [corpus.bos]
    span = seq_len + 1 - len(prefix)
    head = torch.full((batch_size - chat_rows, len(prefix)), corpus.bos or 0, dtype=torch.long)
    pad = corpus.pad

    def chat_row() -> tuple[list[int], list[int]]:
        """Whole chats packed into one row, the rest padding (not scored)."""
        row: list[int] = []
        while True:
            chat = corpus.tok.encode_chat(exercise(corpus.verses, rng), add_generation_prompt=False)
            if len(row) + len(chat) > seq_len + 1:
                break
            row += chat
        n = len(row)
        return row + [pad] * (seq_len + 1 - n), row + [IGNORE] * (seq_len + 1 - n)

    def batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data) - span, (batch_size - chat_rows,), generator=gen)
        chunk = torch.stack([data[s : s + span] for s in starts.tolist()])
        plain = torch.cat([head, chunk], dim=1)
        rows = [chat_row() for _ in range(chat_rows)]
        chats = torch.tensor([r[0] for r in rows], dtype=torch.long)
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return torch.cat([plain, chats]), torch.cat([plain, labels])

    return batch


def publish(model: Any, corpus: ChatCorpus, model_ref: str, out_root: Path) -> dict[str, Any]:
    """Write ``model`` in bf16 beside the tokenizer as a hub publishes a checkpoint and import
    it as ``model_ref`` under ``out_root`` (replacing an older one, as ``tpm-faas models add
    --copy`` would a new version); returns its card. ``model`` is left in float32."""
    ckpt = corpus.work / "checkpoint"
    ckpt.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(corpus.work / name, ckpt / name)
    # transformers types PreTrainedModel.to oddly; the call is nn.Module.to.
    model.to(torch.bfloat16)
    write_checkpoint(model, ckpt, corpus.style)
    model.to(torch.float32)  # the weights as served, in fp32
    name, ver = split_ref(model_ref)
    dest = out_root / name / ver
    if dest.exists():
        shutil.rmtree(dest)
    return import_checkpoint(ckpt, model_ref, out_root, copy=True)


def save_checkpoint(model: Any, corpus: ChatCorpus, out_dir: Path) -> Path:
    """Write ``model`` in bf16 beside the tokenizer as a plain Hugging Face directory
    ``out_dir`` (new; nothing imported), as a trainer publishes a version of a model it keeps
    training: ``model`` itself is untouched (its float32 master weights are kept)."""
    out_dir.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(corpus.work / name, out_dir / name)
    write_checkpoint(copy.deepcopy(model).to(torch.bfloat16), out_dir, corpus.style)
    return out_dir


def train_more(
    model: Any,
    corpus: ChatCorpus,
    *,
    steps: int,
    lr: float,
    seed: int,
    params: list[torch.nn.Parameter] | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    chat_rows: int = 4,
    log_every: int = 50,
) -> float:
    """Train ``model`` further from its current weights, as a new run of :func:`train` does
    from scratch (a fresh AdamW, the same warm-up and cosine schedule, batches of ``seed``);
    only ``params`` (default: all) train, the others are frozen for the run. Returns the
    final loss (an exponential moving average)."""
    trainable = list(model.parameters()) if params is None else list(params)
    ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        batch = chat_batches(
            corpus, seed=seed, seq_len=seq_len, batch_size=batch_size, chat_rows=chat_rows
        )
        return fit(model, opt, batch, steps=steps, lr=lr, log_every=log_every)
    finally:
        for p in frozen:
            p.requires_grad_(True)


class LoRALinear(torch.nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) * B @ A``
    (LoRA; ``B`` starts at zero, so the model starts as it was)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features)
        self.lora_a = torch.nn.Parameter(a)
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank: torch.Tensor = (x @ self.lora_a.T) @ self.lora_b.T
        out: torch.Tensor = self.base(x) + low_rank * self.scale
        return out

    @torch.no_grad()
    def merged(self) -> torch.nn.Linear:
        """The base layer with the update added into its weight."""
        self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(
    model: Any,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> list[torch.nn.Parameter]:
    """Wrap every linear layer named in ``targets`` (``q_proj``...) in a :class:`LoRALinear`;
    returns the LoRA parameters (train those alone with :func:`train_more`, then
    :func:`merge_lora`)."""
    gen = torch.Generator().manual_seed(seed)
    params: list[torch.nn.Parameter] = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                lora = LoRALinear(child, rank, alpha, gen)
                setattr(module, child_name, lora)
                params += [lora.lora_a, lora.lora_b]
    if not params:
        raise ValueError(f"no linear layer named any of {targets}")
    return params


def merge_lora(model: Any) -> None:
    """Add every :class:`LoRALinear`'s update into its base weight and put the base back."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


def training_info(
    model_ref: str, corpus: ChatCorpus, vocab_size: int, **fields: Any
) -> dict[str, Any]:
    """What ``training.json`` records of a run: the data, the settings, the versions."""
    return {
        "model": model_ref,
        "corpus": CORPUS.name,
        "corpus_sha256": hashlib.sha256(CORPUS.read_bytes()).hexdigest(),
        "tokenizer": f"byte-level BPE, {vocab_size} ids, {corpus.style} chat style",
        "corpus_tokens": len(corpus.data),
        **fields,
        "versions": {d: version(d) for d in ("torch", "transformers", "safetensors", "tokenizers")},
    }


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
    """Train the tokenizer and the model, import the checkpoint as ``demo-chat@1`` under
    ``out_root`` (replacing an older one), register its adapter and head."""
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="demo-chat-"))
    try:
        corpus = chat_corpus(work, STYLE, VOCAB)
        model = LlamaForCausalLM(chat_config(corpus.ids))  # type: ignore[no-untyped-call]
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        batch = chat_batches(
            corpus, seed=seed, seq_len=seq_len, batch_size=batch_size, chat_rows=chat_rows
        )
        t0 = time.monotonic()
        loss_ema = fit(model, opt, batch, steps=steps, lr=lr, log_every=log_every)
        train_s = time.monotonic() - t0
        card = publish(model, corpus, MODEL, out_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name, ver = split_ref(MODEL)
    dest = out_root / name / ver
    tensors, head_fit = fit_extras(model, corpus.tok.encode, corpus.text, seed)
    save_file(tensors, str(dest / "extras.safetensors"))
    card.update(EXTRAS_CARD)
    card["checkpoint_sha256"] = checkpoint_sha256(dest)
    (dest / CARD).write_text(json.dumps(card, indent=2) + "\n")
    info = training_info(
        MODEL,
        corpus,
        VOCAB,
        steps=steps,
        seed=seed,
        seq_len=seq_len,
        batch_size=batch_size,
        chat_rows=chat_rows,
        lr=lr,
        final_loss=round(loss_ema, 4),
        train_s=round(train_s, 1),
        wall_s=round(time.monotonic() - t0, 1),
        parameters=n_params,
        regression_head_r2=head_fit,
    )
    (dest / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


@torch.inference_mode()
def sample(
    model_dir: Path,
    *,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_new_tokens: int = 60,
) -> str:
    """Greedy continuation of a prompt or answer to a chat with plain transformers (for
    checking a checkpoint by eye); the end-of-turn token is shown."""
    tok = HFTokenizer(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tok.encode_chat(messages) if messages is not None else tok.encode(prompt or "")
    x = torch.tensor([ids])
    out = model.generate(
        x,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(tok.eos_ids),
        pad_token_id=model.config.pad_token_id,
    )
    new = out[0, x.shape[1] :].tolist()
    return "".join(tok.token_str(i) for i in new)


def run_cli(
    argv: list[str] | None,
    *,
    description: str,
    model: str,
    train_fn: Callable[..., dict[str, Any]],
    steps: int,
) -> int:
    """The command line of a demo model's training script: train ``model`` with ``train_fn``
    into ``--root``, print its training info and a few samples."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--root", type=Path, default=ROOT, help="model root to import into")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat-rows", type=int, default=4, help="rows of each batch that are chats")
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args(argv)
    info = train_fn(
        a.root,
        steps=a.steps,
        seed=a.seed,
        batch_size=a.batch_size,
        chat_rows=a.chat_rows,
        lr=a.lr,
    )
    print(json.dumps(info, indent=2))
    name, ver = split_ref(model)
    show_samples(a.root / name / ver)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv, description=__doc__.splitlines()[0], model=MODEL, train_fn=train, steps=800
    )


def show_samples(out: Path) -> None:
    """Print greedy continuations of a few prompts and answers to a few chats."""
    for prompt in ("In the beginning God created", "And the LORD said unto", "And Abraham"):
        print(f"{prompt!r} -> {sample(out, prompt=prompt)!r}")
    for chat in CHECK_CHATS:
        print(f"{chat[-1]['content']!r} -> {sample(out, messages=chat)!r}")


if __name__ == "__main__":
    raise SystemExit(main())
