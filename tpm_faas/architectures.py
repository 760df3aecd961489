"""The architectures the runtime serves, read from a checkpoint's ``config.json`` alone.

One table (:data:`SUPPORTED`) says which ``model_type`` values a shard group can load, which
published families they cover, and whether DeepSpeed AutoTP shards them. ``tpm-faas models
add``, the launcher, the hook-site table and the serving decoder all ask it, so a checkpoint
the runtime cannot serve is refused with the same message everywhere, before any rank starts.

Pure: no torch, no transformers (the gateway and the CLI read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpm_faas.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Architecture:
    """A ``transformers`` ``model_type`` the runtime serves.

    :param model_type: ``config.json``'s ``model_type``
    :param families: the published model families it covers (for messages and docs)
    :param tensor_parallel: whether DeepSpeed AutoTP shards it (else it is served at tp=1)
    :param gpt2_keys: whether its sizes use GPT-2's names (``n_embd``, ``n_head``, ...)
    :param mla: multi-head latent attention (DeepSeek-V3): keys of ``qk_nope_head_dim +
        qk_rope_head_dim`` and values of ``v_head_dim`` per head, every head its own
    :param served_as: the ``transformers`` ``model_type`` that serves it, for a ``model_type``
        ``transformers`` does not know (Kimi K2's ``kimi_k2`` is DeepSeek-V3's architecture)
    :param model_class: the ``architectures`` entry such a config must name
    :param moe: a mixture of experts (:func:`moe_of`), whose routed experts expert
        parallelism spreads
    """

    model_type: str
    families: str
    tensor_parallel: bool = True
    gpt2_keys: bool = False
    mla: bool = False
    served_as: str | None = None
    model_class: str | None = None
    moe: bool = False


SUPPORTED: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "Llama 2, Llama 3, Llama 3.1 (rope_scaling llama3)"),
        Architecture("mistral", "Mistral"),
        Architecture("qwen2", "Qwen2, Qwen2.5"),
        Architecture("qwen3", "Qwen3"),
        # AutoTP refuses GPT-2's fused Conv1D attention.
        Architecture("gpt2", "GPT-2", tensor_parallel=False, gpt2_keys=True),
        # Mixtures of experts: AutoTP shards Mixtral's and Qwen3-MoE's attention and dense
        # MLPs and leaves the fused 3-D expert parameters of transformers 5 whole; expert
        # parallelism (--ep) splits those. DeepSeek's multi-head latent attention stays at
        # tp=1 (--ep spreads its experts): the runtime counts a rank's heads under AutoTP on
        # q_proj, which MLA with a query rank lacks, no test holds MLA at tp=2 to tp=1, and
        # the latent shared by every head (q_a_proj, kv_a_proj_with_mqa, the planned latent
        # cache) would be computed and held whole on every rank anyway.
        # AutoTP splits Mixtral's attention, but a tp=2 group's tokens differed from tp=1 on
        # a test prompt: Mixtral stays at tp=1 (--ep spreads its experts).
        Architecture("mixtral", "Mixtral", tensor_parallel=False, moe=True),
        Architecture("qwen3_moe", "Qwen3-MoE", moe=True),
        Architecture("deepseek_v3", "DeepSeek-V3", tensor_parallel=False, mla=True, moe=True),
        Architecture(
            "kimi_k2",
            "Kimi K2",
            tensor_parallel=False,
            mla=True,
            served_as="deepseek_v3",
            model_class="DeepseekV3ForCausalLM",
            moe=True,
        ),
    )
}


#: RoPE types whose frequencies ``transformers`` recomputes from the sequence length during the
#: forward pass: the serving decoder's table, computed once for every position, cannot match
#: them, so such checkpoints are refused.
DYNAMIC_ROPE = ("dynamic", "longrope")


def rope_type(config: dict[str, Any]) -> str:
    """The RoPE type of a ``config.json`` (``rope_scaling`` or ``rope_parameters``;
    ``default`` when it has none)."""
    for key in ("rope_scaling", "rope_parameters"):  # as published, as transformers 5 saves
        rope = config.get(key)
        if isinstance(rope, dict):
            kind = str(rope.get("rope_type") or rope.get("type") or "default")
            if kind != "default":
                return kind
    return "default"


def supported() -> str:
    """The supported architectures, for messages: ``llama (Llama 2, ...), mistral (...)``."""
    return ", ".join(f"{a.model_type} ({a.families})" for a in SUPPORTED.values())


def architecture_of(config: dict[str, Any], *, what: str = "this checkpoint") -> Architecture:
    """The entry of ``config``'s ``model_type``; :class:`UnsupportedArchitecture` naming the
    supported ones when there is none."""
    kind = str(config.get("model_type") or "")
    arch = SUPPORTED.get(kind)
    if arch is None:
        named = f"a {kind!r} model" if kind else "a config.json without model_type"
        raise UnsupportedArchitecture(
            f"{what} is {named}, which tpm_faas does not serve; supported: {supported()}"
        )
    named_classes = config.get("architectures")
    if arch.model_class and named_classes and arch.model_class not in named_classes:
        raise UnsupportedArchitecture(
            f"{what} is a {kind!r} model of {named_classes}; tpm_faas serves {kind} as "
            f"{arch.model_class} only"
        )
    return arch


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder, under one spelling whatever the family's key names."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    #: Tokens a sequence may hold when served (prompt and generated).
    context_length: int
    tie_word_embeddings: bool
    #: Per-head width of the values, and so of ``attn.hook_z`` (``head_dim`` but under MLA).
    v_head_dim: int


def dims(config: dict[str, Any]) -> Dims:
    """The sizes of a supported checkpoint's decoder from its ``config.json``.

    The serving context is ``max_position_embeddings``, cut to the sliding window where the
    checkpoint attends through one (Mistral v0.1, Mixtral with ``sliding_window``; Qwen2 with
    ``use_sliding_window``): past it
    the decoder's full attention would differ from the model's windowed one.
    """
    arch = architecture_of(config)
    try:
        if arch.gpt2_keys:
            d, heads = int(config["n_embd"]), int(config["n_head"])
            return Dims(
                arch.model_type,
                int(config["n_layer"]),
                d,
                heads,
                heads,
                d // heads,
                int(config["vocab_size"]),
                int(config.get("n_positions") or 1024),  # GPT2Config's default
                bool(config.get("tie_word_embeddings", True)),
                d // heads,
            )
        kind = rope_type(config)
        if kind in DYNAMIC_ROPE:
            raise UnsupportedArchitecture(
                f"rope_type {kind!r} recomputes its frequencies from the sequence length; "
                "the serving decoder serves static RoPE types only"
            )
        d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        context = int(config["max_position_embeddings"])
        window = config.get("sliding_window")
        windowed = arch.model_type in ("mistral", "mixtral") or bool(
            config.get("use_sliding_window")
        )
        if windowed and window:
            context = min(context, int(window))
        if arch.mla:  # every head its own key and value, wider keys than values
            kv_heads = heads
            head_dim = int(config["qk_nope_head_dim"]) + int(config["qk_rope_head_dim"])
            v_head_dim = int(config["v_head_dim"])
        else:
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = v_head_dim = int(config.get("head_dim") or d // heads)
        return Dims(
            arch.model_type,
            int(config["num_hidden_layers"]),
            d,
            heads,
            kv_heads,
            head_dim,
            int(config["vocab_size"]),
            context,
            bool(config.get("tie_word_embeddings", False)),
            v_head_dim,
        )
    except KeyError as e:
        raise UnsupportedArchitecture(
            f"config.json of a {arch.model_type} model lacks {e.args[0]!r}"
        ) from None
    except (TypeError, ValueError) as e:
        raise UnsupportedArchitecture(
            f"config.json of a {arch.model_type} model has a bad size: {e}"
        ) from None


@dataclass(frozen=True)
class Moe:
    """The routing of a mixture of experts, from its ``config.json``.

    :param num_experts: routed experts per MoE layer
    :param top_k: experts each token is routed to
    :param layers: the layers whose MLP is the MoE block (the others are dense: DeepSeek's
        first ``first_k_dense_replace``, Qwen3-MoE's ``mlp_only_layers`` and those off its
        ``decoder_sparse_step``)
    :param shared: whether a shared expert runs beside the routed ones (DeepSeek-V3, Kimi K2)
    """

    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    shared: bool


def moe_of(config: dict[str, Any]) -> Moe | None:
    """The routing of a supported mixture of experts; ``None`` for a dense model."""
    arch = architecture_of(config)
    n_layers = int(config.get("num_hidden_layers") or 0)
    try:
        if arch.model_type == "mixtral":
            return Moe(
                int(config["num_local_experts"]),
                int(config["num_experts_per_tok"]),
                tuple(range(n_layers)),
                False,
            )
        if arch.model_type == "qwen3_moe":  # published: num_experts; transformers 5 saves
            n = int(config.get("num_experts") or config.get("num_local_experts") or 0)
            step = int(config.get("decoder_sparse_step") or 1)
            dense = set(config.get("mlp_only_layers") or [])
            layers = tuple(
                i for i in range(n_layers) if i not in dense and n > 0 and (i + 1) % step == 0
            )
            return Moe(n, int(config["num_experts_per_tok"]), layers, False)
        if arch.model_type in ("deepseek_v3", "kimi_k2"):
            first = int(config.get("first_k_dense_replace") or 0)
            return Moe(
                int(config.get("n_routed_experts") or config["num_local_experts"]),
                int(config["num_experts_per_tok"]),
                tuple(range(first, n_layers)),
                int(config.get("n_shared_experts") or 0) > 0,
            )
    except KeyError as e:
        raise UnsupportedArchitecture(
            f"config.json of a {arch.model_type} model lacks {e.args[0]!r}"
        ) from None
    return None
