"""Capacity planning from a checkpoint's ``config.json`` alone: ``tpm-faas plan``.

Given the published configuration of a dense or mixture-of-experts decoder, a GPU type and a
serving load (``context`` tokens for each of ``concurrency`` sequences), :func:`plan` computes

* the parameter count and the parameters one token reads (:class:`Model`);
* the smallest layout that serves the load (:class:`Layout`): tensor parallelism (TP) inside a
  node of :data:`GPUS_PER_NODE` GPUs, expert parallelism (EP) over every GPU for the routed
  experts of a mixture of experts, pipeline stages (PP) over nodes for a dense model too large
  for one node;
* the memory of one GPU under that layout (:class:`Memory`): weights, KV cache and a runtime
  reserve;
* a decode-throughput estimate from the memory-bandwidth roofline (:class:`Decode`), at batch
  1 and at ``concurrency``, and the SU a site would charge per 1,000 generated tokens.

Everything here is arithmetic on ``config.json``'s numbers; the formulas are in the docstrings
below and, with one worked example per bundled configuration, in ``docs/planning.md``.

The planner reads more architectures than the runtime serves today
(:mod:`tpm_faas.architectures`): it also plans the mixture-of-experts families the runtime is
to serve next (DeepSeek-V3 and Kimi K2 with multi-head latent attention, Qwen3-MoE, Mixtral).

Pure: no torch, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from tpm_faas.errors import ConfigError, RequestError, UnsupportedArchitecture

__all__ = [
    "ACHIEVABLE_FRACTION",
    "DTYPES",
    "GPU",
    "GPUS",
    "GPUS_PER_NODE",
    "Decode",
    "Layout",
    "Memory",
    "Model",
    "Part",
    "Plan",
    "model_from_config",
    "plan",
]

#: GPUs in one node (an HGX/DGX board): tensor parallelism stays inside a node.
GPUS_PER_NODE = 8
#: The most nodes the planner tries before it gives up.
MAX_NODES = 128
#: Bytes per weight: ``bf16`` stores every weight in 2 bytes; ``fp8`` stores the linear
#: weights of the decoder layers in 1 byte and keeps embeddings, the LM head, norms and router
#: gates in bf16 (as DeepSeek-V3's and Kimi K2's published FP8 checkpoints do).
DTYPES: dict[str, int] = {"bf16": 2, "fp8": 1}
#: Bytes per cached key/value number: the KV cache is bf16 whatever the weights are.
KV_CACHE_BYTES = 2
#: The fraction of peak HBM bandwidth a decode step's weight streaming attains. bench/decode.py
#: measured 3.00 TB/s device-to-device copy on an H100 SXM (90 % of its 3.35 TB/s peak,
#: bench/RESULTS.md); weight-streaming GEMV kernels reach less than a copy. ``--decode-bw``
#: replaces the peak x fraction by a measured figure.
ACHIEVABLE_FRACTION = 0.80
#: Runtime reserve per GPU: this fraction of its memory (activations, fragmentation, the
#: allocator's slack) ...
RESERVE_FRACTION = 0.10
#: ... plus this many bytes (CUDA context, NCCL buffers, captured CUDA graphs).
RESERVE_FIXED_BYTES = 3 * 2**30
#: The service unit: 1 SU = 1 GPU-hour. The project's policy files price requests in SU per
#: token (``tpm_faas/policy.py`` ``Rates``) without tying the SU to hardware; the planner
#: converts GPU time to SU at this rate.
GPU_HOURS_PER_SU = 1.0

Shard = Literal["tp", "kv", "replicated", "experts"]
Place = Literal["layers", "first", "last"]


@dataclass(frozen=True)
class GPU:
    """A GPU type.

    :param memory_gb: its memory as marketed, in decimal GB (10^9 bytes): a little under what
        ``nvidia-smi`` reports (an H100 80 GB shows 79.6 GiB = 85.5 GB), so plans err safe
    :param bandwidth_gb_s: peak HBM bandwidth, GB/s
    :param source: where the bandwidth figure comes from
    """

    name: str
    label: str
    memory_gb: float
    bandwidth_gb_s: float
    source: str

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


#: The GPU types the planner knows, by ``--gpu`` name.
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU(
            "h100-80g",
            "NVIDIA H100 SXM5 80 GB",
            80,
            3350,
            "NVIDIA H100 Tensor Core GPU datasheet: HBM3, 3.35 TB/s (SXM5)",
        ),
        GPU(
            "h200-141g",
            "NVIDIA H200 SXM 141 GB",
            141,
            4800,
            "NVIDIA H200 Tensor Core GPU datasheet: HBM3e, 4.8 TB/s (SXM)",
        ),
        GPU(
            "a100-80g",
            "NVIDIA A100 SXM4 80 GB",
            80,
            2039,
            "NVIDIA A100 Tensor Core GPU datasheet: HBM2e, 2,039 GB/s (80 GB SXM)",
        ),
    )
}


@dataclass(frozen=True)
class Part:
    """A group of weights that share a sharding rule.

    :param params: parameters in the whole model
    :param shard: how the part divides over GPUs: ``tp`` over the tensor-parallel ranks,
        ``kv`` by key/value heads (replicated once there are more ranks than heads),
        ``replicated`` on every rank (norms, routers, MLA's down-projections), ``experts``
        over the expert-parallel ranks
    :param place: ``layers`` (split by pipeline stages), ``first`` (the embeddings, on the
        first stage) or ``last`` (final norm and LM head, on the last stage)
    :param low_precision: a linear weight that ``fp8`` stores in 1 byte
    :param active: parameters one token reads
    """

    name: str
    params: int
    shard: Shard
    place: Place
    low_precision: bool
    active: int

    def bytes_per_param(self, dtype: str) -> int:
        return DTYPES[dtype] if self.low_precision else DTYPES["bf16"]


@dataclass(frozen=True)
class Model:
    """What ``config.json`` says about a decoder, in one spelling whatever the family.

    :param attention: ``mha``/``gqa`` (keys and values cached per KV head) or ``mla``
        (multi-head latent attention: one compressed latent per token and layer)
    :param kv_heads: key/value heads cached (1 for MLA: one latent serves every head)
    :param kv_values_per_token: numbers cached per token over all layers:
        ``2 x layers x kv_heads x head_dim`` for MHA/GQA,
        ``(kv_lora_rank + qk_rope_head_dim) x layers`` for MLA
    :param kv_window: a sliding-window model caches at most this many tokens per sequence
    :param expert_params: parameters of one routed expert (0 for a dense model)
    :param tensor_parallel: whether the model can be split by tensor parallelism at all
    :param mla_expanded_values_per_token: for MLA, numbers cached per token over all layers
        when keys and values are cached expanded (``layers x heads x (qk_head_dim +
        v_head_dim)``: what the serving decoder caches today, see docs/models.md)
    """

    model_type: str
    family: Literal["dense", "moe"]
    attention: Literal["mha", "gqa", "mla"]
    layers: int
    moe_layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    experts: int
    experts_per_token: int
    shared_experts: int
    expert_params: int
    kv_values_per_token: int
    kv_window: int | None
    tensor_parallel: bool
    parts: tuple[Part, ...]
    mla_expanded_values_per_token: int = 0

    @property
    def total_params(self) -> int:
        """Every stored parameter: embeddings, LM head unless tied, attention (with MLA's
        low-rank projections and their norms), dense MLPs, routed and shared experts, router
        gates, layer norms."""
        return sum(p.params for p in self.parts)

    @property
    def active_params(self) -> int:
        """Parameters one token reads: everything but the routed experts it is not sent to
        (``k`` of ``n`` per MoE layer) and, of an untied embedding table, all rows but its own."""
        return sum(p.active for p in self.parts)

    def kv_bytes_per_token(self) -> int:
        return self.kv_values_per_token * KV_CACHE_BYTES


@dataclass(frozen=True)
class Layout:
    """How the model is spread over GPUs.

    ``gpus = nodes x gpus_per_node = tensor_parallel x pipeline_parallel x data_parallel``:
    attention and the other non-expert weights are split ``tensor_parallel`` ways inside a node;
    a dense model too large for one node runs ``pipeline_parallel`` stages, one per node; a
    mixture of experts keeps one copy of its non-expert weights per node (``data_parallel``
    = nodes, each node serving its share of the sequences) and spreads the routed experts over
    all GPUs (``expert_parallel`` = gpus, ``experts / gpus`` each).
    """

    gpus: int
    nodes: int
    gpus_per_node: int
    tensor_parallel: int
    expert_parallel: int
    pipeline_parallel: int
    data_parallel: int

    def describe(self) -> str:
        """``48 GPUs = 6 nodes of 8; TP 8 (x 6 node replicas), experts EP 48``."""
        plural = "s" if self.gpus > 1 else ""
        if self.nodes == 1:
            where = f"{self.gpus} GPU{plural} in 1 node"
        else:
            where = f"{self.gpus} GPUs = {self.nodes} nodes of {self.gpus_per_node}"
        split = f"TP {self.tensor_parallel}"
        if self.pipeline_parallel > 1:
            split += f" x PP {self.pipeline_parallel}"
        if self.data_parallel > 1:
            split += f" (x {self.data_parallel} node replicas)"
        if self.expert_parallel > 1:
            split += f", experts EP {self.expert_parallel}"
        return f"{where}; {split}"


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU (the busiest: the first or last pipeline stage, the node with the most
    sequences)."""

    weights: float
    kv_cache: float
    reserve: float
    capacity: float

    @property
    def used(self) -> float:
        return self.weights + self.kv_cache + self.reserve

    @property
    def fits(self) -> bool:
        return self.used <= self.capacity


@dataclass(frozen=True)
class Decode:
    """The memory-bandwidth roofline of one decode step at ``batch`` sequences.

    :param bytes_per_step: bytes one GPU reads per step (a pipeline's stages in turn)
    :param su_per_1k_tokens: ``gpus x 1000 / (3600 x tokens_per_s)`` GPU-hours, 1 SU each
    """

    batch: int
    bytes_per_step: float
    step_seconds: float
    tokens_per_s: float
    su_per_1k_tokens: float


@dataclass(frozen=True)
class Plan:
    """The smallest layout for a model, a GPU type and a load, with its memory and roofline."""

    name: str
    model: Model
    gpu: GPU
    dtype: str
    context: int
    concurrency: int
    layout: Layout
    memory: Memory
    weights_total_bytes: float
    min_gpus_for_weights: int
    decode_batch1: Decode
    decode_concurrent: Decode
    bandwidth_gb_s: float
    bandwidth_source: str
    notes: tuple[str, ...]

    @property
    def min_nodes_for_weights(self) -> int:
        """Nodes of :data:`GPUS_PER_NODE` the weights alone fill: ``ceil(weights / (8 x
        memory))``; the plan adds the KV cache and the reserve on top."""
        return math.ceil(self.min_gpus_for_weights / GPUS_PER_NODE)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (``tpm-faas plan --json``)."""
        m = self.model
        model = {k: v for k, v in asdict(m).items() if k != "parts"} | {
            "total_params": m.total_params,
            "active_params": m.active_params,
            "kv_cache_bytes_per_token": m.kv_bytes_per_token(),
            "parts": {p.name: {"params": p.params, "active": p.active} for p in m.parts},
        }
        return {
            "name": self.name,
            "model": model,
            "gpu": asdict(self.gpu),
            "dtype": self.dtype,
            "context": self.context,
            "concurrency": self.concurrency,
            "layout": asdict(self.layout),
            "memory_per_gpu": asdict(self.memory) | {"used": self.memory.used},
            "weights_total_bytes": self.weights_total_bytes,
            "min_gpus_for_weights": self.min_gpus_for_weights,
            "min_nodes_for_weights": self.min_nodes_for_weights,
            "decode": {
                "bandwidth_gb_s": self.bandwidth_gb_s,
                "bandwidth_source": self.bandwidth_source,
                "batch1": asdict(self.decode_batch1),
                "concurrent": asdict(self.decode_concurrent),
            },
            "su": {
                "definition": f"1 SU = {GPU_HOURS_PER_SU:g} GPU-hour",
                "per_1k_tokens": self.decode_concurrent.su_per_1k_tokens,
                "per_1k_tokens_batch1": self.decode_batch1.su_per_1k_tokens,
                "policy_output_token": self.decode_concurrent.su_per_1k_tokens / 1000,
            },
            "assumptions": {
                "gpus_per_node": GPUS_PER_NODE,
                "achievable_bandwidth_fraction": ACHIEVABLE_FRACTION,
                "reserve_fraction": RESERVE_FRACTION,
                "reserve_fixed_bytes": RESERVE_FIXED_BYTES,
                "kv_cache_bytes_per_value": KV_CACHE_BYTES,
            },
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- config readers


class _Reader:
    """Typed access to ``config.json``'s keys; every failure is a :class:`ConfigError` that
    names the key."""

    def __init__(self, config: Mapping[str, Any], what: str) -> None:
        self.c = config
        self.what = what
        self.kind = str(config.get("model_type"))

    def integer(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        value = self.c.get(key)
        if value is None:
            if default is None:
                raise ConfigError(
                    f"{self.what} has no {key!r}, which a {self.kind} model needs for planning"
                )
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.what}: {key!r} must be a whole number, not {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.what}: {key!r} must be at least {minimum}, not {value}")
        return value

    def optional_int(self, key: str) -> int | None:
        return None if self.c.get(key) is None else self.integer(key)

    def flag(self, key: str, default: bool) -> bool:
        value = self.c.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.what}: {key!r} must be true or false, not {value!r}")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self.c.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{self.what}: {key!r} must be a list of layer numbers")
        return value


def _embeddings(d: int, vocab: int, tied: bool) -> list[Part]:
    """Embedding table ``V x d`` (a token reads one row), final norm ``d``, and the LM head
    ``V x d`` unless tied (then the table itself is the head and every row is read)."""
    parts = [
        Part("embedding", vocab * d, "tp", "first", False, vocab * d if tied else d),
        Part("final_norm", d, "replicated", "last", False, d),
    ]
    if not tied:
        parts.append(Part("lm_head", vocab * d, "tp", "last", False, vocab * d))
    return parts


def _moe_parts(
    moe_layers: int, n: int, k: int, expert: int, gate: int, shared: int = 0
) -> list[Part]:
    """Routed experts ``moe_layers x n x expert`` (a token reads ``k`` of the ``n``), shared
    experts (always read) and router gates (``moe_layers x gate``)."""
    parts = [
        Part("routed_experts", moe_layers * n * expert, "experts", "layers", True,
             moe_layers * k * expert),
        Part("router", moe_layers * gate, "replicated", "layers", False, moe_layers * gate),
    ]  # fmt: skip
    if shared:
        parts.append(Part("shared_experts", shared, "tp", "layers", True, shared))
    return parts


def _gqa(r: _Reader, *, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> dict[str, Any]:
    """Llama-style attention, per layer: ``q: d x H*hd``, ``k, v: d x kv*hd``,
    ``o: H*hd x d`` (plus biases where the family has them, and Qwen3's per-head q/k norms
    ``2 x hd``)."""
    d = r.integer("hidden_size")
    heads = r.integer("num_attention_heads")
    kv = r.integer("num_key_value_heads", heads)
    hd = r.integer("head_dim", d // heads)
    if heads % kv:
        raise ConfigError(
            f"{r.what}: num_attention_heads ({heads}) is not a multiple of "
            f"num_key_value_heads ({kv})"
        )
    q_o = 2 * d * heads * hd + (heads * hd if qkv_bias else 0) + (d if o_bias else 0)
    k_v = 2 * d * kv * hd + (2 * kv * hd if qkv_bias else 0)
    return {
        "d": d,
        "heads": heads,
        "kv": kv,
        "hd": hd,
        "q_o": q_o,
        "k_v": k_v,
        "norms": 2 * d + (2 * hd if qk_norm else 0),
        "attention": "mha" if kv == heads else "gqa",
    }


def _llama_like(r: _Reader) -> Model:
    """llama, mistral, qwen2, qwen3 (dense) and mixtral, qwen3_moe (experts in place of some
    MLPs). A dense MLP (SwiGLU) is ``3 x d x intermediate``; an expert too, at its own width; a
    router gate is ``n x d``."""
    kind = r.kind
    a = _gqa(
        r,
        qkv_bias=kind == "qwen2" or (kind == "llama" and r.flag("attention_bias", False)),
        o_bias=kind == "llama" and r.flag("attention_bias", False),
        qk_norm=kind in ("qwen3", "qwen3_moe"),
    )
    d, layers, vocab = a["d"], r.integer("num_hidden_layers"), r.integer("vocab_size")
    inter = r.integer("intermediate_size")
    mlp = 3 * d * inter
    if kind == "llama" and r.flag("mlp_bias", False):
        mlp += 2 * inter + d
    if kind == "mixtral":
        n, k = r.integer("num_local_experts"), r.integer("num_experts_per_tok")
        moe_layers, expert = layers, 3 * d * inter
    elif kind == "qwen3_moe":
        n, k = (
            r.integer("num_experts", 0, minimum=0),
            r.integer("num_experts_per_tok", 0, minimum=0),
        )
        step = r.integer("decoder_sparse_step", 1)
        dense_only = set(r.int_list("mlp_only_layers"))
        moe_layers = sum(
            1 for i in range(layers) if i not in dense_only and n > 0 and (i + 1) % step == 0
        )
        expert = 3 * d * r.integer("moe_intermediate_size") if moe_layers else 0
    else:
        n = k = moe_layers = expert = 0
    if moe_layers and not 0 < k <= n:
        raise ConfigError(f"{r.what}: num_experts_per_tok ({k}) must be between 1 and {n}")
    dense_layers = layers - moe_layers
    parts = [
        Part("attention", layers * a["q_o"], "tp", "layers", True, layers * a["q_o"]),
        Part("attention_kv", layers * a["k_v"], "kv", "layers", True, layers * a["k_v"]),
        Part("norms", layers * a["norms"], "replicated", "layers", False, layers * a["norms"]),
    ]
    if dense_layers:
        parts.append(Part("dense_mlp", dense_layers * mlp, "tp", "layers", True,
                          dense_layers * mlp))  # fmt: skip
    if moe_layers:
        parts += _moe_parts(moe_layers, n, k, expert, n * d)
    parts += _embeddings(d, vocab, r.flag("tie_word_embeddings", False))
    window = r.optional_int("sliding_window") if kind in ("mistral", "mixtral") else None
    return Model(
        model_type=kind,
        family="moe" if moe_layers else "dense",
        attention=a["attention"],
        layers=layers,
        moe_layers=moe_layers,
        hidden_size=d,
        heads=a["heads"],
        kv_heads=a["kv"],
        head_dim=a["hd"],
        vocab_size=vocab,
        max_position_embeddings=r.optional_int("max_position_embeddings"),
        experts=n,
        experts_per_token=k,
        shared_experts=0,
        expert_params=expert,
        kv_values_per_token=2 * layers * a["kv"] * a["hd"],
        kv_window=window,
        tensor_parallel=True,
        parts=tuple(parts),
    )


def _gpt2(r: _Reader) -> Model:
    """GPT-2: fused ``c_attn d x 3d + 3d``, ``c_proj d x d + d``, MLP ``d x inner + inner`` and
    ``inner x d + d``, two LayerNorms ``2 x 2d`` per layer, learned positions
    ``n_positions x d``, LM head tied to the token embeddings."""
    d, heads, layers = r.integer("n_embd"), r.integer("n_head"), r.integer("n_layer")
    vocab, positions = r.integer("vocab_size"), r.integer("n_positions", r.integer("n_ctx", 1024))
    inner = r.integer("n_inner", 4 * d)
    attn = d * 3 * d + 3 * d + d * d + d
    mlp = d * inner + inner + inner * d + d
    tied = r.flag("tie_word_embeddings", True)
    parts = [
        Part("attention", layers * attn, "tp", "layers", True, layers * attn),
        Part("norms", layers * 4 * d, "replicated", "layers", False, layers * 4 * d),
        Part("dense_mlp", layers * mlp, "tp", "layers", True, layers * mlp),
        Part("position_embedding", positions * d, "replicated", "first", False, d),
        Part("final_norm_bias", d, "replicated", "last", False, d),
        *_embeddings(d, vocab, tied),
    ]
    return Model(
        model_type="gpt2",
        family="dense",
        attention="mha",
        layers=layers,
        moe_layers=0,
        hidden_size=d,
        heads=heads,
        kv_heads=heads,
        head_dim=d // heads,
        vocab_size=vocab,
        max_position_embeddings=positions,
        experts=0,
        experts_per_token=0,
        shared_experts=0,
        expert_params=0,
        kv_values_per_token=2 * layers * d,
        kv_window=None,
        tensor_parallel=False,  # the runtime serves GPT-2 at tp=1 (AutoTP refuses it)
        parts=tuple(parts),
    )


def _mla(r: _Reader) -> Model:
    """DeepSeek-V2/V3 and Kimi K2: multi-head latent attention and DeepSeek-MoE.

    Attention per layer (``H`` heads, ``qk = qk_nope_head_dim + qk_rope_head_dim``):
    ``q_a: d x q_lora_rank`` + its norm ``q_lora_rank`` and ``q_b: q_lora_rank x H*qk`` (or
    ``q: d x H*qk`` without ``q_lora_rank``), ``kv_a: d x (kv_lora_rank + qk_rope_head_dim)`` +
    its norm ``kv_lora_rank``, ``kv_b: kv_lora_rank x H*(qk_nope_head_dim + v_head_dim)``,
    ``o: H*v_head_dim x d``. The down-projections (``q_a``, ``kv_a``) are replicated on every
    tensor-parallel rank, the up-projections split by head.

    Layer ``i`` is a MoE layer when ``i >= first_k_dense_replace`` and
    ``i % moe_layer_freq == 0``; it has ``n_routed_experts`` experts and one shared MLP of
    ``n_shared_experts x moe_intermediate_size``, each ``3 x d x width``, and a router gate
    ``n x d`` (+ a bias ``n`` for ``topk_method`` ``noaux_tc``). Other layers have a dense MLP
    ``3 x d x intermediate_size``. The multi-token-prediction modules
    (``num_nextn_predict_layers``) are not counted: they are loaded only for speculative decoding.
    """
    d, layers, heads = (
        r.integer("hidden_size"),
        r.integer("num_hidden_layers"),
        r.integer("num_attention_heads"),
    )
    vocab = r.integer("vocab_size")
    q_rank = r.optional_int("q_lora_rank")
    kv_rank, rope = r.integer("kv_lora_rank"), r.integer("qk_rope_head_dim")
    nope, v = r.integer("qk_nope_head_dim"), r.integer("v_head_dim")
    bias = r.flag("attention_bias", False)
    qk = nope + rope
    if q_rank:
        q_down, q_up = d * q_rank + (q_rank if bias else 0), q_rank * heads * qk
    else:
        q_down, q_up = 0, d * heads * qk
    kv_down = d * (kv_rank + rope) + ((kv_rank + rope) if bias else 0)
    norms = 2 * d + (q_rank or 0) + kv_rank
    up = q_up + kv_rank * heads * (nope + v) + heads * v * d + (d if bias else 0)
    down = q_down + kv_down
    n = r.integer("n_routed_experts", 0, minimum=0)
    first_dense = r.integer("first_k_dense_replace", 0, minimum=0)
    freq = r.integer("moe_layer_freq", 1)
    moe_layers = sum(1 for i in range(layers) if n and i >= first_dense and i % freq == 0)
    dense_layers = layers - moe_layers
    parts = [
        Part("attention", layers * up, "tp", "layers", True, layers * up),
        Part("attention_down", layers * down, "replicated", "layers", True, layers * down),
        Part("norms", layers * norms, "replicated", "layers", False, layers * norms),
    ]
    if dense_layers:
        mlp = 3 * d * r.integer("intermediate_size")
        parts.append(Part("dense_mlp", dense_layers * mlp, "tp", "layers", True,
                          dense_layers * mlp))  # fmt: skip
    k = shared = expert = 0
    if moe_layers:
        k = r.integer("num_experts_per_tok")
        if k > n:
            raise ConfigError(f"{r.what}: num_experts_per_tok ({k}) exceeds n_routed_experts ({n})")
        width = r.integer("moe_intermediate_size")
        expert = 3 * d * width
        shared = r.integer("n_shared_experts", 0, minimum=0)
        gate = n * d + (n if r.c.get("topk_method") == "noaux_tc" else 0)
        parts += _moe_parts(moe_layers, n, k, expert, gate, moe_layers * shared * expert)
    parts += _embeddings(d, vocab, r.flag("tie_word_embeddings", False))
    return Model(
        model_type=r.kind,
        family="moe" if moe_layers else "dense",
        attention="mla",
        layers=layers,
        moe_layers=moe_layers,
        hidden_size=d,
        heads=heads,
        kv_heads=1,  # one latent per token and layer, shared by every head
        head_dim=qk,
        vocab_size=vocab,
        max_position_embeddings=r.optional_int("max_position_embeddings"),
        experts=n if moe_layers else 0,
        experts_per_token=k,
        shared_experts=shared,
        expert_params=expert,
        kv_values_per_token=(kv_rank + rope) * layers,
        kv_window=None,
        tensor_parallel=True,
        parts=tuple(parts),
        mla_expanded_values_per_token=layers * heads * (qk + v),
    )


#: ``config.json`` ``model_type`` -> its reader.
READERS = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "mixtral": _llama_like,
    "qwen3_moe": _llama_like,
    "gpt2": _gpt2,
    "deepseek_v2": _mla,
    "deepseek_v3": _mla,
    "kimi_k2": _mla,
}


def model_from_config(config: Any, *, what: str = "config.json") -> Model:
    """The :class:`Model` of a parsed ``config.json``.

    :raises UnsupportedArchitecture: ``model_type`` missing or not one the planner reads
    :raises ConfigError: not a JSON object, or a key the family needs is missing or invalid
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{what} must be a JSON object, not {type(config).__name__}")
    kind = config.get("model_type")
    reader = READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        named = f"a {kind!r} model" if kind else "a config.json without model_type"
        raise UnsupportedArchitecture(
            f"{what} is {named}, which the planner cannot read; it reads {', '.join(READERS)}"
        )
    return reader(_Reader(config, what))


# --------------------------------------------------------------------------- layout


def _kv_heads_per_rank(model: Model, tp: int) -> int:
    """KV heads one tensor-parallel rank holds: ``kv / tp``, or 1 (replicated) when
    ``tp > kv``."""
    return model.kv_heads // tp if model.kv_heads >= tp else 1


def _candidates(model: Model, max_nodes: int) -> Iterator[Layout]:
    """Layouts from the smallest up: 1, 2, 4, 8 GPUs in one node, then whole nodes of 8.

    A layout is kept when it divides evenly: ``tensor_parallel`` divides the attention heads
    (and the KV heads, or they divide it); a mixture of experts' ``n`` experts divide over
    ``expert_parallel``; a pipeline has no more stages than layers.
    """
    sizes = [1, 2, 4, 8] + [GPUS_PER_NODE * n for n in range(2, max_nodes + 1)]
    for gpus in sizes:
        nodes = max(1, gpus // GPUS_PER_NODE)
        per_node = gpus // nodes
        tp = per_node if model.tensor_parallel else 1
        if tp != per_node or model.heads % tp:
            continue
        if model.attention != "mla" and model.kv_heads % tp and tp % model.kv_heads:
            continue
        if model.family == "moe":
            if model.experts % gpus:
                continue
            yield Layout(gpus, nodes, per_node, tp, gpus, 1, nodes)
        elif nodes <= model.layers:
            yield Layout(gpus, nodes, per_node, tp, 1, nodes, 1)


def _fraction(part: Part, model: Model, layout: Layout) -> float:
    """The share of ``part`` one rank holds: ``1/tp``, ``kv_heads_per_rank / kv``, 1 or
    ``1/ep``."""
    if part.shard == "tp":
        return 1 / layout.tensor_parallel
    if part.shard == "kv":
        return _kv_heads_per_rank(model, layout.tensor_parallel) / model.kv_heads
    if part.shard == "experts":
        return 1 / layout.expert_parallel
    return 1.0


def _weights_per_gpu(model: Model, layout: Layout, dtype: str, *, stages: int) -> float:
    """Weight bytes on one GPU: ``sum(params x bytes x share)``. With ``stages`` pipeline
    stages a stage holds ``ceil(layers / stages) / layers`` of the layer weights plus the
    larger of the first stage's embeddings and the last stage's head."""
    layer_share = math.ceil(model.layers / stages) / model.layers
    by_place = {"layers": 0.0, "first": 0.0, "last": 0.0}
    for p in model.parts:
        by_place[p.place] += p.params * p.bytes_per_param(dtype) * _fraction(p, model, layout)
    ends = by_place["first"] + by_place["last"]
    if stages > 1:
        ends = max(by_place["first"], by_place["last"])
    return by_place["layers"] * layer_share + ends


def _sequences_per_gpu(layout: Layout, concurrency: int) -> int:
    """Sequences whose KV cache one GPU holds: all of them along a pipeline, a node's share
    ``ceil(concurrency / nodes)`` where nodes are replicas."""
    return math.ceil(concurrency / layout.data_parallel)


def _kv_per_gpu(
    model: Model, layout: Layout, context: int, sequences: int, *, stages: int
) -> float:
    """KV-cache bytes on one GPU: ``sequences x tokens x kv_bytes_per_token x share``, where
    ``tokens = min(context, window)`` and the share is the rank's KV heads over all KV heads
    (MHA/GQA) or 1 (MLA's latent is one per token: every tensor-parallel rank keeps it), times
    ``ceil(layers / stages) / layers``."""
    tokens = min(context, model.kv_window) if model.kv_window else context
    share = 1.0
    if model.attention != "mla":
        share = _kv_heads_per_rank(model, layout.tensor_parallel) / model.kv_heads
    layer_share = math.ceil(model.layers / stages) / model.layers
    return sequences * tokens * model.kv_bytes_per_token() * share * layer_share


def _reserve(gpu: GPU) -> float:
    """``RESERVE_FRACTION x memory + RESERVE_FIXED_BYTES``."""
    return RESERVE_FRACTION * gpu.memory_bytes + RESERVE_FIXED_BYTES


def _memory(model: Model, layout: Layout, gpu: GPU, dtype: str, context: int,
            concurrency: int) -> Memory:  # fmt: skip
    stages = layout.pipeline_parallel
    return Memory(
        weights=_weights_per_gpu(model, layout, dtype, stages=stages),
        kv_cache=_kv_per_gpu(
            model, layout, context, _sequences_per_gpu(layout, concurrency), stages=stages
        ),
        reserve=_reserve(gpu),
        capacity=gpu.memory_bytes,
    )


# --------------------------------------------------------------------------- roofline


def experts_touched(n: int, k: int, batch: int) -> float:
    """Expected distinct experts of ``n`` that ``batch`` tokens, each routed to ``k``, touch
    in one MoE layer: ``n x (1 - (1 - k/n)^batch)`` (routing taken as uniform and independent)."""
    return n * (1 - (1 - k / n) ** batch)


def _decode(model: Model, layout: Layout, dtype: str, context: int, batch: int,
            bandwidth: float) -> Decode:  # fmt: skip
    """One decode step of ``batch`` sequences, each ``context`` tokens long (the slowest step).

    Each GPU reads its share of every non-expert weight, of the routed experts its local
    ``n / ep`` experts that the step touches (``experts_touched(n, k, batch) / ep`` per MoE
    layer), and the KV cache of its sequences. A pipeline's stages run in turn, so a step reads
    the whole model's tensor-parallel share. ``step = bytes / bandwidth``;
    ``tokens/s = batch / step``.
    """
    flat = Layout(
        layout.gpus, layout.nodes, layout.gpus_per_node, layout.tensor_parallel,
        layout.expert_parallel, 1, layout.data_parallel,
    )  # fmt: skip
    weights = 0.0
    for p in model.parts:
        share = p.params * p.bytes_per_param(dtype) * _fraction(p, model, flat)
        if p.shard == "experts":
            share *= experts_touched(model.experts, model.experts_per_token, batch) / model.experts
        elif p.name == "embedding" and p.active < p.params:
            share *= min(batch, model.vocab_size) / model.vocab_size  # the rows looked up
        weights += share
    kv = _kv_per_gpu(model, flat, context, _sequences_per_gpu(layout, batch), stages=1)
    step_bytes = weights + kv
    seconds = step_bytes / bandwidth
    tokens_per_s = batch / seconds
    su = layout.gpus * 1000 / (3600 * tokens_per_s) / GPU_HOURS_PER_SU
    return Decode(batch, step_bytes, seconds, tokens_per_s, su)


# --------------------------------------------------------------------------- plan


def plan(
    config: Any,
    *,
    gpu: str,
    dtype: str = "bf16",
    context: int = 8192,
    concurrency: int = 16,
    decode_bw_gb_s: float | None = None,
    name: str = "model",
    what: str = "config.json",
    max_nodes: int = MAX_NODES,
    mla_cache: str = "expanded",
) -> Plan:
    """The smallest layout of ``config`` on ``gpu`` that holds, on every GPU,
    ``weights + KV cache (context x concurrency) + reserve <= memory``, with its roofline.

    :param config: a parsed ``config.json``
    :param gpu: a key of :data:`GPUS`
    :param dtype: a key of :data:`DTYPES`
    :param decode_bw_gb_s: a measured per-GPU bandwidth (GB/s, e.g. ``copy_bandwidth_gb_s`` of
        ``bench/decode.py``), used as is instead of peak x :data:`ACHIEVABLE_FRACTION`
    :param mla_cache: for multi-head latent attention, ``expanded`` (keys and values per head,
        what the serving decoder caches today) or ``latent`` (the compressed latent, 35x
        smaller for Kimi K2: the target for long contexts)
    :raises ConfigError: unknown GPU or dtype, invalid config, or no layout up to
        ``max_nodes`` nodes fits
    :raises UnsupportedArchitecture: a ``model_type`` the planner does not read
    :raises RequestError: a non-positive context, concurrency or bandwidth
    """
    card = GPUS.get(gpu)
    if card is None:
        raise ConfigError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if context < 1 or concurrency < 1:
        raise RequestError(f"context ({context}) and concurrency ({concurrency}) must be >= 1")
    if decode_bw_gb_s is not None and not decode_bw_gb_s > 0:
        raise RequestError(f"the decode bandwidth must be positive, not {decode_bw_gb_s}")
    if mla_cache not in ("expanded", "latent"):
        raise ConfigError(f"unknown MLA cache {mla_cache!r}; known: expanded, latent")
    model = model_from_config(config, what=what)
    notes: list[str] = []
    if model.attention == "mla" and mla_cache == "expanded":
        # Keys and values per head, split by tensor parallelism like grouped-query attention.
        model = replace(
            model,
            attention="mha",
            kv_heads=model.heads,
            kv_values_per_token=model.mla_expanded_values_per_token,
        )
        notes.append(
            "MLA planned with expanded keys and values (what the decoder caches today); "
            "--mla-cache latent plans the compressed cache"
        )
    if model.max_position_embeddings and context > model.max_position_embeddings:
        notes.append(
            f"context {context} exceeds the model's max_position_embeddings "
            f"({model.max_position_embeddings})"
        )
    one = Layout(1, 1, 1, 1, 1, 1, 1)
    weights_total = _weights_per_gpu(model, one, dtype, stages=1)
    chosen: tuple[Layout, Memory] | None = None
    for layout in _candidates(model, max_nodes):
        memory = _memory(model, layout, card, dtype, context, concurrency)
        if memory.fits:
            chosen = layout, memory
            break
    if chosen is None:
        raise ConfigError(
            f"{name} ({weights_total / 1e9:,.0f} GB of {dtype} weights) does not fit "
            f"{context} tokens x {concurrency} sequences on up to {max_nodes} nodes of "
            f"{GPUS_PER_NODE} {card.label}"
        )
    layout, memory = chosen
    if decode_bw_gb_s is not None:
        bandwidth = decode_bw_gb_s * 1e9
        source = f"measured {decode_bw_gb_s:,.0f} GB/s per GPU (--decode-bw)"
    else:
        bandwidth = card.bandwidth_gb_s * 1e9 * ACHIEVABLE_FRACTION
        source = (
            f"{ACHIEVABLE_FRACTION:.0%} of the {card.bandwidth_gb_s:,.0f} GB/s peak ({card.source})"
        )
    if model.family == "moe" and layout.gpus > 1:
        notes.append(
            "expert loads are averages: in a step the GPU holding the most selected experts "
            "sets the pace (not modelled)"
        )
    return Plan(
        name=name,
        model=model,
        gpu=card,
        dtype=dtype,
        context=context,
        concurrency=concurrency,
        layout=layout,
        memory=memory,
        weights_total_bytes=weights_total,
        min_gpus_for_weights=math.ceil(weights_total / card.memory_bytes),
        decode_batch1=_decode(model, layout, dtype, context, 1, bandwidth),
        decode_concurrent=_decode(model, layout, dtype, context, concurrency, bandwidth),
        bandwidth_gb_s=bandwidth / 1e9,
        bandwidth_source=source,
        notes=tuple(notes),
    )
