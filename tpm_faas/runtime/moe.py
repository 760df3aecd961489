"""A mixture of experts' MoE block as the serving runtime runs it: router, experts, shared
expert, with hook sites inside and the routed experts spread over the ranks.

``transformers`` computes the routing inside its router module and returns only the chosen
experts, so neither its logits nor the choice can be edited from outside. Here the block is
run step by step over the model's own parameters (``mlp.gate.weight``, the fused 3-D
``mlp.experts.gate_up_proj`` / ``down_proj``, DeepSeek's ``mlp.shared_experts``), with the
same operations in the same order as ``transformers``, so the result equals its forward::

    logits  = h @ gate.weight.T                       # site mlp.hook_router_logits  [E]
    experts, weights = route(logits)                  # mlp.hook_expert_indices, _weights [k]
    routed  = sum_j weights_j * expert_j(h)           # mlp.hook_routed_out (all-reduced
                                                      #   over the ranks under EP)
    shared  = shared_experts(h)                       # mlp.hook_shared_out (DeepSeek-V3)
    out     = routed + shared                         # hook_mlp_out

The routing, per architecture (:data:`ROUTERS`):

* ``mixtral``: softmax over the experts (fp32), top-k, the k weights renormalised to sum 1;
* ``qwen3_moe``: the same, renormalised only with ``norm_topk_prob``;
* ``deepseek_v3`` (and Kimi K2): sigmoid scores; the choice adds ``e_score_correction_bias``
  and is limited to the ``topk_group`` groups of experts whose two best choices score highest
  (with experts dropped: the best two left; a group with none left is never kept);
  the weights are the chosen experts' scores (without the bias), renormalised with
  ``norm_topk_prob``, times ``routed_scaling_factor``.

An expert whose logit is ``-inf`` is never chosen (the op ``drop_experts`` puts it there): the
softmax gives it no mass and top-k passes over it; DeepSeek's choice masks it before the group
and top-k selection (should the kept groups hold fewer than ``top_k`` experts left, the
remaining picks have weight 0: a dropped expert never contributes). So dropping experts
renormalises the routing over the others exactly as the architecture routes. Chosen experts
are returned heaviest first.

**Expert parallelism.** :func:`install` replaces each MoE block's ``mlp`` by
:class:`MoEBlock` (the same parameter names) and, with ``ep_size > 1``, gives rank ``r`` the
contiguous experts ``[r * E / ep, (r + 1) * E / ep)``: its fused expert parameters shrink to
that share on the meta device, so :func:`~.model_store.load_shard` reads only those experts.
Every rank computes the same routing (the router is whole on every rank), runs the chosen
experts it holds and all-reduces the partial sums; the shared expert is whole on every rank
(or AutoTP-sharded with the attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tpm_faas.architectures import architecture_of
from tpm_faas.errors import ConfigError
from tpm_faas.runtime.interventions import Tap
from tpm_faas.sites import Site


def is_moe(mlp: Any) -> bool:
    """Whether a block's ``mlp`` is a mixture of experts (router and fused experts)."""
    return hasattr(mlp, "gate") and hasattr(getattr(mlp, "experts", None), "gate_up_proj")


def router_kind(model_type: str) -> str:
    """The routing of a served ``model_type``: ``mixtral``, ``qwen3_moe`` or ``deepseek_v3``."""
    arch = architecture_of({"model_type": model_type})
    kind = arch.served_as or arch.model_type
    if kind not in ROUTERS:
        raise ConfigError(f"{model_type} is not a mixture of experts")
    return kind


def _softmax_topk(gate: Any, logits: torch.Tensor, *, always_norm: bool) -> tuple[Any, Any]:
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, gate.top_k, dim=-1)
    if always_norm or gate.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return idx, top


def _route_mixtral(gate: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _softmax_topk(gate, logits, always_norm=True)  # weights stay fp32, as there


def _route_qwen3(gate: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx, top = _softmax_topk(gate, logits, always_norm=False)
    return idx, top.to(logits.dtype)


def _route_deepseek(gate: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_experts, groups = gate.num_experts, gate.num_group
    scores = logits.sigmoid()
    choice = scores + gate.e_score_correction_bias
    dropped = torch.isneginf(logits)
    choice = choice.masked_fill(dropped, float("-inf"))
    # A group scores the sum of its two best choices; with experts dropped, of the best two
    # it has left (one: that one; none: -inf). Without drops this is the plain sum.
    best = choice.view(-1, groups, n_experts // groups).topk(2, dim=-1)[0]
    group_scores = best.masked_fill(torch.isneginf(best), 0.0).sum(dim=-1)
    group_scores = group_scores.masked_fill(torch.isneginf(best[..., 0]), float("-inf"))
    group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(-1, groups, n_experts // groups).reshape(-1, n_experts)
    )
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    idx = torch.topk(choice, k=gate.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    # Should the kept groups hold fewer than top_k experts left, the rest of the picks are
    # -inf ties (any expert): they weigh nothing. Without drops this changes nothing.
    weights = weights.masked_fill(torch.isneginf(choice.gather(1, idx)), 0.0)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * gate.routed_scaling_factor
    # Heaviest first (the sum over experts does not depend on the order).
    weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
    return idx.gather(1, order), weights


#: How each architecture turns router logits ``[n, E]`` into (experts, weights) ``[n, k]``.
ROUTERS: dict[str, Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "mixtral": _route_mixtral,
    "qwen3_moe": _route_qwen3,
    "deepseek_v3": _route_deepseek,
}


def router_logits(mlp: Any, kind: str, h: torch.Tensor) -> torch.Tensor:
    """The router's logits ``[n, E]`` of tokens ``h`` ``[n, d]`` (DeepSeek's in fp32, as there)."""
    weight = mlp.gate.weight
    if kind == "deepseek_v3":
        return F.linear(h.float(), weight.float())
    return F.linear(h, weight)


def run_experts(
    mlp: Any, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``sum_j weights[:, j] * expert_{idx[:, j]}(h)`` over the chosen experts this rank holds
    (all of them without expert parallelism): ``[n, d]``, in ``h``'s dtype.

    The loop of ``transformers``' eager experts: one gathered matmul pair per expert that any
    token chose, its tokens' rows added back in place."""
    experts = mlp.experts
    first = int(getattr(mlp, "first_expert", 0))
    local = int(experts.gate_up_proj.shape[0])
    out = torch.zeros_like(h)
    n_global = int(getattr(mlp, "num_experts", 0) or local)
    with torch.no_grad():
        mask = F.one_hot(idx, num_classes=n_global).permute(2, 1, 0)  # [E, k, n]
        hit = torch.greater(mask[first : first + local].sum(dim=(-1, -2)), 0).nonzero()
    for row in hit:
        e = int(row[0])
        top_pos, token = torch.where(mask[first + e])
        state = h[token]
        gate, up = F.linear(state, experts.gate_up_proj[e]).chunk(2, dim=-1)
        cur = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        cur = cur * weights[token, top_pos, None]
        out.index_add_(0, token, cur.to(out.dtype))
    return out


def forward(
    mlp: Any, kind: str, x: torch.Tensor, tap: Tap | None = None, layer: int = -1
) -> torch.Tensor:
    """The MoE block on ``x`` ``[b, t, d]`` (already normed): ``[b, t, d]``.

    ``tap`` (the decoder's) reads or rewrites the block's sites of ``layer``; the routing is
    computed from the logits the tap returns.
    """
    b, t, d = x.shape
    h = x.reshape(-1, d)
    logits = router_logits(mlp, kind, h)
    if tap is not None:
        logits = tap(Site(layer, "mlp.hook_router_logits"), logits.view(b, t, -1))
        logits = logits.reshape(b * t, -1)
    idx, weights = ROUTERS[kind](mlp.gate, logits)
    if tap is not None:
        tap(Site(layer, "mlp.hook_expert_indices"), idx.view(b, t, -1).float())
        tap(Site(layer, "mlp.hook_expert_weights"), weights.view(b, t, -1))
    routed = run_experts(mlp, h, idx, weights)
    if int(getattr(mlp, "ep_size", 1)) > 1:
        import torch.distributed as dist

        dist.all_reduce(routed)
    out = routed.view(b, t, d)
    if tap is not None:
        out = tap(Site(layer, "mlp.hook_routed_out"), out)
    shared = getattr(mlp, "shared_experts", None)
    if shared is not None:
        s: torch.Tensor = shared(x)
        if tap is not None:
            s = tap(Site(layer, "mlp.hook_shared_out"), s)
        out = out + s
    return out


class MoEBlock(torch.nn.Module):
    """A MoE block run by :func:`forward`: the model's ``gate``, ``experts`` (this rank's
    share under expert parallelism) and ``shared_experts``, under their own names."""

    def __init__(self, mlp: Any, kind: str, *, first_expert: int = 0, ep_size: int = 1) -> None:
        super().__init__()
        self.gate = mlp.gate
        self.experts = mlp.experts
        if getattr(mlp, "shared_experts", None) is not None:
            self.shared_experts = mlp.shared_experts
        self.kind = kind
        self.num_experts = int(mlp.gate.weight.shape[0])
        self.first_expert = first_expert
        self.ep_size = ep_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self, self.kind, x)


def install(model: Any, *, rank: int = 0, ep_size: int = 1) -> int:
    """Run every MoE block of ``model`` (a ``*ForCausalLM`` of a served mixture of experts,
    on the meta device when ``ep_size > 1``) through :class:`MoEBlock`, rank ``rank`` holding
    its share of the routed experts; returns the number of MoE blocks (0: a dense model).

    :raises ConfigError: ``ep_size`` does not divide the routed experts
    """
    kind = str(getattr(model.config, "model_type", ""))
    blocks = list(model.base_model.layers) if hasattr(model.base_model, "layers") else []
    moe = [blk for blk in blocks if is_moe(blk.mlp) or isinstance(blk.mlp, MoEBlock)]
    if not moe:
        if ep_size > 1:
            raise ConfigError(f"expert parallelism needs a mixture of experts; {kind} is dense")
        return 0
    kind = router_kind(kind)
    for blk in moe:
        mlp = blk.mlp
        if isinstance(mlp, MoEBlock):
            continue
        n = int(mlp.gate.weight.shape[0])
        if n % ep_size:
            raise ConfigError(
                f"ep={ep_size} does not divide the {n} routed experts of each MoE layer"
            )
        share = n // ep_size
        if ep_size > 1:
            experts = mlp.experts
            for pname in ("gate_up_proj", "down_proj"):
                p = getattr(experts, pname)
                local = torch.empty((share, *p.shape[1:]), dtype=p.dtype, device=p.device)
                setattr(experts, pname, torch.nn.Parameter(local, requires_grad=False))
        blk.mlp = MoEBlock(mlp, kind, first_expert=rank * share, ep_size=ep_size)
    return len(moe)
