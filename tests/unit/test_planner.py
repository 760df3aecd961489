"""``tpm-faas plan``: parameter counts, layouts, memory and the decode roofline from a
checkpoint's ``config.json`` alone, on the published configurations in tests/fixtures/configs/."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.errors import ConfigError, RequestError, UnsupportedArchitecture
from tpm_faas.planner import (
    ACHIEVABLE_FRACTION,
    GPUS,
    GPUS_PER_NODE,
    RESERVE_FIXED_BYTES,
    RESERVE_FRACTION,
    Plan,
    experts_touched,
    model_from_config,
    plan,
)

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
FIXTURES = ["kimi-k2-instruct", "deepseek-v3", "llama-3.1-405b-instruct", "qwen3-235b-a22b"]


def config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    return data


# Small published shapes whose exact parameter counts are well known (Hugging Face's counts).
LLAMA_31_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "tie_word_embeddings": False,
}  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
        "vocab_size": 50257}  # fmt: skip
MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "sliding_window": None,
}  # fmt: skip


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("shape", "total"),
    [(LLAMA_31_8B, 8_030_261_248), (GPT2, 124_439_808), (MIXTRAL_8X7B, 46_702_792_704)],
)
def test_exact_counts_of_small_published_models(shape: dict[str, Any], total: int) -> None:
    assert model_from_config(shape).total_params == total


def test_kimi_k2_is_1_03_t_with_32_b_active() -> None:
    m = model_from_config(config("kimi-k2-instruct"))
    assert m.model_type == "kimi_k2" and m.attention == "mla" and m.family == "moe"
    assert m.total_params == pytest.approx(1.03e12, rel=0.02)
    # The checkpoint holds 1,026,470,731,056 numbers: these weights plus ~62 M FP8 block scales.
    assert m.total_params == pytest.approx(1_026_470_731_056, rel=1e-4)
    assert m.total_params < 1_026_470_731_056
    assert m.active_params == pytest.approx(32e9, rel=0.02)
    assert (m.layers, m.moe_layers, m.experts, m.experts_per_token) == (61, 60, 384, 8)


def test_deepseek_v3_is_671_b_with_37_b_active() -> None:
    m = model_from_config(config("deepseek-v3"))
    assert m.total_params == pytest.approx(671e9, rel=0.02)
    assert m.active_params == pytest.approx(37e9, rel=0.02)
    # DeepSeek's own breakdown: 671 B main model, 36.6 B activated (incl. the 0.9 B head).
    assert m.total_params == pytest.approx(671e9, rel=1e-3)
    assert m.active_params == pytest.approx(36.6e9, rel=2e-3)
    assert (m.layers, m.moe_layers) == (61, 58)  # first_k_dense_replace = 3


def test_llama_405b_and_qwen3_235b() -> None:
    llama = model_from_config(config("llama-3.1-405b-instruct"))
    assert llama.family == "dense" and llama.attention == "gqa"
    assert llama.total_params == pytest.approx(405e9, rel=0.02)
    # Dense: a token reads everything but the embedding rows of other tokens.
    assert llama.total_params - llama.active_params == (llama.vocab_size - 1) * 16384
    qwen = model_from_config(config("qwen3-235b-a22b"))
    assert qwen.total_params == pytest.approx(235e9, rel=0.02)
    assert qwen.active_params == pytest.approx(22e9, rel=0.02)
    assert qwen.shared_experts == 0 and qwen.moe_layers == 94


def test_tied_embeddings_are_counted_once() -> None:
    untied = model_from_config(LLAMA_31_8B)
    tied = model_from_config(LLAMA_31_8B | {"tie_word_embeddings": True})
    assert untied.total_params - tied.total_params == 128256 * 4096
    # Tied, the table is the LM head: every row is read.
    assert tied.active_params == tied.total_params


def test_moe_layer_selection_follows_the_config() -> None:
    q = config("qwen3-235b-a22b")
    assert model_from_config(q | {"mlp_only_layers": [0, 1]}).moe_layers == 92
    assert model_from_config(q | {"decoder_sparse_step": 2}).moe_layers == 47
    every_other = model_from_config(config("deepseek-v3") | {"moe_layer_freq": 2})
    assert every_other.moe_layers == len([i for i in range(3, 61) if i % 2 == 0])
    dense_more = model_from_config(config("deepseek-v3") | {"first_k_dense_replace": 10})
    base = model_from_config(config("deepseek-v3"))
    assert dense_more.total_params < base.total_params  # dense MLPs are smaller than 256 experts


def test_kv_cache_per_token() -> None:
    # MLA: (kv_lora_rank + qk_rope_head_dim) x layers x 2 bytes.
    assert model_from_config(config("kimi-k2-instruct")).kv_bytes_per_token() == 576 * 61 * 2
    assert model_from_config(config("deepseek-v3")).kv_bytes_per_token() == 576 * 61 * 2
    # GQA: 2 x layers x kv_heads x head_dim x 2 bytes.
    llama = model_from_config(config("llama-3.1-405b-instruct"))
    assert llama.kv_bytes_per_token() == 2 * 126 * 8 * 128 * 2
    qwen = model_from_config(config("qwen3-235b-a22b"))
    assert qwen.kv_bytes_per_token() == 2 * 94 * 4 * 128 * 2


def test_experts_touched() -> None:
    assert experts_touched(256, 8, 1) == pytest.approx(8)
    assert experts_touched(256, 8, 10_000) == pytest.approx(256)
    assert experts_touched(384, 8, 16) == pytest.approx(384 * (1 - (1 - 8 / 384) ** 16))
    assert experts_touched(128, 8, 2) < experts_touched(128, 8, 3) < 128


# --------------------------------------------------------------------------- layouts


def assert_even(p: Plan) -> None:
    lay, m = p.layout, p.model
    assert lay.gpus == lay.nodes * lay.gpus_per_node
    assert lay.gpus == lay.tensor_parallel * lay.pipeline_parallel * lay.data_parallel
    assert lay.gpus_per_node <= GPUS_PER_NODE and lay.gpus_per_node & (lay.gpus_per_node - 1) == 0
    assert lay.nodes == 1 or lay.gpus_per_node == GPUS_PER_NODE
    assert m.heads % lay.tensor_parallel == 0
    if m.attention != "mla":
        kv, tp = m.kv_heads, lay.tensor_parallel
        assert kv % tp == 0 or tp % kv == 0
    if m.family == "moe":
        assert lay.expert_parallel == lay.gpus and m.experts % lay.expert_parallel == 0
        assert lay.pipeline_parallel == 1 and lay.data_parallel == lay.nodes
    else:
        assert lay.expert_parallel == 1 and lay.pipeline_parallel == lay.nodes
    assert p.memory.fits
    assert p.memory.reserve == pytest.approx(
        RESERVE_FRACTION * p.gpu.memory_bytes + RESERVE_FIXED_BYTES
    )


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_layouts_divide_evenly_fit_and_are_smallest(name: str, gpu: str, dtype: str) -> None:
    p = plan(config(name), gpu=gpu, dtype=dtype, name=name)
    assert_even(p)
    assert p.layout.gpus >= p.min_gpus_for_weights
    if p.layout.nodes > 1:  # one node fewer is not enough
        with pytest.raises(ConfigError, match="does not fit"):
            plan(config(name), gpu=gpu, dtype=dtype, max_nodes=p.layout.nodes - 1)


def test_a_trillion_parameters_need_over_three_h100_nodes_in_bf16_and_two_in_fp8() -> None:
    bf16 = plan(config("kimi-k2-instruct"), gpu="h100-80g", dtype="bf16")
    fp8 = plan(config("kimi-k2-instruct"), gpu="h100-80g", dtype="fp8")
    assert bf16.weights_total_bytes > 3 * GPUS_PER_NODE * 80e9
    assert bf16.min_nodes_for_weights > 3 and bf16.layout.nodes > 3
    assert 1 * GPUS_PER_NODE * 80e9 < fp8.weights_total_bytes <= 2 * GPUS_PER_NODE * 80e9
    assert fp8.min_nodes_for_weights == 2 and fp8.layout.nodes >= 2
    # FP8 keeps embeddings, head, norms and routers in bf16: a little over half the bytes.
    assert 0.5 < fp8.weights_total_bytes / bf16.weights_total_bytes < 0.52


def test_fixture_layouts_on_h100() -> None:
    got = {n: plan(config(n), gpu="h100-80g").layout.describe() for n in FIXTURES}
    assert got == {
        "kimi-k2-instruct": "48 GPUs = 6 nodes of 8; TP 8 (x 6 node replicas), experts EP 48",
        "deepseek-v3": "32 GPUs = 4 nodes of 8; TP 8 (x 4 node replicas), experts EP 32",
        "llama-3.1-405b-instruct": "16 GPUs = 2 nodes of 8; TP 8 x PP 2",
        "qwen3-235b-a22b": "8 GPUs in 1 node; TP 8, experts EP 8",
    }


@pytest.mark.parametrize("name", FIXTURES)
def test_more_context_or_concurrency_never_gives_a_smaller_layout(name: str) -> None:
    c = config(name)
    grid = {
        (ctx, n): plan(
            c, gpu="h100-80g", dtype="fp8", context=ctx, concurrency=n, mla_cache="latent"
        ).layout.gpus
        for ctx in (1024, 8192, 32768, 131072)
        for n in (1, 4, 16, 64)
    }
    for (ctx, n), gpus in grid.items():
        for (ctx2, n2), gpus2 in grid.items():
            if ctx2 >= ctx and n2 >= n:
                assert gpus2 >= gpus, ((ctx, n, gpus), (ctx2, n2, gpus2))
    assert grid[(131072, 64)] > grid[(1024, 1)]


def test_memory_per_gpu_adds_up() -> None:
    # Llama-3.1-405B in FP8 on one node of 8 H100: everything split 8 ways but the norms, the
    # KV heads 1 per GPU (8 KV heads), 16 sequences of 8,192 tokens.
    p = plan(config("llama-3.1-405b-instruct"), gpu="h100-80g", dtype="fp8")
    assert p.layout.describe() == "8 GPUs in 1 node; TP 8"
    kv = 16 * 8192 * (2 * 126 * 1 * 128 * 2)
    assert p.memory.kv_cache == pytest.approx(kv)
    embed_head = 2 * 128256 * 16384 * 2  # bf16
    norms = (126 * 2 + 1) * 16384 * 2  # bf16, replicated
    linear = (405_853_388_800 - 2 * 128256 * 16384 - (126 * 2 + 1) * 16384) * 1
    assert p.memory.weights == pytest.approx((linear + embed_head) / 8 + norms)
    # Two nodes' worth of bf16 needs pipeline stages of 63 layers.
    bf16 = plan(config("llama-3.1-405b-instruct"), gpu="h100-80g")
    assert bf16.layout.pipeline_parallel == 2
    assert bf16.memory.kv_cache == pytest.approx(16 * 8192 * 63 * 1 * 128 * 2 * 2)
    # The busier stage: 63 of 126 layers, plus the LM head and final norm (the last stage).
    d, vocab = 16384, 128256
    layer_linear = 405_853_388_800 - 2 * vocab * d - (126 * 2 + 1) * d
    stage = (layer_linear / 8 + 126 * 2 * d) * 2 * 63 / 126
    assert bf16.memory.weights == pytest.approx(stage + (vocab * d / 8 + d) * 2)


def test_mla_latent_is_held_by_every_rank_of_a_node() -> None:
    p = plan(
        config("deepseek-v3"), gpu="h200-141g", dtype="fp8", concurrency=16, mla_cache="latent"
    )
    assert p.layout.nodes == 1
    assert p.memory.kv_cache == pytest.approx(16 * 8192 * 576 * 61 * 2)
    two = plan(
        config("deepseek-v3"), gpu="h100-80g", dtype="fp8", concurrency=16, mla_cache="latent"
    )
    assert two.layout.nodes == 2  # each node holds the latents of its 8 sequences
    assert two.memory.kv_cache == pytest.approx(8 * 8192 * 576 * 61 * 2)


def test_mla_expanded_cache_is_what_the_decoder_holds() -> None:
    """By default MLA is planned as the serving decoder caches it today: keys (qk_head_dim)
    and values (v_head_dim) per head, split by tensor parallelism."""
    kimi = config("kimi-k2-instruct")
    expanded = plan(kimi, gpu="h200-141g", dtype="fp8", concurrency=16)
    latent = plan(kimi, gpu="h200-141g", dtype="fp8", concurrency=16, mla_cache="latent")
    per_token = 61 * 64 * (192 + 128) * 2  # bytes, bf16: docs/models.md's 2,498,560
    assert expanded.model.kv_bytes_per_token() == per_token == 2_498_560
    assert latent.model.kv_bytes_per_token() == 61 * (512 + 64) * 2
    assert expanded.layout.gpus >= latent.layout.gpus
    tp = expanded.layout.tensor_parallel
    seqs = math.ceil(16 / expanded.layout.data_parallel)
    assert expanded.memory.kv_cache == pytest.approx(seqs * 8192 * per_token / tp)
    with pytest.raises(ConfigError, match="unknown MLA cache"):
        plan(kimi, gpu="h200-141g", mla_cache="paged")


def test_sliding_window_bounds_the_cache() -> None:
    mistral = LLAMA_31_8B | {"model_type": "mistral", "sliding_window": 4096}
    short = plan(mistral, gpu="h100-80g", context=4096, concurrency=4)
    long = plan(mistral, gpu="h100-80g", context=32768, concurrency=4)
    assert long.memory.kv_cache == short.memory.kv_cache
    llama = plan(LLAMA_31_8B, gpu="h100-80g", context=32768, concurrency=4)
    assert llama.memory.kv_cache == pytest.approx(8 * short.memory.kv_cache)


# --------------------------------------------------------------------------- roofline and SU


def test_decode_roofline_of_a_dense_model() -> None:
    p = plan(config("llama-3.1-405b-instruct"), gpu="h100-80g", dtype="fp8", concurrency=16)
    bw = 3350e9 * ACHIEVABLE_FRACTION
    assert p.bandwidth_gb_s == pytest.approx(bw / 1e9)
    b1 = p.decode_batch1
    # Batch 1 reads the GPU's weights (all but 1 of the embedding rows) and one sequence's KV.
    table = 128256 * 16384 * 2 / 8
    kv1 = p.memory.kv_cache / 16
    assert b1.bytes_per_step == pytest.approx(p.memory.weights - table * (1 - 1 / 128256) + kv1)
    assert b1.tokens_per_s == pytest.approx(bw / b1.bytes_per_step)
    c = p.decode_concurrent
    assert c.bytes_per_step == pytest.approx(b1.bytes_per_step + 15 * kv1, rel=1e-3)
    assert c.tokens_per_s == pytest.approx(16 * bw / c.bytes_per_step)
    assert c.tokens_per_s > b1.tokens_per_s
    # 1 SU = 1 GPU-hour.
    assert c.su_per_1k_tokens == pytest.approx(8 * 1000 / (3600 * c.tokens_per_s))


def test_decode_roofline_of_a_mixture_of_experts() -> None:
    p = plan(config("qwen3-235b-a22b"), gpu="h100-80g", concurrency=16)
    m = p.model
    expert_bytes = m.expert_params * 2
    local = m.experts / p.layout.expert_parallel
    b1, c = p.decode_batch1, p.decode_concurrent
    # From batch 1 to 16 the experts read grow from k/ep to touched(16)/ep per layer.
    more_experts = (experts_touched(128, 8, 16) - 8) / 128 * local * m.moe_layers * expert_bytes
    more_kv = 15 * p.memory.kv_cache / 16
    embed_rows = 15 * 4096 * 2 / 8
    assert c.bytes_per_step - b1.bytes_per_step == pytest.approx(
        more_experts + more_kv + embed_rows
    )
    # Batching amortises the weights: far more tokens per second, fewer SU per token.
    assert c.tokens_per_s > 2 * b1.tokens_per_s
    assert c.su_per_1k_tokens < b1.su_per_1k_tokens


def test_measured_bandwidth_replaces_the_datasheet() -> None:
    c = config("deepseek-v3")
    peak = plan(c, gpu="h100-80g")
    measured = plan(c, gpu="h100-80g", decode_bw_gb_s=3000)
    assert measured.layout == peak.layout and measured.bandwidth_gb_s == 3000
    ratio = 3000 / (3350 * ACHIEVABLE_FRACTION)
    assert measured.decode_concurrent.tokens_per_s == pytest.approx(
        peak.decode_concurrent.tokens_per_s * ratio
    )
    assert "measured" in measured.bandwidth_source


def test_faster_memory_decodes_faster() -> None:
    c = config("qwen3-235b-a22b")
    rates = {g: plan(c, gpu=g).decode_concurrent.tokens_per_s for g in GPUS}
    assert rates["a100-80g"] < rates["h100-80g"] < rates["h200-141g"]


# --------------------------------------------------------------------------- bad input


def test_bad_configs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        model_from_config([1, 2])
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba'.*qwen3_moe.*deepseek_v3"):
        model_from_config({"model_type": "mamba"})
    with pytest.raises(UnsupportedArchitecture, match="without model_type"):
        model_from_config({"hidden_size": 8})
    broken = config("deepseek-v3")
    del broken["kv_lora_rank"]
    with pytest.raises(ConfigError, match="has no 'kv_lora_rank'"):
        model_from_config(broken)
    with pytest.raises(ConfigError, match="'num_hidden_layers' must be a whole number"):
        model_from_config(LLAMA_31_8B | {"num_hidden_layers": "32"})
    with pytest.raises(ConfigError, match="must be at least 1"):
        model_from_config(LLAMA_31_8B | {"vocab_size": 0})
    with pytest.raises(ConfigError, match="not a multiple"):
        model_from_config(LLAMA_31_8B | {"num_key_value_heads": 5})
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        model_from_config(MIXTRAL_8X7B | {"num_experts_per_tok": 9})


def test_bad_arguments_raise_clear_errors() -> None:
    c = config("qwen3-235b-a22b")
    with pytest.raises(ConfigError, match="unknown GPU 'v100'; known: h100-80g"):
        plan(c, gpu="v100")
    with pytest.raises(ConfigError, match="unknown dtype 'int4'"):
        plan(c, gpu="h100-80g", dtype="int4")
    with pytest.raises(RequestError):
        plan(c, gpu="h100-80g", context=0)
    with pytest.raises(RequestError):
        plan(c, gpu="h100-80g", decode_bw_gb_s=0)
    with pytest.raises(ConfigError, match="does not fit"):
        plan(config("kimi-k2-instruct"), gpu="h100-80g", max_nodes=2)


def test_context_beyond_the_model_is_noted() -> None:
    p = plan(config("qwen3-235b-a22b"), gpu="h200-141g", context=65536, concurrency=1)
    assert any("max_position_embeddings (40960)" in n for n in p.notes)


# --------------------------------------------------------------------------- the command


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, ["plan", *args])


def test_cli_table() -> None:
    r = invoke(str(CONFIGS / "kimi-k2-instruct.json"), "--gpu", "h100-80g", "--dtype", "fp8")
    assert r.exit_code == 0, r.output
    assert "kimi-k2-instruct: kimi_k2, 1,026.4 B parameters, 31.7 B active" in r.output
    assert "24 GPUs = 3 nodes of 8; TP 8 (x 3 node replicas), experts EP 24" in r.output
    assert "at least 13 GPUs (2 nodes)" in r.output
    assert "1 SU = 1 GPU-hour" in r.output


def test_cli_json_matches_the_planner(tmp_path: Path) -> None:
    # A checkpoint directory works as well as its config.json.
    ckpt = tmp_path / "DeepSeek-V3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((CONFIGS / "deepseek-v3.json").read_text())
    r = invoke(str(ckpt), "--gpu", "h200-141g", "--context", "4096", "--concurrency", "32",
               "--decode-bw", "4000", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    p = plan(config("deepseek-v3"), gpu="h200-141g", context=4096, concurrency=32,
             decode_bw_gb_s=4000)  # fmt: skip
    assert d["name"] == "DeepSeek-V3"
    assert d["model"]["total_params"] == p.model.total_params
    assert d["layout"]["gpus"] == p.layout.gpus
    assert d["layout"]["expert_parallel"] == p.layout.expert_parallel
    assert d["memory_per_gpu"]["weights"] == pytest.approx(p.memory.weights)
    assert d["decode"]["bandwidth_gb_s"] == 4000
    assert d["decode"]["concurrent"]["batch"] == 32
    assert d["su"]["definition"] == "1 SU = 1 GPU-hour"
    assert d["su"]["per_1k_tokens"] == pytest.approx(p.decode_concurrent.su_per_1k_tokens)
    assert math.isclose(d["su"]["policy_output_token"], d["su"]["per_1k_tokens"] / 1000)


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("{not json", [], "is not valid JSON"),
        ('{"model_type": "mamba"}', [], "'mamba' model, which the planner cannot read"),
        ('{"model_type": "llama"}', [], "has no 'hidden_size'"),
        (None, ["--gpu", "v100"], "unknown GPU 'v100'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_7(
    tmp_path: Path, content: str | None, args: list[str], message: str
) -> None:
    path = tmp_path / "config.json"
    path.write_text(content if content is not None else (CONFIGS / "deepseek-v3.json").read_text())
    r = invoke(str(path), *(args or ["--gpu", "h100-80g"]))
    assert r.exit_code == ConfigError.exit_code, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpm-faas: error: "), r.stderr
    assert message in lines[0]


def test_cli_missing_file(tmp_path: Path) -> None:
    r = invoke(str(tmp_path / "nope.json"), "--gpu", "h100-80g")
    assert r.exit_code == ConfigError.exit_code
    assert "nope.json" in r.stderr and "Traceback" not in r.output
