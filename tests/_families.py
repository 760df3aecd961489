"""Small random-weight models of every served family, and checkpoints of them as published.

On ``sys.path`` through pytest's ``pythonpath`` (``from _families import ...``). Each entry of
:data:`FAMILIES` builds a tiny fp32 ``transformers`` config with awkward shapes (two or three
layers, grouped-query attention, ``head_dim`` unequal to ``hidden_size / heads`` where the
family allows it, tied embeddings in some, untied in others)::

    cfg = FAMILIES["qwen3"](vocab_size=1000, bos_token_id=None, eos_token_id=[998, 999],
                            pad_token_id=999)
    model = random_model("qwen3", vocab_size=1000, bos_token_id=None, eos_token_id=999)
    save_checkpoint(model, root / "tiny-qwen3" / "1")                 # config + safetensors
    save_checkpoint(model, root / "tiny-qwen3" / "1", byte_card=True) # + tpm_model.json

Special-token ids default to the byte tokenizer's (``bos 256, eos 257, pad 258``, vocabulary
264); pass your tokenizer's. Any other config field may be overridden by keyword (larger
shapes for benchmarks: ``hidden_size=256, num_hidden_layers=4``; GPT-2's ``n_embd``...).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The byte tokenizer's ids (``tpm_faas.tokenizer.ByteTokenizer``).
BYTE_VOCAB, BYTE_BOS, BYTE_EOS, BYTE_PAD = 264, 256, 257, 258
#: Positions every test family holds (sequences of tests stay far below).
POSITIONS = 128

TokenId = int | None
EosIds = int | list[int] | None


def _specials(bos: TokenId, eos: EosIds, pad: TokenId) -> dict[str, Any]:
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def llama(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Llama 2/3 shape: 6 query heads over 2 key/value heads, ``head_dim`` 16 on a width of 48
    (not 48 / 6), untied embeddings, default RoPE."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": POSITIONS,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return LlamaConfig(**kw)


def llama31(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Llama 3.1 (and 3.2, tied) shape: ``rope_scaling`` of type ``llama3`` with an original
    context of 64, so at these sizes some frequencies are kept, one lies in the smoothed band
    and the others are divided by the factor; 4 query heads over 2, tied embeddings."""
    from transformers import LlamaConfig

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": POSITIONS,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return LlamaConfig(**kw)


def mistral(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Mistral shape: a sliding window of 80 tokens (the serving context), 8 query heads over
    2, ``head_dim`` 12 on a width of 64, untied embeddings."""
    from transformers import MistralConfig

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "max_position_embeddings": POSITIONS,
        "sliding_window": 80,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return MistralConfig(**kw)


def qwen2(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Qwen2/2.5 shape: biases on the q/k/v projections, 6 query heads over 2, ``head_dim`` 12
    on a width of 48, tied embeddings (as the small Qwen2.5 models)."""
    from transformers import Qwen2Config

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "max_position_embeddings": POSITIONS,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return Qwen2Config(**kw)


def qwen3(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Qwen3 shape: per-head RMSNorm of queries and keys, 6 query heads over 2, ``head_dim`` 16
    on a width of 48, untied embeddings (as Qwen3-8B)."""
    from transformers import Qwen3Config

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": POSITIONS,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return Qwen3Config(**kw)


def gpt2(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """GPT-2 shape: 6 heads of 8 on a width of 48, learned positions, tied embeddings."""
    from transformers import GPT2Config

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "n_embd": 48,
        "n_layer": 2,
        "n_head": 6,
        "n_positions": POSITIONS,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return GPT2Config(**kw)


def mixtral(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Mixtral shape: 5 experts, 2 per token (``num_local_experts``, ``num_experts_per_tok``;
    override them for other counts), 6 query heads over 2, ``head_dim`` 16 on a width of 48,
    no sliding window (as Mixtral 8x7B), untied embeddings."""
    from transformers import MixtralConfig

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 5,
        "num_experts_per_tok": 2,
        "max_position_embeddings": POSITIONS,
        "sliding_window": None,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return MixtralConfig(**kw)


def qwen3_moe(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """Qwen3-MoE shape: 3 layers, the first a dense MLP (``mlp_only_layers``), the others 6
    experts of width 24 with 3 per token, top-k weights not renormalised (``norm_topk_prob``
    false, as Qwen3-30B-A3B's config default), per-head q/k RMSNorm, 6 query heads over 2,
    ``head_dim`` 16 on a width of 48, untied embeddings."""
    from transformers import Qwen3MoeConfig

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 72,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "max_position_embeddings": POSITIONS,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return Qwen3MoeConfig(**kw)


def deepseek_v3(
    *,
    vocab_size: int = BYTE_VOCAB,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """DeepSeek-V3 shape: multi-head latent attention with a query rank (``q_lora_rank`` 24;
    override with None for plain ``q_proj``), ``kv_lora_rank`` 20, query/key heads of 12 + 8
    rotary dimensions and values of 10 (4 heads on a width of 48), interleaved rotary pairs,
    YaRN scaling (factor 4 over an original context of 32, ``mscale_all_dim``: the softmax
    scale changes too); 3 layers, the first dense (``first_k_dense_replace``), then 8 routed
    experts in 4 groups of which 2 are kept (``n_group``, ``topk_group``), 3 per token,
    renormalised and scaled by ``routed_scaling_factor`` 2.5, beside one shared expert; untied
    embeddings."""
    from transformers import DeepseekV3Config

    kw: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 48,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 24,
        "kv_lora_rank": 20,
        "qk_nope_head_dim": 12,
        "qk_rope_head_dim": 8,
        "v_head_dim": 10,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "rope_interleave": True,
        "max_position_embeddings": POSITIONS,
        "rope_scaling": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        **_specials(bos_token_id, eos_token_id, pad_token_id),
        **overrides,
    }
    return DeepseekV3Config(**kw)


def kimi_k2(**overrides: Any) -> Any:
    """Kimi K2 shape (DeepSeek-V3's architecture; its checkpoints say ``model_type``
    ``kimi_k2``, which :func:`kimi_checkpoint` writes): one routing group (``n_group`` 1), 12
    experts with 4 per token beside a shared one, ``routed_scaling_factor`` 2.827, one dense
    layer, a query rank, YaRN factor 32. A ``DeepseekV3Config`` (``transformers`` has no
    ``kimi_k2``)."""
    kw: dict[str, Any] = {
        "n_routed_experts": 12,
        "num_experts_per_tok": 4,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "rope_scaling": {
            "rope_type": "yarn",
            "rope_theta": 50000.0,
            "factor": 32.0,
            "original_max_position_embeddings": POSITIONS // 32,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        **overrides,
    }
    return deepseek_v3(**kw)


#: Family name -> its config builder (keyword-only: ``vocab_size``, ``bos_token_id``,
#: ``eos_token_id``, ``pad_token_id``, then any config field to override).
FAMILIES: dict[str, Callable[..., Any]] = {
    "llama": llama,
    "llama3.1": llama31,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "gpt2": gpt2,
    "mixtral": mixtral,
    "qwen3_moe": qwen3_moe,
    "deepseek_v3": deepseek_v3,
    "kimi_k2": kimi_k2,
}


def random_model(
    family: str,
    *,
    vocab_size: int = BYTE_VOCAB,
    seed: int = 0,
    bos_token_id: TokenId = BYTE_BOS,
    eos_token_id: EosIds = BYTE_EOS,
    pad_token_id: TokenId = BYTE_PAD,
    **overrides: Any,
) -> Any:
    """The ``*ForCausalLM`` of ``family`` (a key of :data:`FAMILIES`) with weights drawn from
    ``seed``, fp32, in eval mode.

    Weights are drawn at ``initializer_range`` 0.05 (greedy choices are clear, not near-ties),
    and every norm weight and bias is drawn too (``transformers`` initialises them to ones and
    zeros, which would hide a norm or a bias left out), DeepSeek's routing bias
    (``e_score_correction_bias``) included.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = FAMILIES[family](
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **{"initializer_range": 0.05, **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # type: ignore[no-untyped-call]
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights and biases
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.copy_(noise + (1.0 if name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing bias
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def kimi_checkpoint(directory: Path) -> Path:
    """Make the checkpoint of a DeepSeek-V3 model in ``directory`` say what Kimi K2's
    ``config.json`` says: ``model_type`` ``kimi_k2``, ``architectures``
    ``["DeepseekV3ForCausalLM"]``. Returns ``directory``."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"])
    path.write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def save_checkpoint(model: Any, directory: Path, *, byte_card: bool = False) -> Path:
    """Write ``model`` as a published checkpoint (``save_pretrained``: ``config.json``,
    ``generation_config.json``, ``model.safetensors``) into ``directory`` (created), and with
    ``byte_card`` a ``tpm_model.json`` card ``{"tokenizer": "bytes"}`` that serves it with the
    byte tokenizer (the vocabulary must hold its 264 ids). Returns ``directory``."""
    directory = Path(directory)
    if byte_card and model.config.vocab_size < BYTE_VOCAB:
        raise ValueError(
            f"the byte tokenizer needs a vocabulary of {BYTE_VOCAB}, not {model.config.vocab_size}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if byte_card:
        (directory / "tpm_model.json").write_text(json.dumps({"tokenizer": "bytes"}) + "\n")
    return directory
