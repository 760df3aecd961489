"""The pieces of a pre-norm decoder block, per architecture, over the model's own modules.

The serving decoder (:mod:`tpm_faas.runtime.decoder`) runs one loop for every architecture::

    x = embed(ids, positions)                                  # site: embed
    for block i:                                               # site: resid_pre
        q, k, v = qkv(i, x, rope)  -> attention with the KV cache -> z     # attn.hook_z
        a = attn_out(i, z)                                     # hook_attn_out
        x = x + a                                              # hook_resid_mid
        m = mlp(i, x)                                          # hook_mlp_out
        x = x + m                                              # hook_resid_post
    logits = unembed(norm(x))                                  # ln_final, unembed

Each class here maps those calls onto a ``transformers`` model's modules, which may be
DeepSpeed AutoTP-sharded (column-parallel projections hold this rank's heads, row-parallel
ones all-reduce), so the canonical hook sites mean the same thing on every backend. One class
per difference of shape, for the architectures of :data:`tpm_faas.architectures.SUPPORTED`:

* :class:`Arch`: Llama-shaped blocks (``llama``, ``mistral``, ``qwen2``, ``mixtral``): RMSNorm,
  rotary positions from the model's own ``rotary_emb`` (any static RoPE type: default, ``llama3``,
  ``linear``, ``yarn``), grouped-query attention, whatever biases the projections carry (Qwen2's
  on q/k/v), ``head_dim`` from the config;
* :class:`Qwen3Arch`: adds Qwen3's per-head RMSNorm of queries and keys (``q_norm``,
  ``k_norm``) between the projection and the rotary embedding (``qwen3``), and
  :class:`Qwen3MoeArch` the same for ``qwen3_moe``;
* :class:`DeepseekV3Arch`: DeepSeek-V3 and Kimi K2, multi-head latent attention (keys wider
  than values: ``v_head_dim`` is ``attn.hook_z``'s per-head width);
* :class:`GPT2Arch`: learned positions, fused ``c_attn``, ``Conv1D`` projections, LayerNorm.

A mixture of experts (Mixtral, Qwen3-MoE, DeepSeek-V3) differs from a dense model only in the
block's ``mlp``: ``transformers`` makes it the sparse MoE block (router, top-k, the experts'
fused 3-D weights; DeepSeek's shared experts), or a dense MLP in Qwen3-MoE's
``mlp_only_layers`` and off its ``decoder_sparse_step``, and in DeepSeek's first
``first_k_dense_replace`` layers. :meth:`Arch.mlp` runs a dense MLP as it is, and a MoE block
step by step over its own parameters (:mod:`tpm_faas.runtime.moe`: the router's logits, the
chosen experts and their weights, the routed and shared outputs are hook sites), so
``hook_mlp_out`` is the MoE block's output (the weighted sum of the chosen experts, plus the
shared experts').
"""

from __future__ import annotations

from typing import Any

import torch

from tpm_faas.architectures import DYNAMIC_ROPE, architecture_of
from tpm_faas.errors import UnsupportedArchitecture
from tpm_faas.runtime import moe
from tpm_faas.runtime.interventions import Tap


def byte_llama_config(**shape: Any) -> Any:
    """A ``transformers.LlamaConfig`` on the byte tokenizer's vocabulary (the demo models').

    :param shape: sizes and other config fields (``hidden_size``, ``num_hidden_layers``, ...)
    """
    from transformers import LlamaConfig

    from tpm_faas.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    kwargs: dict[str, Any] = {
        "vocab_size": tok.vocab_size,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        **shape,
    }
    return LlamaConfig(**kwargs)


class Arch:
    """Llama-shaped blocks: Llama 2/3/3.1, Mistral, Qwen2/2.5 (they differ only in config:
    biases, ``head_dim``, RoPE parameters, tied embeddings)."""

    name = "llama"

    def __init__(self, model: Any, max_len: int) -> None:
        cfg = model.config
        core = model.model
        self.model = model
        self.blocks: list[Any] = list(core.layers)
        self.final_norm: Any = core.norm
        self.lm_head: Any = model.lm_head
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        #: Per-head width of values, and of ``attn.hook_z`` (``head_dim`` but under MLA).
        self.v_head_dim = self.head_dim
        self.scaling = self.head_dim**-0.5
        self.d_model = int(cfg.hidden_size)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._embed = core.embed_tokens
        attn0 = self.blocks[0].self_attn
        # Heads this rank holds (all of them at tp=1; a share of them under AutoTP).
        self.q_heads = int(attn0.q_proj.weight.shape[0]) // self.head_dim
        self.kv_heads = int(attn0.k_proj.weight.shape[0]) // self.head_dim
        rope = getattr(cfg, "rope_parameters", None) or {}
        kind = str(rope.get("rope_type", "default")) if isinstance(rope, dict) else "default"
        if kind in DYNAMIC_ROPE:
            raise UnsupportedArchitecture(
                f"rope_type {kind!r} recomputes its frequencies from the sequence length; "
                "the serving decoder serves static RoPE types only"
            )
        # The model's own rotary module (its inv_freq and attention scaling, e.g. Llama 3.1's
        # rope_scaling), evaluated once for every position the cache holds.
        positions = torch.arange(max_len, device=self.device)[None]
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = core.rotary_emb(dummy, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self._find_moe()

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``ids`` and their ``positions`` ``[b, t]`` → ``[b, t, d]``."""
        out: torch.Tensor = self._embed(ids)
        return out

    def rope(self, positions: torch.Tensor) -> Any:
        """What :meth:`qkv` needs of ``positions`` ``[b, t]``: cos and sin ``[b, 1, t, d]``."""
        flat = positions.reshape(-1)
        cos = self.cos.index_select(0, flat).view(*positions.shape, -1)[:, None]
        sin = self.sin.index_select(0, flat).view(*positions.shape, -1)[:, None]
        return cos, sin

    def qkv(
        self, i: int, x: torch.Tensor, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys ``[b, heads, t, head_dim]`` (rotary applied) and values
        ``[b, heads, t, v_head_dim]``."""
        b, t, _ = x.shape
        block = self.blocks[i]
        h = block.input_layernorm(x)
        attn = block.self_attn
        q = attn.q_proj(h).view(b, t, self.q_heads, self.head_dim)
        k = attn.k_proj(h).view(b, t, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.qk_norm(attn, q, k)
        cos, sin = rope
        return _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin), v

    def qk_norm(
        self, attn: Any, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the architecture does to queries and keys ``[b, t, heads, head_dim]`` between
        the projection and the rotary embedding (nothing here)."""
        return q, k

    def attn_out(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """``z`` ``[b, t, heads, v_head_dim]`` → the output projection ``[b, t, d]``."""
        b, t = z.shape[:2]
        out: torch.Tensor = self.blocks[i].self_attn.o_proj(z.reshape(b, t, -1))
        return out

    def mlp(self, i: int, x: torch.Tensor, tap: Tap | None = None) -> torch.Tensor:
        """The block's MLP on the residual ``x``: a dense MLP as the model's module runs it,
        a MoE block through :func:`tpm_faas.runtime.moe.forward` (with its sites)."""
        block = self.blocks[i]
        h = block.post_attention_layernorm(x)
        if i in self.moe_layers:
            return moe.forward(block.mlp, self.moe_kind, h, tap, i)
        out: torch.Tensor = block.mlp(h)
        return out

    def _find_moe(self) -> None:
        """The MoE layers (:attr:`moe_layers`), their routing (:attr:`moe_kind`), experts
        and experts per token."""
        self.moe_layers = frozenset(i for i, b in enumerate(self.blocks) if moe.is_moe(b.mlp))
        self.moe_kind, self.num_experts, self.top_k = "", 0, 0
        if self.moe_layers:
            gate = self.blocks[min(self.moe_layers)].mlp.gate
            self.moe_kind = moe.router_kind(str(self.model.config.model_type))
            self.num_experts, self.top_k = int(gate.weight.shape[0]), int(gate.top_k)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.final_norm(x)
        return out

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(x)
        return out


class Qwen3Arch(Arch):
    """Qwen3: Llama-shaped blocks plus an RMSNorm over each query and key head (weights of
    ``head_dim``, shared by the heads, so AutoTP leaves them whole on every rank)."""

    name = "qwen3"

    def qk_norm(
        self, attn: Any, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q_out: torch.Tensor = attn.q_norm(q)
        k_out: torch.Tensor = attn.k_norm(k)
        return q_out, k_out


class Qwen3MoeArch(Arch):
    """Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm); its MoE or dense ``mlp`` per layer
    is the model's own module."""

    name = "qwen3_moe"
    qk_norm = Qwen3Arch.qk_norm


class DeepseekV3Arch(Arch):
    """DeepSeek-V3 and Kimi K2: multi-head latent attention (MLA) and a mixture of experts.

    Queries come through ``q_proj``, or the low-rank ``q_a_proj`` → ``q_a_layernorm`` →
    ``q_b_proj`` when ``q_lora_rank`` is set; keys and values from one latent
    (``kv_a_proj_with_mqa`` → ``kv_a_layernorm`` → ``kv_b_proj``) plus a rotary key part shared
    by every head. The decoder caches the expanded keys (``qk_nope_head_dim +
    qk_rope_head_dim`` per head) and values (``v_head_dim``) of every head, so its attention is
    the same scaled dot product as the other families' (see docs/models.md for why not the
    latent). The rotary part is applied exactly as ``transformers`` does: interleaved pairs
    when ``rope_interleave``, else rotate-half; the scaling is the attention module's own
    (``qk_head_dim ** -0.5`` times the square of YaRN's ``mscale_all_dim`` correction). The
    ``mlp`` is the model's own module: the MoE (sigmoid router with ``e_score_correction_bias``,
    group-limited top-k, ``routed_scaling_factor``, plus the shared experts) from layer
    ``first_k_dense_replace`` on, a dense MLP before."""

    name = "deepseek_v3"

    def __init__(self, model: Any, max_len: int) -> None:
        cfg = model.config
        core = model.model
        self.model = model
        self.blocks = list(core.layers)
        self.final_norm = core.norm
        self.lm_head = model.lm_head
        self.d_model = int(cfg.hidden_size)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._embed = core.embed_tokens
        self.nope, self.rot = int(cfg.qk_nope_head_dim), int(cfg.qk_rope_head_dim)
        self.head_dim = self.nope + self.rot
        self.v_head_dim = int(cfg.v_head_dim)
        self.kv_rank = int(cfg.kv_lora_rank)
        self.interleave = bool(getattr(cfg, "rope_interleave", False))
        attn0 = self.blocks[0].self_attn
        self.scaling = float(attn0.scaling)
        kv_b = int(attn0.kv_b_proj.weight.shape[0])
        self.q_heads = self.kv_heads = kv_b // (self.nope + self.v_head_dim)
        positions = torch.arange(max_len, device=self.device)[None]
        dummy = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = core.rotary_emb(dummy, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, qk_rope_head_dim]
        self._find_moe()

    def qkv(
        self, i: int, x: torch.Tensor, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys ``[b, heads, t, qk_head_dim]``, values ``[b, heads, t, v_head_dim]``."""
        b, t, _ = x.shape
        block = self.blocks[i]
        h = block.input_layernorm(x)
        attn = block.self_attn
        if attn.q_proj is not None:
            q = attn.q_proj(h)
        else:
            q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(h)))
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.nope, self.rot], dim=-1)
        latent, k_rot = torch.split(attn.kv_a_proj_with_mqa(h), [self.kv_rank, self.rot], dim=-1)
        latent = attn.kv_a_layernorm(latent)
        k_rot = k_rot.view(b, 1, t, self.rot)
        cos, sin = rope
        if self.interleave:
            q_rot, k_rot = (
                _rotate_interleaved(q_rot, cos, sin),
                _rotate_interleaved(k_rot, cos, sin),
            )
        else:
            q_rot, k_rot = _rotate(q_rot, cos, sin), _rotate(k_rot, cos, sin)
        kv = attn.kv_b_proj(latent).view(b, t, -1, self.nope + self.v_head_dim).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        return torch.cat((q_pass, q_rot), dim=-1), k, v


class GPT2Arch(Arch):
    """GPT-2: learned positions, fused ``c_attn``, ``Conv1D`` projections, LayerNorm."""

    name = "gpt2"

    def __init__(self, model: Any, max_len: int) -> None:
        cfg = model.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(
            cfg, "reorder_and_upcast_attn", False
        ):
            raise UnsupportedArchitecture(
                "GPT-2 variants with per-layer attention scaling or upcast attention"
            )
        core = model.transformer
        self.model = model
        self.blocks = list(core.h)
        self.final_norm = core.ln_f
        self.lm_head = model.lm_head
        self.head_dim = self.v_head_dim = int(cfg.n_embd // cfg.n_head)
        self.scaling = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self._wte, self._wpe = core.wte, core.wpe
        self.q_heads = self.kv_heads = int(cfg.n_head)
        self.d_model = int(cfg.n_embd)
        self._find_moe()

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._wte(ids) + self._wpe(positions)
        return out

    def rope(self, positions: torch.Tensor) -> Any:
        return None

    def qkv(
        self, i: int, x: torch.Tensor, rope: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        block = self.blocks[i]
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.d_model, dim=2)
        shape = (b, t, self.q_heads, self.head_dim)
        return (
            q.view(shape).transpose(1, 2),
            k.view(shape).transpose(1, 2),
            v.view(shape).transpose(1, 2),
        )

    def attn_out(self, i: int, z: torch.Tensor) -> torch.Tensor:
        b, t = z.shape[:2]
        out: torch.Tensor = self.blocks[i].attn.c_proj(z.reshape(b, t, -1))
        return out

    def mlp(self, i: int, x: torch.Tensor, tap: Tap | None = None) -> torch.Tensor:
        block = self.blocks[i]
        out: torch.Tensor = block.mlp(block.ln_2(x))
        return out


#: The block mapping of each served ``model_type`` (the keys of
#: :data:`tpm_faas.architectures.SUPPORTED`, no other; a unit test holds them equal).
ARCHES: dict[str, type[Arch]] = {
    "llama": Arch,
    "mistral": Arch,
    "qwen2": Arch,
    "qwen3": Qwen3Arch,
    "gpt2": GPT2Arch,
    "mixtral": Arch,
    "qwen3_moe": Qwen3MoeArch,
    "deepseek_v3": DeepseekV3Arch,
    "kimi_k2": DeepseekV3Arch,  # served as deepseek_v3 (architectures.SUPPORTED)
}


def arch_for(model: Any, max_len: int) -> Arch:
    """The block pieces of ``model`` (a ``*ForCausalLM``, possibly AutoTP-sharded);
    :class:`UnsupportedArchitecture` naming the served ones for any other ``model_type``."""
    kind = str(getattr(model.config, "model_type", "") or "")
    arch = architecture_of({"model_type": kind}, what="this model")
    return ARCHES[arch.model_type](model, max_len)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved rotary pairs ``(x0, x1), (x2, x3), ...`` (``rope_interleave``),
    written out as ``transformers``' ``apply_rotary_pos_emb_interleave``: the rotated pairs'
    first and second members, each half together."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
