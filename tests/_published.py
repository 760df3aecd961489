"""Checkpoints of every served family as a hub would publish them: random weights (from
``_families``), a BPE tokenizer trained on the bundled corpus in the family's chat style,
``generation_config.json`` with its end-of-turn ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _families import random_model

from tpm_faas.testing.checkpoints import STYLES, train_tokenizer, write_checkpoint

#: The chat style each family's checkpoints ship (GPT-2 has no chat template).
STYLE_OF = {
    "llama": "llama3",
    "llama3.1": "llama3",
    "mistral": "mistral",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "gpt2": "gpt2",
    "mixtral": "mistral",
    "qwen3_moe": "chatml",
    "deepseek_v3": "llama3",
    "kimi_k2": "llama3",
}
#: Embedding rows: the tokenizer's 512 ids, padded (as published checkpoints pad theirs).
VOCAB = 520


def published(family: str, directory: Path, *, seed: int = 0, **overrides: Any) -> Any:
    """Write a checkpoint of ``family`` into ``directory``; returns the model."""
    style = STYLE_OF[family]
    ids = train_tokenizer(directory, style)
    chat = STYLES[style]
    model = random_model(
        family,
        vocab_size=VOCAB,
        seed=seed,
        bos_token_id=ids[chat.bos] if chat.bos else None,
        eos_token_id=[ids[s] for s in chat.stop],
        pad_token_id=ids[chat.eos],
        **overrides,
    )
    write_checkpoint(model, directory, style)
    return model
