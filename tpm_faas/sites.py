"""Canonical hook sites: names that mean the same place in every backend's forward pass.

Names follow TransformerLens. For a pre-norm decoder block ``i`` (Llama and GPT-2 alike)::

    blocks.{i}.hook_resid_pre   the residual stream entering block i       [d_model]
    blocks.{i}.attn.hook_z      attention output per head, before the     [n_heads, d_head]
                                output projection
    blocks.{i}.hook_attn_out    the attention output projection            [d_model]
    blocks.{i}.hook_resid_mid   resid_pre + attn_out                      [d_model]
    blocks.{i}.hook_mlp_out     the MLP's output (its norm included)       [d_model]
    blocks.{i}.hook_resid_post  resid_mid + mlp_out                        [d_model]

At the MoE layers of a mixture of experts (Mixtral, Qwen3-MoE, DeepSeek-V3, Kimi K2), between
``hook_resid_mid`` and ``hook_mlp_out``, the router and the experts have sites of their own::

    blocks.{i}.mlp.hook_router_logits   the router's logits, one per routed expert  [n_experts]
                                        (before its softmax or sigmoid; the routing is
                                        computed from them, so a write steers it; the op
                                        ``drop_experts`` knocks experts out here)
    blocks.{i}.mlp.hook_expert_indices  the experts chosen, heaviest first (read)  [top_k]
    blocks.{i}.mlp.hook_expert_weights  their weights in the combination, after    [top_k]
                                        the architecture's normalisation and
                                        scaling (read)
    blocks.{i}.mlp.hook_routed_out      the chosen experts' weighted sum           [d_model]
    blocks.{i}.mlp.hook_shared_out      the shared expert's output (DeepSeek-V3,   [d_model]
                                        Kimi K2)

and ``hook_mlp_out`` is their sum. Outside the blocks ``embed`` (what enters block 0: token
embeddings, plus the learned position embeddings on GPT-2), ``ln_final`` (the final norm's
output) and ``unembed`` (the logits, ``[vocab]``). Shapes are per token. This module is pure:
the gateway validates and prices a spec with it, without torch and without the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tpm_faas.architectures import dims, moe_of
from tpm_faas.errors import RequestError

#: Sites inside every block, in the order the forward pass reaches them.
BLOCK_SITES = (
    "hook_resid_pre",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
#: Sites of a mixture of experts' MoE layers, in forward order (between ``hook_resid_mid``
#: and ``hook_mlp_out``).
MOE_SITES = (
    "mlp.hook_router_logits",
    "mlp.hook_expert_indices",
    "mlp.hook_expert_weights",
    "mlp.hook_routed_out",
    "mlp.hook_shared_out",
)
#: MoE sites that are read and never written: the routing's outcome.
READ_ONLY_SITES = frozenset({"mlp.hook_expert_indices", "mlp.hook_expert_weights"})
#: Every block site's kind, in forward order.
ALL_BLOCK_SITES = (*BLOCK_SITES[:4], *MOE_SITES, *BLOCK_SITES[4:])
#: Sites outside the blocks.
GLOBAL_SITES = ("embed", "ln_final", "unembed")

# One spelling per site: ASCII digits, no leading zero (\d would take any Unicode digit).
_BLOCK_NAME = re.compile(
    r"blocks\.(0|[1-9][0-9]{0,4})\.(" + "|".join(map(re.escape, ALL_BLOCK_SITES)) + r")"
)


@dataclass(frozen=True)
class ModelShape:
    """The sizes a site's shape depends on. ``head_dim`` is the per-head width of
    ``attn.hook_z``: the values' (``v_head_dim``) under multi-head latent attention, where the
    queries and keys are wider."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    vocab_size: int
    #: Routed experts of a mixture of experts (0: dense), experts per token, its MoE layers
    #: and whether it has a shared expert (:class:`tpm_faas.architectures.Moe`).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_layers: tuple[int, ...] = ()
    shared_experts: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a ``transformers`` ``config.json`` of a supported architecture
        (:mod:`tpm_faas.architectures`)."""
        d = dims(config)
        moe = moe_of(config)
        return cls(
            d.model_type,
            d.num_layers,
            d.hidden_size,
            d.num_heads,
            d.v_head_dim,
            d.vocab_size,
            *((moe.num_experts, moe.top_k, moe.layers, moe.shared) if moe else ()),
        )

    def block_sites(self, layer: int) -> tuple[str, ...]:
        """The kinds of site block ``layer`` has, in forward order."""
        if layer not in self.moe_layers:
            return BLOCK_SITES
        moe = MOE_SITES if self.shared_experts else MOE_SITES[:-1]
        return (*BLOCK_SITES[:4], *moe, *BLOCK_SITES[4:])


@dataclass(frozen=True, order=True)
class Site:
    """One hook site: ``kind`` is a block site (with its ``layer``) or a global one (layer -1)."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return self.kind if self.layer < 0 else f"blocks.{self.layer}.{self.kind}"

    @property
    def per_head(self) -> bool:
        return self.kind == "attn.hook_z"

    @property
    def read_only(self) -> bool:
        return self.kind in READ_ONLY_SITES

    def shape(self, m: ModelShape) -> list[int]:
        """The site's shape for one token."""
        if self.kind == "attn.hook_z":
            return [m.num_heads, m.head_dim]
        if self.kind == "mlp.hook_router_logits":
            return [m.num_experts]
        if self.kind in READ_ONLY_SITES:
            return [m.experts_per_token]
        if self.kind == "unembed":
            return [m.vocab_size]
        return [m.hidden_size]


def parse_site(name: str, m: ModelShape) -> Site:
    """The site a full name denotes, checked against the model."""
    if name in GLOBAL_SITES:
        return Site(-1, name)
    match = _BLOCK_NAME.fullmatch(name)
    if match is None:
        raise RequestError(f"unknown hook site {name!r}; see `tpm-faas sites MODEL`")
    layer = int(match.group(1))
    if layer >= m.num_layers:
        raise RequestError(f"hook site {name!r}: the model has {m.num_layers} layers")
    kind = match.group(2)
    if kind not in m.block_sites(layer):
        raise RequestError(f"hook site {name!r}: {_why_not(kind, layer, m)}")
    return Site(layer, kind)


def _why_not(kind: str, layer: int, m: ModelShape) -> str:
    """Why block ``layer`` of ``m`` has no MoE site ``kind``."""
    if not m.moe_layers:
        return "the model is dense (no router or experts)"
    if layer not in m.moe_layers:
        first = ", ".join(map(str, m.moe_layers[:8])) + (", ..." if len(m.moe_layers) > 8 else "")
        return f"layer {layer} has a dense MLP (MoE layers: {first})"
    return "the model has no shared expert"


def all_sites(m: ModelShape) -> list[Site]:
    """Every site of a model, in forward order."""
    return [
        Site(-1, "embed"),
        *(Site(i, k) for i in range(m.num_layers) for k in m.block_sites(i)),
        Site(-1, "ln_final"),
        Site(-1, "unembed"),
    ]


def site_table(m: ModelShape) -> list[dict[str, Any]]:
    """Rows for ``tpm-faas sites``: name and per-token shape of every site."""
    return [{"site": s.name, "shape": s.shape(m)} for s in all_sites(m)]
