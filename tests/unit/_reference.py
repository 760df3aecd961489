"""Reference values of every canonical hook site from plain ``transformers`` forward passes
with module hooks, for every served architecture (Llama, Mistral, Qwen2, Qwen3, GPT-2, and the
mixtures of experts Mixtral, Qwen3-MoE, DeepSeek-V3), and
helpers to run a spec through our runtime."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from tpm_faas.architectures import dims
from tpm_faas.modes import MODES
from tpm_faas.policy import Limits
from tpm_faas.protocol.requests import WRITE_OPS, InterveneRequest
from tpm_faas.registry import ModelInfo
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.scheduler import Scheduler
from tpm_faas.sites import ModelShape

Edit = Callable[[torch.Tensor], torch.Tensor]  # [t, *shape] -> [t, *shape], one sequence

ALL_OPS = [*sorted(WRITE_OPS), "save", "logit_lens"]
OPEN = Limits(
    max_prompts=64,
    max_prompt_tokens=10_000,
    max_new_tokens=10_000,
    max_input_bytes=1 << 30,
    max_bytes_returned=1 << 30,
    max_hook_sites=10_000,
    allowed_ops=ALL_OPS,
    write=True,
)


def info_of(model: Any) -> ModelInfo:
    """What the gateway would know of ``model`` (any served architecture), from its config."""
    d = dims(model.config.to_dict())
    m = ModelShape.from_config(model.config.to_dict())
    return ModelInfo(
        name="ref@1",
        hidden_size=d.hidden_size,
        num_layers=d.num_layers,
        vocab_size=d.vocab_size,
        max_positions=d.context_length,
        tokenizer="bytes",
        checkpoint_sha256="0" * 64,
        dtype="float32",
        architecture=d.model_type,
        num_heads=d.num_heads,
        head_dim=d.v_head_dim,  # attn.hook_z's (values', under MLA)
        num_experts=m.num_experts,
        experts_per_token=m.experts_per_token,
        moe_layers=list(m.moe_layers),
        shared_experts=m.shared_experts,
    )


def normalise(model: Any, request: dict[str, Any], limits: Limits = OPEN) -> dict[str, Any]:
    req = InterveneRequest.model_validate({"model": "ref@1", **request})
    return MODES["intervene"].admit(req, info_of(model), limits).body


def run(
    dec: Decoder, bodies: list[tuple[str, dict[str, Any]]], *, slots: int = 8
) -> dict[str, dict[str, Any]]:
    """Submit every ``(kind, body)`` at once to one scheduler; replies by index."""
    sched = Scheduler(dec.run_plan, slots=dec.slots, max_len=dec.max_len, max_batch=slots)
    for i, (kind, body) in enumerate(bodies):
        sched.submit(i, f"r{i}", body, intervene=kind == "intervene")
    out: dict[Any, dict[str, Any]] = {}
    while sched.busy:
        for key, reply in sched.step():
            out[key] = reply
    return {str(k): v for k, v in out.items()}


# -- module hooks on the transformers model ------------------------------------------------
def _modules(model: Any, layer: int, kind: str) -> tuple[Any, str]:
    """The module and hook type that carries a site in ``transformers``: ``pre`` or ``out``
    (``[1, t, *shape]``), ``flat`` (an output ``[t, *shape]``: the experts' sum) or ``gate0``,
    ``gate1``, ``gate2`` (the router's logits, weights or chosen experts), of Llama-shaped
    models (Llama, Mistral, Qwen2, Qwen3, the mixtures of experts) or GPT-2."""
    if model.config.model_type != "gpt2":
        core = model.model
        if kind == "embed":
            return core.embed_tokens, "out"
        if kind == "ln_final":
            return core.norm, "out"
        block = core.layers[layer]
        if kind.startswith("mlp."):
            return {
                "mlp.hook_router_logits": (block.mlp.gate, "gate0"),
                "mlp.hook_expert_weights": (block.mlp.gate, "gate1"),
                "mlp.hook_expert_indices": (block.mlp.gate, "gate2"),
                "mlp.hook_routed_out": (block.mlp.experts, "flat"),
                "mlp.hook_shared_out": (getattr(block.mlp, "shared_experts", None), "out"),
            }[kind]
        return {
            "hook_resid_pre": (block, "pre"),
            "attn.hook_z": (block.self_attn.o_proj, "pre"),
            "hook_attn_out": (block.self_attn.o_proj, "out"),
            "hook_resid_mid": (block.post_attention_layernorm, "pre"),
            "hook_mlp_out": (block.mlp, "out"),
            "hook_resid_post": (block, "out"),
        }[kind]
    core = model.transformer
    if kind == "embed":
        return core.h[0], "pre"
    if kind == "ln_final":
        return core.ln_f, "out"
    block = core.h[layer]
    return {
        "hook_resid_pre": (block, "pre"),
        "attn.hook_z": (block.attn.c_proj, "pre"),
        "hook_attn_out": (block.attn.c_proj, "out"),
        "hook_resid_mid": (block.ln_2, "pre"),
        "hook_mlp_out": (block.mlp, "out"),
        "hook_resid_post": (block, "out"),
    }[kind]


@contextmanager
def hooked(model: Any, site: str, edit: Edit) -> Iterator[None]:
    """Run ``edit`` on ``site``'s values (``[t, *shape]`` of sequence 0) in every forward pass
    of ``model`` while the context is open; ``edit`` may return a new tensor."""
    heads = dims(model.config.to_dict()).num_heads
    if site == "unembed":
        mod, how = model.lm_head, "out"
    else:
        parts = site.split(".", 2)
        layer, kind = (-1, site) if len(parts) == 1 else (int(parts[1]), parts[2])
        mod, how = _modules(model, layer, kind)
    per_head = site.endswith("attn.hook_z")

    def apply(h: torch.Tensor) -> torch.Tensor:
        x = h[0]
        if per_head:
            x = x.view(x.shape[0], heads, -1)
        y = edit(x)
        if per_head:
            y = y.reshape(y.shape[0], -1)
        return y[None].to(h.dtype)

    if how.startswith("gate"):  # read only: the routing is the router module's own

        def routed(_m: Any, _args: Any, out: Any) -> Any:
            logits, weights, experts = out
            # DeepSeek picks its top-k unsorted: heaviest first, as the runtime returns them.
            weights, order = torch.sort(weights, dim=-1, descending=True, stable=True)
            edit([logits, weights, experts.gather(-1, order).float()][int(how[-1])])
            return out

        handle = mod.register_forward_hook(routed)
    elif how == "flat":

        def flat(_m: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return edit(out).to(out.dtype)

        handle = mod.register_forward_hook(flat)
    elif how == "pre":

        def pre(_m: Any, args: Any, kwargs: Any) -> Any:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_m: Any, _args: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                return (apply(out[0]), *out[1:])
            return apply(out)

        handle = mod.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def reference_values(model: Any, ids: list[int], sites: list[str]) -> dict[str, torch.Tensor]:
    """Every site's values ``[t, *shape]`` in one plain forward pass."""
    got: dict[str, torch.Tensor] = {}

    def saver(name: str) -> Edit:
        def edit(x: torch.Tensor) -> torch.Tensor:
            got[name] = x.detach().clone()
            return x

        return edit

    with torch.no_grad(), _all(model, [(s, saver(s)) for s in sites if s != "unembed"]):
        logits = model(torch.tensor([ids])).logits[0]
    got["unembed"] = logits
    return got


@contextmanager
def _all(model: Any, edits: list[tuple[str, Edit]]) -> Iterator[None]:
    if not edits:
        yield
        return
    (site, edit), rest = edits[0], edits[1:]
    with hooked(model, site, edit), _all(model, rest):
        yield


def reference_generate(
    model: Any, ids: list[int], steps: int, edits: list[tuple[str, Edit]]
) -> list[int]:
    """Greedy tokens with ``edits`` applied at every position of a full forward per step."""
    seq = list(ids)
    with torch.no_grad(), _all(model, edits):
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def reference_generate_saves(
    model: Any, ids: list[int], steps: int, site: str
) -> tuple[list[int], list[torch.Tensor]]:
    """``transformers``' own ``generate`` (greedy, with its KV cache, exactly ``steps`` new
    tokens), with a hook recording ``site`` in every forward pass, as nnsight and
    TransformerLens see it: the generated tokens and the values of each pass (``[t, *shape]``:
    the whole prompt first, then one row per token fed back)."""
    passes: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        passes.append(x.detach().clone())
        return x

    with torch.no_grad(), hooked(model, site, record):
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            use_cache=True,
            pad_token_id=model.config.eos_token_id,
        )
    return [int(t) for t in out[0, len(ids) :]], passes
