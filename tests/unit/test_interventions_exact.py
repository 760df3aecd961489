"""Exactness of the intervention runtime against plain ``transformers`` with module hooks.

Every spec here goes through the gateway's normalisation (``InterveneMode.admit``) and the
serving runtime (scheduler + decoder), in process; the reference is the ``transformers``
forward pass of the same model with hooks at the modules that carry each site.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from _models import random_gpt2
from _reference import (
    hooked,
    normalise,
    reference_generate,
    reference_generate_saves,
    reference_values,
    run,
)
from transformers import AutoModelForCausalLM

from tpm_faas.client import decode_array, encode_array
from tpm_faas.config import BUNDLED_MODELS
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.sites import ModelShape, all_sites
from tpm_faas.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPT = "And God said, Let there be"
ATOL, RTOL = 2e-5, 1e-4


def _demo() -> Any:
    return AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODELS / "demo-tpm" / "1", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module", params=["llama-demo", "gpt2-random"])
def model(request: pytest.FixtureRequest) -> Any:
    return _demo() if request.param == "llama-demo" else random_gpt2()


def _decoder(model: Any) -> Decoder:
    return Decoder(model, slots=8, max_len=128)


def _shape(model: Any) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def _intervene(dec: Decoder, model: Any, request: dict[str, Any]) -> dict[str, Any]:
    reply = run(dec, [("intervene", normalise(model, request))])["0"]
    assert reply["ok"], reply
    return reply["result"]


def _saved(result: dict[str, Any], prompt: int = 0) -> dict[str, np.ndarray]:
    run_ = result["results"][prompt]
    return {k: decode_array(v["tensor"]) for k, v in run_["saved"].items()}


def test_every_site_saved_equals_the_reference(model: Any) -> None:
    sites = [s.name for s in all_sites(_shape(model))]
    ops = [{"op": "save", "site": name} for name in sites]
    result = _intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops})
    saved = _saved(result)
    ids = TOK.encode(PROMPT)
    ref = reference_values(model, ids, sites)
    assert set(saved) == set(sites)
    for name in sites:
        assert saved[name].shape == tuple(ref[name].shape), name
        np.testing.assert_allclose(
            saved[name], ref[name].numpy(), atol=ATOL, rtol=RTOL, err_msg=name
        )
    assert result["results"][0]["saved"][sites[0]]["positions"] == list(range(len(ids)))


WRITES = [
    ("embed", {"op": "add", "scale": 2.0}),
    ("blocks.1.hook_resid_pre", {"op": "set"}),
    ("blocks.0.attn.hook_z", {"op": "scale_heads", "heads": [1, 2], "scale": 0.0}),
    ("blocks.0.attn.hook_z", {"op": "add", "heads": [0]}),
    ("blocks.1.hook_attn_out", {"op": "ablate", "method": "zero"}),
    ("blocks.0.hook_mlp_out", {"op": "ablate", "method": "mean"}),
    ("blocks.2.hook_resid_post", {"op": "add", "scale": -1.5}),
    ("ln_final", {"op": "add"}),
    ("unembed", {"op": "add", "scale": 0.5}),
]


def _edit(op: dict[str, Any], value: torch.Tensor | None, positions: list[int]) -> Any:
    """The reference edit of a write op, on ``[t, *shape]``."""
    heads = op.get("heads")

    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        sel = x[:, heads] if heads is not None else x
        if op["op"] == "add":
            new = sel + value * op.get("scale", 1.0)
        elif op["op"] == "set":
            new = value.expand_as(sel).clone()
        elif op["op"] == "scale_heads":
            new = sel * op["scale"]
        elif op["method"] == "zero":
            new = torch.zeros_like(sel)
        else:
            new = sel.mean(0, keepdim=True).expand_as(sel).clone()
        if heads is not None:
            x[:, heads] = torch.where(
                torch.zeros(len(x), dtype=torch.bool)[:, None, None]
                | torch.isin(torch.arange(len(x)), torch.tensor(positions))[:, None, None],
                new,
                x[:, heads],
            )
        else:
            mask = torch.isin(torch.arange(len(x)), torch.tensor(positions))
            x[mask] = new[mask]
        return x

    return edit


@pytest.mark.parametrize(("site", "op"), WRITES, ids=[f"{s}-{o['op']}" for s, o in WRITES])
def test_writes_change_outputs_exactly_as_the_reference(
    model: Any, site: str, op: dict[str, Any]
) -> None:
    shape = _shape(model)
    ids = TOK.encode(PROMPT)
    positions = [1, 4, len(ids) - 1]
    token_shape = next(s for s in all_sites(shape) if s.name == site).shape(shape)
    if op.get("heads"):
        token_shape = [len(op["heads"]), shape.head_dim]
    value = None
    spec = {"site": site, "positions": positions, **op}
    if op["op"] in ("add", "set"):
        value = torch.from_numpy(
            np.random.default_rng(3).standard_normal(token_shape).astype(np.float32)
        )
        spec["vector" if op["op"] == "add" else "value"] = encode_array(value.numpy())
    ops = [spec, {"op": "save", "site": "unembed"}]
    got = _saved(_intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops}))["unembed"]
    with hooked(model, site, _edit(op, value, positions)), torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    plain = reference_values(model, ids, [])["unembed"]
    assert not np.allclose(ref.numpy(), plain.numpy(), atol=1e-3)  # the write does something
    np.testing.assert_allclose(got, ref.numpy(), atol=ATOL * 10, rtol=RTOL)


def test_steering_during_generation_matches_the_reference(model: Any) -> None:
    ids = TOK.encode(PROMPT)
    d = _shape(model).hidden_size
    vec = np.random.default_rng(5).standard_normal(d).astype(np.float32) * 2
    spec = {
        "op": "add",
        "site": "hook_resid_post",
        "layers": [1],
        "vector": encode_array(vec),
        "generation": True,
    }
    req = {"prompt": PROMPT, "ops": [spec], "max_new_tokens": 12, "stop_at_eos": False}
    got = _intervene(_decoder(model), model, req)["results"][0]["token_ids"]
    edit = _edit({"op": "add"}, torch.from_numpy(vec), list(range(128)))
    want = reference_generate(model, ids, 12, [("blocks.1.hook_resid_post", edit)])
    plain = reference_generate(model, ids, 12, [])
    assert got == want
    assert want != plain


def test_prompt_only_ops_leave_generation_alone_after_the_prompt(model: Any) -> None:
    """A z ablation without ``generation`` acts on the prompt; generated tokens run plain
    (their keys and values still see the ablated prompt)."""
    ids = TOK.encode(PROMPT)
    spec = {"op": "ablate", "site": "attn.hook_z", "layers": "*", "heads": [0]}
    req = {"prompt": PROMPT, "ops": [spec], "max_new_tokens": 8, "stop_at_eos": False}
    got = _intervene(_decoder(model), model, req)["results"][0]["token_ids"]
    # Reference: the ablation on prompt positions only, in a full forward per step.
    edits = [
        (
            f"blocks.{i}.attn.hook_z",
            _edit({"op": "ablate", "method": "zero", "heads": [0]}, None, list(range(len(ids)))),
        )
        for i in range(_shape(model).num_layers)
    ]
    assert got == reference_generate(model, ids, 8, edits)


def test_saves_during_generation_cover_every_generated_token(model: Any) -> None:
    ids = TOK.encode(PROMPT)
    spec = {"op": "save", "site": "blocks.0.hook_resid_post", "positions": [-1], "generation": True}
    req = {"prompt": PROMPT, "ops": [spec], "max_new_tokens": 6, "stop_at_eos": False}
    res = _intervene(_decoder(model), model, req)["results"][0]
    entry = res["saved"]["blocks.0.hook_resid_post"]
    n = len(ids)
    # The last prompt token, then each generated token fed back (the last is never fed).
    assert entry["positions"] == [n - 1, *range(n, n + 5)]
    full = ids + res["token_ids"][:5]
    ref = reference_values(model, full, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"]
    np.testing.assert_allclose(
        decode_array(entry["tensor"]), ref[n - 1 :].numpy(), atol=ATOL, rtol=RTOL
    )


def test_saved_heads_and_positions_come_back_in_the_order_asked(model: Any) -> None:
    """``heads: [3, 0]`` returns head 3 then head 0 (as a write pairs its rows), positions
    ``[5, 2]`` position 5 then 2; the entry names both beside the tensor."""
    ids = TOK.encode(PROMPT)
    z, post = "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"
    ops = [
        {"op": "save", "site": z, "heads": [3, 0], "positions": [5, 2]},
        {"op": "save", "site": post, "positions": [-1, 2, 5]},
    ]
    res = _intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops})
    saved = res["results"][0]["saved"]
    ref = reference_values(model, ids, [z, post])
    n = len(ids)
    assert saved[z]["heads"] == [3, 0] and saved[z]["positions"] == [5, 2]
    np.testing.assert_allclose(
        decode_array(saved[z]["tensor"]), ref[z][[5, 2]][:, [3, 0]].numpy(), atol=ATOL, rtol=RTOL
    )
    assert saved[post]["positions"] == [n - 1, 2, 5] and "heads" not in saved[post]
    np.testing.assert_allclose(
        decode_array(saved[post]["tensor"]), ref[post][[n - 1, 2, 5]].numpy(), atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize(
    ("first", "second", "heads"),
    [
        ([3, 0], [1, 3], [3, 0, 1]),
        ([3, 0], None, [3, 0, 1, 2]),  # then the rest of the heads, in order (+ 4.. on Llama)
        (None, [3, 0], [0, 1, 2, 3]),  # every head, in order (+ 4.. on Llama)
    ],
    ids=["subsets", "subset-then-all", "all-then-subset"],
)
def test_merged_saves_name_each_row_in_the_order_of_first_appearance(
    model: Any, first: list[int] | None, second: list[int] | None, heads: list[int]
) -> None:
    """Two saves of one z site come back as one tensor: the union of their positions and of
    their heads, each in the order of first appearance over the ops, named beside it; each
    op's own rows are read through those ids."""
    ids = TOK.encode(PROMPT)
    z = "blocks.1.attn.hook_z"
    every = list(range(_shape(model).num_heads))
    if first is None or second is None:
        heads = [*heads, *every[4:]]
    ops: list[dict[str, Any]] = [
        {"op": "save", "site": z, "positions": [5, 2], **({"heads": first} if first else {})},
        {"op": "save", "site": z, "positions": [2, 0], **({"heads": second} if second else {})},
    ]
    entry = _intervene(_decoder(model), model, {"prompt": PROMPT, "ops": ops})["results"][0][
        "saved"
    ][z]
    assert entry["positions"] == [5, 2, 0] and entry["heads"] == heads
    got = decode_array(entry["tensor"])
    ref = reference_values(model, ids, [z])[z]
    np.testing.assert_allclose(got, ref[[5, 2, 0]][:, heads].numpy(), atol=ATOL, rtol=RTOL)
    for op in ops:  # each op's tensor, in its own order, out of the merged one
        rows = [entry["positions"].index(p) for p in op["positions"]]
        cols = [entry["heads"].index(h) for h in op.get("heads", every)]
        np.testing.assert_allclose(
            got[rows][:, cols],
            ref[op["positions"]][:, op.get("heads", every)].numpy(),
            atol=ATOL,
            rtol=RTOL,
        )


@pytest.mark.parametrize("steps", [1, 5])
def test_generation_saves_match_transformers_generate(model: Any, steps: int) -> None:
    """``generation: true`` records what a hook sees in ``transformers``' ``generate`` (as in
    nnsight and TransformerLens): N new tokens take N forward passes, the prompt and then the
    first N - 1 generated tokens fed back; the Nth is sampled and never fed. The rows' token
    positions come beside the tensor."""
    ids = TOK.encode(PROMPT)
    n = len(ids)
    for site in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_z"):
        spec = {"op": "save", "site": site, "generation": True}
        req = {"prompt": PROMPT, "ops": [spec], "max_new_tokens": steps, "stop_at_eos": False}
        res = _intervene(_decoder(model), model, req)["results"][0]
        tokens, passes = reference_generate_saves(model, ids, steps, site)
        assert res["token_ids"] == tokens and len(passes) == steps
        entry = res["saved"][site]
        assert entry["positions"] == list(range(n + steps - 1))
        want = torch.cat(passes)
        assert want.shape[0] == n + steps - 1
        np.testing.assert_allclose(
            decode_array(entry["tensor"]), want.numpy(), atol=ATOL, rtol=RTOL, err_msg=site
        )


def test_patch_copies_activations_from_an_earlier_prompt(model: Any) -> None:
    clean, corrupt = "And God said, Let there be", "And Lot said, Let there be"
    a, b = TOK.encode(clean), TOK.encode(corrupt)
    assert len(a) == len(b)
    site = "blocks.1.hook_resid_pre"
    ops = [
        {"op": "patch", "site": site, "prompts": [1], "source": 0, "positions": [5, 6, 7]},
        {"op": "save", "site": "unembed", "prompts": [1], "positions": [-1]},
    ]
    res = _intervene(_decoder(model), model, {"prompts": [clean, corrupt], "ops": ops})
    got = _saved(res, 1)["unembed"]
    src = reference_values(model, a, [site])[site]

    def edit(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[5:8] = src[5:8]
        return x

    with hooked(model, site, edit), torch.no_grad():
        ref = model(torch.tensor([b])).logits[0, -1:]
    np.testing.assert_allclose(got, ref.numpy(), atol=ATOL * 10, rtol=RTOL)
    assert res["results"][0]["saved"] == {}


def test_logit_lens_last_layer_is_the_models_prediction(model: Any) -> None:
    ids = TOK.encode(PROMPT)
    n_layers = _shape(model).num_layers
    res = _intervene(
        _decoder(model), model, {"prompt": PROMPT, "ops": [{"op": "logit_lens", "top_k": 3}]}
    )
    table = res["results"][0]["logit_lens"]
    assert [r["layer"] for r in table] == list(range(n_layers))
    logits = reference_values(model, ids, [])["unembed"][-1]
    assert table[-1]["top"][0]["id"] == int(logits.argmax())
    np.testing.assert_allclose(
        table[-1]["top"][0]["prob"], float(torch.softmax(logits, -1).max()), atol=1e-5
    )


def test_requests_in_one_batch_touch_only_their_own_rows(model: Any) -> None:
    """A steered request, a request saving while generating, an ablated one and a plain query
    batched together each get exactly what they get alone."""
    d = _shape(model).hidden_size
    vec = encode_array(np.random.default_rng(9).standard_normal(d).astype(np.float32))
    steer = normalise(
        model,
        {
            "prompt": PROMPT,
            "max_new_tokens": 10,
            "stop_at_eos": False,
            "ops": [
                {
                    "op": "add",
                    "site": "hook_resid_mid",
                    "layers": [0, 1],
                    "vector": vec,
                    "generation": True,
                }
            ],
        },
    )
    save = normalise(
        model,
        {
            "prompt": "In the beginning",
            "max_new_tokens": 10,
            "stop_at_eos": False,
            "ops": [{"op": "save", "site": "blocks.1.hook_mlp_out", "generation": True}],
        },
    )
    ablate = normalise(
        model,
        {
            "prompt": "And Abraham",
            "max_new_tokens": 10,
            "stop_at_eos": False,
            "ops": [
                {
                    "op": "ablate",
                    "site": "attn.hook_z",
                    "layers": [0],
                    "heads": [1],
                    "method": "mean",
                    "generation": True,
                }
            ],
        },
    )
    query = {
        "prompt_ids": [TOK.encode("Now the serpent")],
        "max_new_tokens": 10,
        "stop_at_eos": False,
    }
    bodies = [("intervene", steer), ("intervene", save), ("intervene", ablate), ("generate", query)]
    dec = _decoder(model)
    together = run(dec, bodies)
    for i, body in enumerate(bodies):
        alone = run(dec, [body])["0"]["result"]
        both = together[str(i)]["result"]
        for a, b in zip(_content(both), _content(alone), strict=True):
            assert a["token_ids"] == b["token_ids"], i
            for name, entry in a.get("saved", {}).items():  # batched matmuls: float tolerance
                other = b["saved"][name]
                assert entry["positions"] == other["positions"]
                np.testing.assert_allclose(
                    decode_array(entry["tensor"]),
                    decode_array(other["tensor"]),
                    atol=1e-5,
                    rtol=1e-4,
                )
        assert both["timing"]["max_batch"] == 4 and alone["timing"]["max_batch"] == 1
    plain = run(dec, [("generate", {**query, "prompt_ids": [TOK.encode("In the beginning")]})])["0"]
    assert (
        plain["result"]["completions"][0]["token_ids"]
        == (together["1"]["result"]["results"][0]["token_ids"])
    )


def _content(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A result without its timings."""
    runs = result.get("results") or result["completions"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def test_graph_capturable_step_applies_interventions_like_the_dynamic_step(model: Any) -> None:
    """``decode_dense`` (what a CUDA graph captures: static shapes, per-slot affine buffers,
    static read buffers) equals the dynamic step with the same slots' interventions."""
    d = _shape(model).hidden_size
    vec = encode_array(np.random.default_rng(2).standard_normal(d).astype(np.float32))
    spec = normalise(
        model,
        {
            "prompt": PROMPT,
            "max_new_tokens": 8,
            "ops": [
                {
                    "op": "add",
                    "site": "hook_resid_post",
                    "layers": [0],
                    "vector": vec,
                    "generation": True,
                },
                {
                    "op": "scale_heads",
                    "layers": [1],
                    "heads": [0, 2],
                    "scale": 0.0,
                    "generation": True,
                },
                {"op": "save", "site": "blocks.1.hook_mlp_out", "generation": True},
            ],
        },
    )
    dyn, dense = _decoder(model), _decoder(model)
    ids = [TOK.encode(p) for p in ("In the beginning", PROMPT, "And Noah")]
    last = []
    for dec in (dyn, dense):
        for slot, seq in enumerate(ids):
            iv = {"request": 1, "index": 0, "spec": spec} if slot == 1 else None
            plan = {"op": "prefill", "slot": slot, "ids": seq, **({"iv": iv} if iv else {})}
            logits = dec.run_plan(plan)
            if dec is dyn:
                last.append(int(logits[0].argmax()))
    pos = [len(s) for s in ids]
    writes, reads = dense.iv.active([0, 1, 2])
    assert len(writes) == 2 and len(reads) == 1
    for _ in range(4):
        a = dyn.decode([0, 1, 2], last, pos)
        b, seen = dense.decode_dense(
            torch.tensor([*last, 0]), torch.tensor([*pos, 0]), writes, reads
        )
        torch.testing.assert_close(a, b[:3], rtol=1e-4, atol=1e-4)
        with torch.inference_mode():  # as Decoder._decode_graph does after a replay
            dense.iv.collect([0, 1, 2], {s: v[:3] for s, v in seen.items()})
        last = [int(r.argmax()) for r in a]
        pos = [q + 1 for q in pos]
    got = {r: dec.release(1) for r, dec in (("dyn", dyn), ("dense", dense))}
    a_ = decode_array(got["dyn"][0]["saved"]["blocks.1.hook_mlp_out"]["tensor"])
    b_ = decode_array(got["dense"][0]["saved"]["blocks.1.hook_mlp_out"]["tensor"])
    assert a_.shape == (len(ids[1]) + 4, d)
    np.testing.assert_allclose(a_, b_, rtol=1e-4, atol=1e-4)
    assert not dyn.iv.active([0, 1, 2])[0]  # released: no slot writes any more


@pytest.mark.gpu
def test_cuda_graph_interventions_equal_eager() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: interventions in a captured CUDA graph")
    model = _demo().cuda()
    d = _shape(model).hidden_size
    vec = encode_array(np.random.default_rng(4).standard_normal(d).astype(np.float32))
    steer = normalise(
        model,
        {
            "prompt": PROMPT,
            "max_new_tokens": 12,
            "stop_at_eos": False,
            "ops": [
                {
                    "op": "add",
                    "site": "hook_resid_post",
                    "layers": "*",
                    "vector": vec,
                    "generation": True,
                },
                {"op": "save", "site": "blocks.1.hook_resid_post", "generation": True},
            ],
        },
    )
    query = {
        "prompt_ids": [TOK.encode("In the beginning")],
        "max_new_tokens": 12,
        "stop_at_eos": False,
    }
    got = {}
    for graphs in (True, False):
        dec = Decoder(model, slots=8, max_len=128, cuda_graphs=graphs)
        got[graphs] = run(dec, [("intervene", steer), ("generate", query)])
    for key in ("0", "1"):
        a, b = _content(got[True][key]["result"]), _content(got[False][key]["result"])
        assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b]
    sa = got[True]["0"]["result"]["results"][0]["saved"]["blocks.1.hook_resid_post"]
    sb = got[False]["0"]["result"]["results"][0]["saved"]["blocks.1.hook_resid_post"]
    np.testing.assert_allclose(
        decode_array(sa["tensor"]), decode_array(sb["tensor"]), atol=1e-4, rtol=1e-4
    )


def test_every_rank_sees_the_same_active_sites() -> None:
    """A generation write on heads that live on one rank only still makes the site active on
    every rank (identity there): the active sites key the CUDA graphs every rank replays."""
    from tpm_faas.runtime.interventions import Compiler, Heads, SlotInterventions
    from tpm_faas.sites import Site

    model = _demo()
    spec = normalise(
        model,
        {
            "prompt": PROMPT,
            "max_new_tokens": 4,
            "ops": [
                {"op": "scale_heads", "layers": [0], "heads": [0], "scale": 0.0, "generation": True}
            ],
        },
    )
    active = []
    for first in (0, 4):  # the two ranks of tp=2
        comp = Compiler(
            spec,
            heads=Heads(first, 4, 8),
            device=torch.device("cpu"),
            dtype=torch.float32,
            site_shape=lambda s: [4, 32] if s.per_head else [256],
            stash={},
            n_layers=4,
        )
        iv = SlotInterventions(2, torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            iv.install(0, comp.program(0, TOK.encode(PROMPT)), lambda s: [4, 32])
        active.append(iv.active([0]))
        if first == 4:  # no local head: identity on this rank
            assert bool((iv.M[Site(0, "attn.hook_z")][0] == 1).all())
    assert active[0] == active[1] == (frozenset({Site(0, "attn.hook_z")}), frozenset())


def test_a_request_whose_sampling_fails_fails_alone(model: Any) -> None:
    """Non-finite logits from one request's write fail that request, not the batch."""
    d = _shape(model).hidden_size
    huge = encode_array(np.full(d, 3e38, dtype=np.float32))
    bad = normalise(
        model,
        {
            "prompt": PROMPT,
            "max_new_tokens": 4,
            "temperature": 1.0,
            "ops": [{"op": "add", "site": "embed", "vector": huge, "scale": 10.0}],
        },
    )
    plain = {
        "prompt_ids": [TOK.encode("In the beginning")],
        "max_new_tokens": 4,
        "stop_at_eos": False,
    }
    out = run(_decoder(model), [("intervene", bad), ("generate", plain)])
    assert out["0"]["ok"] is False and "sampling failed" in out["0"]["error"]["message"]
    assert out["1"]["ok"] and out["1"]["result"]["completions"][0]["completion_tokens"] == 4
