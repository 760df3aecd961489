"""The hook sites of a mixture of experts and the expert knock-out, exact against the same
edits done on ``transformers`` with module hooks.

Reads (the router's logits, the chosen experts and their weights, the routed and shared
outputs) are checked site by site against the ``transformers`` modules in
``test_moe_exact`` (every canonical site). Here the writes: ``drop_experts`` (prompt tokens,
and every generated token), ``add`` on the router's logits (steering the routing), ``ablate``
and ``add`` on the routed and shared outputs; each against a forward hook on the
``transformers`` router (or experts) module that makes the same edit. The reference routing
of an edited router is written out token by token below, independently of the runtime's
vectorised one (:mod:`tpm_faas.runtime.moe`). Then the gateway's checks of MoE specs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _families import random_model, save_checkpoint
from _reference import OPEN, hooked, info_of, normalise, reference_generate, run
from click.testing import CliRunner
from test_families_exact import one_thread  # noqa: F401 (the autouse fixture, here too)
from test_interventions_exact import ATOL, PROMPT, RTOL, TOK, _edit, _intervene, _saved

from tpm_faas.cli import main
from tpm_faas.client import decode_array, encode_array
from tpm_faas.errors import PolicyDenied, RequestError
from tpm_faas.modes import MODES
from tpm_faas.protocol.requests import InterveneRequest
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.moe import router_kind
from tpm_faas.sites import ModelShape, site_table

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3"]
NEW = 8


@pytest.fixture(scope="module", params=FAMILIES)
def model(request: pytest.FixtureRequest) -> Any:
    return random_model(request.param)


def _shape(model: Any) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def _decoder(model: Any) -> Decoder:
    return Decoder(model, slots=8, max_len=128)


# -- the reference: the router's output recomputed from edited logits, token by token -------
def _route_one(kind: str, gate: Any, row: torch.Tensor) -> tuple[list[float], list[int]]:
    """One token's (weights, experts) from its router logits, as the architecture routes."""
    n, k = row.shape[0], gate.top_k
    if kind == "deepseek_v3":
        scores = row.float().sigmoid()
        choice = scores + gate.e_score_correction_bias
        choice[torch.isneginf(row)] = float("-inf")  # a dropped expert is never chosen
        per = n // gate.num_group
        left = [
            sorted(c for c in choice[g * per : (g + 1) * per].tolist() if c > -1e30)[::-1]
            for g in range(gate.num_group)
        ]  # each group's experts left, best first: the group scores its best two
        group_score = [sum(c[:2]) if c else float("-inf") for c in left]
        kept = sorted(range(gate.num_group), key=lambda g: -group_score[g])[: gate.topk_group]
        candidates = [e for e in range(n) if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -float(choice[e]))[:k]
        w = scores[chosen]
        if gate.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * gate.routed_scaling_factor
    else:
        probs = torch.softmax(row.float(), dim=-1)
        chosen = sorted(range(n), key=lambda e: -float(probs[e]))[:k]
        w = probs[chosen]
        if kind == "mixtral" or gate.norm_topk_prob:
            w = w / w.sum()
    return w.tolist(), chosen


@contextmanager
def edited_router(
    model: Any, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While open, ``layer``'s ``transformers`` router routes from ``edit(logits)``
    (``[t, experts]`` of the one sequence): a forward hook replacing its output."""
    gate = model.model.layers[layer].mlp.gate
    kind = router_kind(model.config.model_type)

    def hook(_m: Any, _args: Any, out: Any) -> Any:
        logits, weights, _ = out
        logits = edit(logits.clone())
        rows = [_route_one(kind, gate, r) for r in logits]
        w = torch.tensor([r[0] for r in rows], dtype=weights.dtype)
        idx = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return logits, w, idx

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _drop(experts: list[int], rows: Callable[[int], list[int]]) -> Any:
    def edit(logits: torch.Tensor) -> torch.Tensor:
        for r in rows(logits.shape[0]):
            logits[r, experts] = float("-inf")
        return logits

    return edit


def _first_moe(model: Any) -> int:
    return _shape(model).moe_layers[0]


def _plain_choice(model: Any, layer: int, position: int) -> list[int]:
    saves = [{"op": "save", "site": f"blocks.{layer}.mlp.hook_expert_indices"}]
    got = _saved(_intervene(_decoder(model), model, {"prompt": PROMPT, "ops": saves}))
    return [int(e) for e in got[f"blocks.{layer}.mlp.hook_expert_indices"][position]]


# -- knock-outs ------------------------------------------------------------------------------
def test_dropping_experts_at_prompt_tokens_equals_the_same_edit_in_transformers(
    model: Any,
) -> None:
    ids = TOK.encode(PROMPT)
    layer, positions = _first_moe(model), [1, 4, len(ids) - 1]
    drop = _plain_choice(model, layer, len(ids) - 1)[:1]  # the heaviest expert there
    ops = [
        {"op": "drop_experts", "layers": [layer], "experts": drop, "positions": positions},
        {"op": "save", "site": f"blocks.{layer}.mlp.hook_expert_indices"},
        {"op": "save", "site": f"blocks.{layer}.mlp.hook_expert_weights"},
        {"op": "save", "site": "unembed"},
    ]
    got = _saved(_intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops}))
    with edited_router(model, layer, _drop(drop, lambda t: positions)), torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    plain = model(torch.tensor([ids])).logits[0].detach()
    assert not np.allclose(ref.numpy(), plain.numpy(), atol=1e-4)  # the knock-out bites
    np.testing.assert_allclose(got["unembed"], ref.numpy(), atol=ATOL * 10, rtol=RTOL)
    chosen = got[f"blocks.{layer}.mlp.hook_expert_indices"]
    weights = got[f"blocks.{layer}.mlp.hook_expert_weights"]
    assert all(drop[0] not in chosen[p] for p in positions)
    assert all(list(w) == sorted(w, reverse=True) for w in weights)  # heaviest first
    gate = model.model.layers[layer].mlp.gate
    if getattr(gate, "norm_topk_prob", True):  # renormalised over the experts left
        scale = float(getattr(gate, "routed_scaling_factor", 1.0))
        np.testing.assert_allclose(weights[positions].sum(-1), scale, rtol=1e-5)


def test_dropping_experts_while_generating_equals_the_same_edit_in_transformers(
    model: Any,
) -> None:
    ids = TOK.encode(PROMPT)
    shape = _shape(model)
    layers = list(shape.moe_layers)
    first = _plain_choice(model, layers[0], len(ids) - 1)
    rest = [e for e in range(shape.num_experts) if e not in first]
    drop = [*first, *rest][: shape.num_experts - shape.experts_per_token]  # as many as allowed
    spec = {"op": "drop_experts", "layers": "*", "experts": drop, "generation": True}
    req = {"prompt": PROMPT, "ops": [spec], "max_new_tokens": NEW, "stop_at_eos": False}
    got = _intervene(_decoder(model), model, req)["results"][0]["token_ids"]
    every = _drop(drop, lambda t: list(range(t)))
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(edited_router(model, layer, every))
        want = reference_generate(model, ids, NEW, [])
    assert got == want
    assert want != reference_generate(model, ids, NEW, [])


def test_steering_the_router_equals_the_same_edit_in_transformers(model: Any) -> None:
    """``add`` on the router's logits: the routing follows the written logits."""
    ids = TOK.encode(PROMPT)
    layer, shape = _first_moe(model), _shape(model)
    favour = shape.num_experts - 1
    vec = np.zeros(shape.num_experts, dtype=np.float32)
    vec[favour] = 20.0
    ops = [
        {
            "op": "add",
            "site": "mlp.hook_router_logits",
            "layers": [layer],
            "vector": encode_array(vec),
        },
        {"op": "save", "site": f"blocks.{layer}.mlp.hook_expert_indices"},
        {"op": "save", "site": "unembed"},
    ]
    got = _saved(_intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops}))
    assert (got[f"blocks.{layer}.mlp.hook_expert_indices"] == favour).any(-1).all()
    with edited_router(model, layer, lambda x: x + torch.from_numpy(vec)), torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    np.testing.assert_allclose(got["unembed"], ref.numpy(), atol=ATOL * 10, rtol=RTOL)


def _expert_writes(model: Any) -> list[tuple[str, dict[str, Any]]]:
    layer = _first_moe(model)
    out = [(f"blocks.{layer}.mlp.hook_routed_out", {"op": "ablate", "method": "zero"})]
    if _shape(model).shared_experts:
        out.append((f"blocks.{layer}.mlp.hook_shared_out", {"op": "add", "scale": 3.0}))
    return out


def test_routed_and_shared_writes_equal_module_hooks(model: Any) -> None:
    ids = TOK.encode(PROMPT)
    positions = [0, 3, len(ids) - 1]
    d = _shape(model).hidden_size
    for site, op in _expert_writes(model):
        vec = torch.from_numpy(np.random.default_rng(7).standard_normal(d).astype(np.float32))
        spec = {"site": site, "positions": positions, **op}
        if op["op"] == "add":
            spec["vector"] = encode_array(vec.numpy())
        ops = [spec, {"op": "save", "site": "unembed"}]
        got = _saved(_intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops}))
        with hooked(model, site, _edit(op, vec, positions)), torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        plain = model(torch.tensor([ids])).logits[0].detach()
        assert not np.allclose(ref.numpy(), plain.numpy(), atol=1e-4), site
        np.testing.assert_allclose(got["unembed"], ref.numpy(), atol=ATOL * 10, rtol=RTOL)


def test_a_knock_out_in_a_batch_touches_only_its_own_rows(model: Any) -> None:
    """A request that drops experts while generating, decoded in one batch with a plain one
    and one that saves the routing: each equals itself served alone."""
    layer = _first_moe(model)
    drop = _plain_choice(model, layer, 2)[:1]
    knock = {
        "prompt": PROMPT,
        "ops": [{"op": "drop_experts", "experts": drop, "generation": True}],
        "max_new_tokens": NEW,
        "stop_at_eos": False,
    }
    read = {
        "prompt": "In the beginning",
        "ops": [
            {"op": "save", "site": "mlp.hook_expert_weights", "layers": "*", "generation": True}
        ],
        "max_new_tokens": NEW,
        "stop_at_eos": False,
    }
    plain = {**read, "prompt": "And the earth was", "ops": [{"op": "save", "site": "embed"}]}
    bodies = [("intervene", normalise(model, r)) for r in (knock, read, plain)]
    together = run(_decoder(model), bodies)
    for i, body in enumerate(bodies):
        alone = run(_decoder(model), [body])["0"]
        both = together[str(i)]
        assert both["ok"] and alone["ok"], (both, alone)
        a, b = both["result"]["results"][0], alone["result"]["results"][0]
        assert a["token_ids"] == b["token_ids"]
        for name in a["saved"]:
            np.testing.assert_allclose(
                decode_array(a["saved"][name]["tensor"]),
                decode_array(b["saved"][name]["tensor"]),
                atol=1e-5,
                rtol=1e-5,
            )


# -- the gateway: MoE specs checked before anything runs --------------------------------------
def _admit(model: Any, ops: list[dict[str, Any]], **limits: Any) -> dict[str, Any]:
    req = InterveneRequest.model_validate({"model": "ref@1", "prompt": PROMPT, "ops": ops})
    lim = OPEN.model_copy(update=limits) if limits else OPEN
    return MODES["intervene"].admit(req, info_of(model), lim).body


def test_sites_command_lists_the_router_and_experts(tmp_path: Path) -> None:
    directory = save_checkpoint(random_model("deepseek_v3"), tmp_path / "ds")
    out = CliRunner().invoke(main, ["sites", str(directory)])
    assert out.exit_code == 0, out.output
    assert "a mixture of 8 experts, 3 per token, at layers 1-2, beside a shared expert" in (
        out.output
    )
    assert "blocks.1.mlp.hook_router_logits" in out.output
    assert "blocks.0.mlp.hook_router_logits" not in out.output
    js = json.loads(CliRunner().invoke(main, ["sites", str(directory), "--json"]).output)
    assert js["shape"]["moe_layers"] == [1, 2]
    assert {"site": "blocks.2.mlp.hook_expert_weights", "shape": [3]} in js["sites"]


def test_moe_sites_exist_at_moe_layers_only() -> None:
    ds = random_model("deepseek_v3")
    shape = _shape(ds)
    names = {row["site"]: row["shape"] for row in site_table(shape)}
    assert shape.moe_layers == (1, 2) and shape.shared_experts
    assert "blocks.0.mlp.hook_router_logits" not in names
    assert names["blocks.1.mlp.hook_router_logits"] == [8]
    assert names["blocks.2.mlp.hook_expert_indices"] == [3]
    assert names["blocks.2.mlp.hook_shared_out"] == [shape.hidden_size]
    body = _admit(ds, [{"op": "save", "site": "mlp.hook_expert_weights", "layers": "*"}])
    assert body["ops"][0]["sites"] == [
        "blocks.1.mlp.hook_expert_weights",
        "blocks.2.mlp.hook_expert_weights",
    ]
    mixtral = random_model("mixtral")
    with pytest.raises(RequestError, match="no shared expert"):
        _admit(mixtral, [{"op": "save", "site": "mlp.hook_shared_out", "layers": "*"}])
    dense = random_model("llama")
    with pytest.raises(RequestError, match="dense"):
        _admit(dense, [{"op": "save", "site": "mlp.hook_router_logits", "layers": "*"}])


@pytest.mark.parametrize(
    ("op", "match"),
    [
        ({"op": "drop_experts", "layers": [0], "experts": [1]}, "layer 0 has a dense MLP"),
        ({"op": "drop_experts", "experts": [8]}, "expert 8 is out of range"),
        ({"op": "drop_experts", "experts": [0, 1, 2, 3, 4, 5]}, "leaves fewer than the 3"),
        (
            {"op": "drop_experts", "site": "mlp.hook_routed_out", "layers": "*", "experts": [1]},
            "acts on mlp.hook_router_logits",
        ),
        ({"op": "ablate", "site": "mlp.hook_expert_indices", "layers": [1]}, "read only"),
        (
            {"op": "set", "site": "blocks.2.mlp.hook_expert_weights", "value": [0.5, 0.5, 0.0]},
            "read only",
        ),
    ],
)
def test_bad_moe_specs_are_refused_naming_the_problem(op: dict[str, Any], match: str) -> None:
    ds = random_model("deepseek_v3")
    if "value" in op:
        op = {**op, "value": encode_array(np.asarray(op["value"], dtype=np.float32))}
    with pytest.raises(RequestError, match=match):
        _admit(ds, [op])


def test_knock_outs_are_writes_for_the_policy() -> None:
    ds = random_model("deepseek_v3")
    drop = {"op": "drop_experts", "experts": [1]}
    with pytest.raises(PolicyDenied, match="not write"):
        _admit(ds, [drop], write=False)
    with pytest.raises(PolicyDenied, match="'drop_experts' operation is not allowed"):
        _admit(ds, [drop], allowed_ops=["save", "logit_lens"])
    with pytest.raises(PolicyDenied, match=r"blocks\.1\.mlp\.hook_router_logits"):
        _admit(ds, [drop], allowed_sites=["blocks.*.hook_resid_*"])
    body = _admit(ds, [drop])
    assert body["ops"][0]["sites"] == [
        "blocks.1.mlp.hook_router_logits",
        "blocks.2.mlp.hook_router_logits",
    ]
    assert body["ops"][0]["experts"] == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_sites_and_knock_outs_on_cuda_equal_the_cpu(family: str) -> None:
    """On a GPU (eager MoE decode) the routing read, a knock-out while generating and the
    tokens equal the same request on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the MoE block on CUDA")
    model = random_model(family)
    ops = [
        {"op": "save", "site": "mlp.hook_expert_indices", "layers": "*", "generation": True},
        {"op": "save", "site": "mlp.hook_routed_out", "layers": "*"},
        {"op": "drop_experts", "experts": [1], "generation": True},
    ]
    req = {"prompt": PROMPT, "ops": ops, "max_new_tokens": NEW, "stop_at_eos": False}
    cpu = _intervene(_decoder(model), model, req)["results"][0]
    gpu_model = random_model(family).cuda()  # the same seeded weights
    gpu = _intervene(_decoder(gpu_model), gpu_model, req)["results"][0]
    assert gpu["token_ids"] == cpu["token_ids"]
    for name, entry in cpu["saved"].items():
        np.testing.assert_allclose(
            decode_array(gpu["saved"][name]["tensor"]),
            decode_array(entry["tensor"]),
            atol=1e-4,
            rtol=1e-3,
            err_msg=name,
        )


def test_knock_outs_of_one_request_add_up_per_layer() -> None:
    """Two knock-outs that together leave fewer than top_k experts at a layer are refused
    (each alone would pass); at different layers they are not."""
    ds = random_model("deepseek_v3")  # 8 experts, 3 per token: at most 5 dropped per layer
    first = {"op": "drop_experts", "layers": [1], "experts": [0, 1, 2]}
    with pytest.raises(RequestError, match=r"dropping 6 of 8 experts at blocks\.1"):
        _admit(ds, [first, {"op": "drop_experts", "experts": [3, 4, 5]}])
    body = _admit(ds, [first, {"op": "drop_experts", "layers": [2], "experts": [3, 4, 5]}])
    assert [o["sites"] for o in body["ops"]] == [
        ["blocks.1.mlp.hook_router_logits"],
        ["blocks.2.mlp.hook_router_logits"],
    ]
    named = _admit(
        ds, [{"op": "drop_experts", "site": "blocks.2.mlp.hook_router_logits", "experts": [7]}]
    )
    assert named["ops"][0]["sites"] == ["blocks.2.mlp.hook_router_logits"]


def test_a_deepseek_knock_out_emptying_groups_weighs_nothing_outside_them() -> None:
    """Dropping one expert of every group leaves each group one: the kept groups hold fewer
    than top_k experts, and the remaining picks weigh nothing (as the reference routes)."""
    model = random_model("deepseek_v3")  # 4 groups of 2 experts, 2 groups kept, 3 per token
    ids = TOK.encode(PROMPT)
    layer, drop = 1, [1, 3, 5, 7]
    ops = [
        {"op": "drop_experts", "layers": [layer], "experts": drop},
        {"op": "save", "site": f"blocks.{layer}.mlp.hook_expert_weights"},
        {"op": "save", "site": "unembed"},
    ]
    got = _saved(_intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops}))
    weights = got[f"blocks.{layer}.mlp.hook_expert_weights"]
    assert (weights[:, -1] == 0).all() and (weights[:, :2] > 0).all()
    with edited_router(model, layer, _drop(drop, lambda t: list(range(t)))), torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    np.testing.assert_allclose(got["unembed"], ref.numpy(), atol=ATOL * 10, rtol=RTOL)
