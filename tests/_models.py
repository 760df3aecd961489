"""Small random models shared by unit and integration tests (on ``sys.path`` through pytest's
``pythonpath``)."""

from __future__ import annotations

from typing import Any


def random_gpt2() -> Any:
    """A GPT-2-shaped model with seeded random weights and the byte tokenizer's vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=3,
        n_embd=64,
        n_head=4,
        vocab_size=264,
        n_positions=128,
        bos_token_id=256,
        eos_token_id=257,
    )
    return GPT2LMHeadModel(cfg).eval()
