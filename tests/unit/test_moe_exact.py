"""The mixtures of experts (Mixtral, Qwen3-MoE, DeepSeek-V3 and Kimi K2) through the serving
runtime equal ``transformers``, and load from checkpoints in the layout they are published in.

The models are tiny random-weight ones (:mod:`_families`) in several routing shapes: expert
counts and top-k values (top-1, top-k of every expert), Qwen3-MoE's dense layers
(``mlp_only_layers``, ``decoder_sparse_step``) and both ``norm_topk_prob``; DeepSeek's
group-limited routing over 4, 2 and 1 groups with its score-correction bias, shared experts and
dense first layers, and its multi-head latent attention with and without a query rank,
interleaved or rotate-half rotary, with and without YaRN. The runtime is the
one rank 0 runs (:class:`Scheduler` over :class:`Decoder`); the reference is the same model's
``generate()`` and its modules' outputs under hooks. Published Mixtral and Qwen3-MoE
checkpoints hold one tensor per expert (``experts.3.w1.weight``,
``experts.3.gate_proj.weight``) where ``transformers`` 5 holds fused 3-D parameters: they are
imported with ``models add`` and loaded through :meth:`ModelRunner.load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _families import kimi_checkpoint, random_model, save_checkpoint
from _reference import hooked, normalise, reference_generate, reference_values, run
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_families_exact import (
    ATOL,
    NEW,
    PROMPT,
    PROMPTS,
    RTOL,
    TOK,
    _every_site_matches,
    _generate,
    _query,
    _served,
    one_thread,  # noqa: F401 (the autouse fixture, here too)
)
from test_interventions_exact import _edit

from tpm_faas.catalog import import_checkpoint
from tpm_faas.cli import main
from tpm_faas.client import decode_array, encode_array
from tpm_faas.errors import ConfigError, UnsupportedArchitecture
from tpm_faas.runtime.decoder import Decoder
from tpm_faas.runtime.model_store import (
    FusedExperts,
    published_entries,
    read_source,
    weight_files,
)
from tpm_faas.runtime.runner import ModelRunner
from tpm_faas.sites import ModelShape

#: (family, config overrides): routing shapes the defaults of :mod:`_families` do not cover.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-5x2": ("mixtral", {}),
    "mixtral-3x3": ("mixtral", {"num_local_experts": 3, "num_experts_per_tok": 3}),
    "mixtral-8x1": (
        "mixtral",
        {"num_local_experts": 8, "num_experts_per_tok": 1, "num_hidden_layers": 3},
    ),
    "qwen3_moe-6x3-dense0": ("qwen3_moe", {}),
    "qwen3_moe-4x2-norm-step2": (
        "qwen3_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [],
        },
    ),
    "deepseek_v3-qrank-4groups": ("deepseek_v3", {}),
    "deepseek_v3-noqrank-2groups": (
        "deepseek_v3",
        {
            "q_lora_rank": None,
            "rope_interleave": False,
            "rope_scaling": None,
            "n_routed_experts": 6,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "n_shared_experts": 2,
            "norm_topk_prob": False,
            "first_k_dense_replace": 2,
            "num_hidden_layers": 4,
        },
    ),
    "kimi_k2": ("kimi_k2", {}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request: pytest.FixtureRequest) -> Any:
    family, overrides = VARIANTS[request.param]
    return random_model(family, **overrides)


def _sparse_layers(model: Any) -> list[int]:
    return [i for i, b in enumerate(model.model.layers) if hasattr(b.mlp, "experts")]


def test_the_routing_shapes_are_the_awkward_ones(model: Any) -> None:
    cfg = model.config
    sparse = _sparse_layers(model)
    if cfg.model_type == "mixtral":
        assert sparse == list(range(cfg.num_hidden_layers))
        experts = model.model.layers[0].mlp.experts.gate_up_proj
        assert experts.shape[0] == cfg.num_local_experts
    elif cfg.model_type == "qwen3_moe":
        step, dense = cfg.decoder_sparse_step, cfg.mlp_only_layers
        want = [i for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0]
        assert sparse == want and 0 < len(sparse) < cfg.num_hidden_layers
    else:
        assert 0 < cfg.first_k_dense_replace < cfg.num_hidden_layers
        assert sparse == list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
        assert cfg.v_head_dim != cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.n_group > 1:  # the group limit changes some tokens' choice of experts
            gate = model.model.layers[sparse[0]].mlp.gate
            x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                _, _, grouped = gate(x)
                scores = torch.sigmoid(x @ gate.weight.T) + gate.e_score_correction_bias
            free = scores.topk(cfg.num_experts_per_tok, dim=-1).indices
            assert any(
                set(a.tolist()) != set(b.tolist()) for a, b in zip(grouped, free, strict=True)
            )
        assert gate_bias(model).abs().min() > 0  # drawn, not transformers' zeros
        return
    assert cfg.num_attention_heads > cfg.num_key_value_heads > 1


def gate_bias(model: Any) -> torch.Tensor:
    layer = _sparse_layers(model)[0]
    bias: torch.Tensor = model.model.layers[layer].mlp.gate.e_score_correction_bias
    return bias


def test_greedy_tokens_and_logprobs_equal_generate(model: Any) -> None:
    dec = Decoder(model, slots=4, max_len=96)
    got = _served(dec, [_query([p]) for p in PROMPTS])
    for ids, c in zip(PROMPTS, got, strict=True):
        tokens, logps = _generate(model, ids, NEW)
        assert c["token_ids"] == tokens, ids
        mine = [e["logprob"] for e in c["logprobs"]]
        np.testing.assert_allclose(mine, logps, atol=1e-4, rtol=RTOL)


def test_batched_sequences_equal_one_at_a_time(model: Any) -> None:
    """Sequences at different positions share decode steps (4 prompts, 3 slots): the
    experts each token chooses, and so its output, do not depend on its neighbours."""
    dec = Decoder(model, slots=3, max_len=96)
    prompts = [*PROMPTS, PROMPTS[1][:9]]
    together = _served(dec, [_query([p], new=NEW + i) for i, p in enumerate(prompts)])
    alone = [_served(dec, [_query([p], new=NEW + i)])[0] for i, p in enumerate(prompts)]
    for a, b in zip(together, alone, strict=True):
        assert a["token_ids"] == b["token_ids"]
        np.testing.assert_allclose(
            [e["logprob"] for e in a["logprobs"]], [e["logprob"] for e in b["logprobs"]], atol=1e-5
        )


def test_every_site_equals_the_transformers_modules(model: Any) -> None:
    """``hook_mlp_out`` is the MoE block's output (a dense layer's MLP output in Qwen3-MoE's
    dense layers); every other site is where it is in the dense families."""
    shape = ModelShape.from_config(model.config.to_dict())
    ids = TOK.encode(PROMPT)
    z = _every_site_matches(model, Decoder(model, slots=4, max_len=96))
    v_head_dim = getattr(model.config, "v_head_dim", None) or model.config.head_dim
    assert z == [len(ids), model.config.num_attention_heads, v_head_dim] and shape.head_dim == z[2]


#: Writes at the sites a mixture of experts changes or makes uneven: the MoE block's output,
#: and the heads of ``attn.hook_z`` (``[heads, v_head_dim]`` under MLA).
WRITES = [
    {"op": "add", "site": "blocks.1.hook_mlp_out", "scale": 2.0},
    {"op": "ablate", "site": "blocks.1.hook_mlp_out", "method": "mean"},
    {"op": "add", "site": "blocks.1.attn.hook_z", "heads": [0, 3]},
    {"op": "scale_heads", "layers": [1], "heads": [1], "scale": 0.0},
]


@pytest.mark.parametrize("op", WRITES, ids=[f"{w['op']}-{w.get('site', 'z')}" for w in WRITES])
def test_writes_change_outputs_exactly_as_the_reference(model: Any, op: dict[str, Any]) -> None:
    shape = ModelShape.from_config(model.config.to_dict())
    ids = TOK.encode(PROMPT)
    positions = [1, 4, len(ids) - 1]
    site = op.get("site", "blocks.1.attn.hook_z")
    width = [len(op["heads"]), shape.head_dim] if "heads" in op else [shape.hidden_size]
    value = None
    spec = {"positions": positions, **op}
    if op["op"] == "add":
        value = torch.from_numpy(np.random.default_rng(3).standard_normal(width).astype(np.float32))
        spec["vector"] = encode_array(value.numpy())
    body = normalise(model, {"prompt": PROMPT, "ops": [spec, {"op": "save", "site": "unembed"}]})
    reply = run(Decoder(model, slots=2, max_len=96), [("intervene", body)])["0"]
    assert reply["ok"], reply
    got = decode_array(reply["result"]["results"][0]["saved"]["unembed"]["tensor"])
    with hooked(model, site, _edit(op, value, positions)), torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    plain = reference_values(model, ids, [])["unembed"]
    assert not np.allclose(ref.numpy(), plain.numpy(), atol=1e-3)  # the write does something
    np.testing.assert_allclose(got, ref.numpy(), atol=ATOL * 10, rtol=RTOL)


def test_steering_during_generation_matches_the_reference(model: Any) -> None:
    """Steering that changes which experts the generated tokens choose."""
    ids = TOK.encode(PROMPT)
    vec = np.random.default_rng(5).standard_normal(model.config.hidden_size).astype(np.float32)
    spec = {
        "op": "add",
        "site": "hook_resid_post",
        "layers": [0],
        "vector": encode_array(vec * 2),
        "generation": True,
    }
    req = {"prompt": PROMPT, "ops": [spec], "max_new_tokens": 10, "stop_at_eos": False}
    reply = run(Decoder(model, slots=2, max_len=96), [("intervene", normalise(model, req))])["0"]
    assert reply["ok"], reply
    edit = _edit({"op": "add"}, torch.from_numpy(vec * 2), list(range(96)))
    want = reference_generate(model, ids, 10, [("blocks.0.hook_resid_post", edit)])
    assert reply["result"]["results"][0]["token_ids"] == want
    assert want != reference_generate(model, ids, 10, [])


def test_graph_capturable_step_equals_the_dynamic_step(model: Any) -> None:
    """``decode_dense`` (the step a CUDA graph captures: static shapes over the whole cache,
    keys and values of their own widths) equals the dynamic step, slots at different
    positions."""
    dyn, dense = Decoder(model, slots=4, max_len=64), Decoder(model, slots=4, max_len=64)
    prompts = PROMPTS[:3]
    last = []
    for dec in (dyn, dense):
        for slot, ids in enumerate(prompts):
            logits = dec.prefill(slot, ids)
            if dec is dyn:
                last.append(int(logits[0].argmax()))
    pos = [len(p) for p in prompts]
    for _ in range(4):
        a = dyn.decode([0, 1, 2], last, pos)
        b, _ = dense.decode_dense(torch.tensor([*last, 0]), torch.tensor([*pos, 0]))
        torch.testing.assert_close(a, b[:3], rtol=1e-4, atol=1e-4)
        last = [int(r.argmax()) for r in a]
        pos = [q + 1 for q in pos]


# -- published checkpoints -----------------------------------------------------------------
#: One expert's tensors in each family's published checkpoints.
PUBLISHED = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.{e}.w{n}.weight",
    "qwen3_moe": "model.layers.1.mlp.experts.{e}.{n}_proj.weight",
    "deepseek_v3": "model.layers.1.mlp.experts.{e}.{n}_proj.weight",
}
PARTS = {
    "mixtral": ("1", "2", "3"),
    "qwen3_moe": ("gate", "up", "down"),
    "deepseek_v3": ("gate", "up", "down"),
}


def _names(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", list(PUBLISHED))
def test_published_checkpoint_imports_loads_and_serves(family: str, tmp_path: Path) -> None:
    """``save_pretrained`` writes the published per-expert layout (checked); ``models add``
    imports it, :meth:`ModelRunner.load` fills the fused parameters from it (reading every
    tensor once) and the served tokens equal ``generate()``."""
    model = random_model(family)
    src = save_checkpoint(model, tmp_path / "hub" / family)
    names = _names(src / "model.safetensors")
    experts = model.model.layers[_sparse_layers(model)[0]].mlp.experts.gate_up_proj.shape[0]
    for e in range(experts):
        assert {PUBLISHED[family].format(e=e, n=n) for n in PARTS[family]} <= names
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)

    root = tmp_path / "root"
    out = CliRunner().invoke(
        main,
        ["models", "add", str(src), f"{family}@1", "--root", str(root), "--tokenizer", "bytes"],
    )
    assert out.exit_code == 0, out.output
    card = json.loads((root / family / "1" / "tpm_model.json").read_text())
    # Qwen3-MoE's attention is tensor parallel; Mixtral and DeepSeek are served at tp=1
    assert card["architecture"] == family and card["tensor_parallel"] is (family == "qwen3_moe")
    assert card["parameters"] == sum(t.numel() for t in model.state_dict().values())

    runner = ModelRunner.load(f"{family}@1", root / family / "1", dtype="float32", tp_size=1)
    loaded = runner.model.state_dict()  # parameters and persistent buffers (DeepSeek's bias)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded[name], t), name
    assert runner.weight_bytes == (src / "model.safetensors").stat().st_size - _header(src)
    dec = runner.attach_decoder(slots=2, max_len=96)
    [c] = _served(dec, [_query([PROMPTS[1]])])
    assert c["token_ids"] == _generate(model, PROMPTS[1], NEW)[0]
    _embed_equals_transformers(runner, model)


def _embed_equals_transformers(runner: ModelRunner, model: Any) -> None:
    """Embed mode: the core's mean-pooled last hidden states, one sequence at a time."""
    got = runner.embed({"input_ids": PROMPTS[:2], "pooling": "mean"})
    with torch.no_grad():
        want = [model.model(torch.tensor([p])).last_hidden_state[0].mean(0) for p in PROMPTS[:2]]
    np.testing.assert_allclose(
        decode_array(got["output"]), torch.stack(want).numpy(), atol=ATOL, rtol=RTOL
    )


def test_kimi_k2_checkpoint_is_served_as_deepseek_v3(tmp_path: Path) -> None:
    """Kimi K2's ``config.json`` says ``model_type`` ``kimi_k2`` (a type ``transformers`` does
    not know) with ``DeepseekV3ForCausalLM``: imported under its own name, loaded as
    DeepSeek-V3, served equal to ``generate()``; with another architecture it is refused."""
    model = random_model("kimi_k2", seed=5)
    src = kimi_checkpoint(save_checkpoint(model, tmp_path / "hub"))
    card = import_checkpoint(src, "kimi@1", tmp_path / "root", tokenizer="bytes")
    assert card["architecture"] == "kimi_k2" and card["family"] == "Kimi K2"
    shape = ModelShape.from_config(json.loads((src / "config.json").read_text()))
    assert (shape.num_heads, shape.head_dim) == (4, 10)  # attn.hook_z: [heads, v_head_dim]
    runner = ModelRunner.load(
        "kimi@1", tmp_path / "root" / "kimi" / "1", dtype="float32", tp_size=1
    )
    assert type(runner.model).__name__ == "DeepseekV3ForCausalLM"
    assert runner.info.architecture == "kimi_k2" and runner.info.head_dim == 10
    loaded = runner.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded[name], t), name
    dec = runner.attach_decoder(slots=2, max_len=96)
    [c] = _served(dec, [_query([PROMPTS[0]])])
    assert c["token_ids"] == _generate(model, PROMPTS[0], NEW)[0]
    _embed_equals_transformers(runner, model)

    other = tmp_path / "other"
    save_checkpoint(model, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="kimi_k2", architectures=["KimiLinearForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="serves kimi_k2 as DeepseekV3ForCausalLM"):
        import_checkpoint(other, "other@1", tmp_path / "root", tokenizer="bytes")


def _header(src: Path) -> int:
    with (src / "model.safetensors").open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("family", list(PUBLISHED))
def test_fused_checkpoint_loads_too(family: str, tmp_path: Path) -> None:
    """A checkpoint in ``transformers`` 5's own fused layout (parameter names as they are)
    loads as it is."""
    model = random_model(family, seed=3)
    src = tmp_path / "fused"
    model.config.save_pretrained(src)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors")
    assert any(n.endswith("experts.gate_up_proj") for n in _names(src / "model.safetensors"))
    import_checkpoint(src, "fused@1", tmp_path / "root", tokenizer="bytes")
    runner = ModelRunner.load(
        "fused@1", tmp_path / "root" / "fused" / "1", dtype="float32", tp_size=1
    )
    loaded = dict(runner.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(loaded[name], p), name


def test_fused_experts_read_only_the_slice_asked(tmp_path: Path) -> None:
    """A shard of a fused parameter (along the experts, the gate/up rows across their
    boundary, or the columns) equals that slice of the stacked tensors."""
    model = random_model("mixtral", num_local_experts=3)
    src = save_checkpoint(model, tmp_path / "m")
    files = weight_files(src)
    params = dict(model.named_parameters())
    sources = published_entries(params, files)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    fused = sources[name]
    assert isinstance(fused, FusedExperts)
    assert (
        sources["model.layers.1.mlp.gate.weight"]
        is files["model.layers.1.block_sparse_moe.gate.weight"]
    )
    want = params[name].detach()
    assert fused.shape == tuple(want.shape)
    inner = model.config.intermediate_size
    assert torch.equal(read_source(fused), want)
    assert torch.equal(read_source(fused, 0, 1, 2), want[1:3])
    assert torch.equal(read_source(fused, 1, inner - 5, 9), want[:, inner - 5 : inner + 4])
    assert torch.equal(read_source(fused, 1, inner, inner), want[:, inner:])
    assert torch.equal(read_source(fused, 2, 7, 11), want[:, :, 7:18])
    down = sources["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(read_source(down), params["model.layers.0.mlp.experts.down_proj"])


def test_a_checkpoint_missing_an_expert_is_refused(tmp_path: Path) -> None:
    """Per-expert tensors of fewer experts than the model has: refused by shape, not
    padded."""
    model = random_model("qwen3_moe")
    src = tmp_path / "short"
    model.config.save_pretrained(src)
    save_checkpoint(model, tmp_path / "full")
    full = load_file(tmp_path / "full" / "model.safetensors")
    save_file({k: v for k, v in full.items() if ".experts.5." not in k}, src / "model.safetensors")
    import_checkpoint(src, "short@1", tmp_path / "root", tokenizer="bytes")
    with pytest.raises(
        ConfigError,
        match=r"experts.gate_up_proj: shards of \[6\] along dimension 0 do not make up 5",
    ):
        ModelRunner.load("short@1", tmp_path / "root" / "short" / "1", dtype="float32", tp_size=1)
