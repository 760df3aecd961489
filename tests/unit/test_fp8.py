"""FP8 checkpoints (DeepSeek-V3, Kimi K2): block-scaled e4m3 weights with their
``weight_scale_inv`` are dequantized as they are read, each rank reading only its slice.

The checkpoint is a tiny random DeepSeek-V3 whose projections are written in FP8 by
:func:`write_fp8_checkpoint` (blocks of 128 x 128, with dimensions above 128 and not multiples
of it: partial blocks and several scale rows and columns); the reference is the same
dequantized weights written as a float checkpoint. Both are imported with ``models add`` and
loaded through :meth:`ModelRunner.load`: every parameter, the logits and the greedy tokens are
equal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _families import kimi_checkpoint, random_model, save_checkpoint
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_families_exact import (
    PROMPTS,
    _query,
    _served,
    one_thread,  # noqa: F401 (the autouse fixture, here too)
)

from tpm_faas.catalog import check_servable, import_checkpoint
from tpm_faas.cli import main
from tpm_faas.errors import ConfigError
from tpm_faas.runtime.model_store import (
    FP8_CARD,
    Fp8Block,
    FusedExperts,
    fp8_block,
    fp8_sources,
    hf_config,
    published_entries,
    read_header,
    read_source,
    weight_files,
)
from tpm_faas.runtime.runner import ModelRunner
from tpm_faas.testing.checkpoints import (
    FP8_QUANTIZATION,
    FP8_WEIGHTS,
    fp8_quantize,
    write_fp8_checkpoint,
)

#: DeepSeek-V3 with dimensions across the 128 blocks: hidden 160 (a full block and a partial
#: one), the dense MLP's 272 (three blocks, the last partial), the query rank 136, the experts'
#: 96 (one partial block).
SHAPE: dict[str, Any] = {
    "hidden_size": 160,
    "intermediate_size": 272,
    "moe_intermediate_size": 96,
    "q_lora_rank": 136,
    "n_routed_experts": 6,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
}
NEW = 8


def _fp8_pair(tmp_path: Path, family: str = "deepseek_v3") -> tuple[Any, Path, Path]:
    """The model, its FP8 checkpoint, and the float checkpoint of its dequantized weights."""
    model = random_model(family, **SHAPE)
    fp8 = save_checkpoint(model, tmp_path / "hub" / "fp8")
    dequantized = write_fp8_checkpoint(fp8)
    ref = save_checkpoint(model, tmp_path / "hub" / "ref")
    tensors = load_file(str(ref / "model.safetensors"))
    assert set(dequantized) < set(tensors)
    tensors.update(dequantized)
    save_file(tensors, str(ref / "model.safetensors"), metadata={"format": "pt"})
    return model, fp8, ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    return _fp8_pair(tmp_path_factory.mktemp("fp8"))


def test_the_checkpoint_is_in_the_published_layout(pair: tuple[Any, Path, Path]) -> None:
    """FP8 projections (per-expert ones included) each with a float32 scale of
    ``[ceil(rows / 128), ceil(cols / 128)]``; norms, embeddings, ``lm_head``, the router and
    its bias as they were; the config says what DeepSeek-V3's says."""
    _, fp8, _ = pair
    header = read_header(fp8 / "model.safetensors")
    quantized = {n for n, e in header.items() if e.dtype == "float8_e4m3fn"}
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in quantized
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in quantized
    assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in quantized
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert header[name].dtype == "float32" and not FP8_WEIGHTS.fullmatch(name)
    assert header["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "float32"
    shapes = set()
    for name in quantized:
        rows, cols = header[name].shape
        scale = header[name + "_scale_inv"]
        assert scale.dtype == "float32"
        assert scale.shape == (math.ceil(rows / 128), math.ceil(cols / 128))
        shapes.add(scale.shape)
    assert {(1, 2), (2, 2), (3, 2), (2, 1)} <= shapes  # several blocks, partial ones
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION
    assert fp8_block(config) == (128, 128)
    assert not hasattr(hf_config(fp8), "quantization_config")  # plain Linear layers


def _save_fp8(path: Path, q: torch.Tensor, scale: torch.Tensor) -> Fp8Block:
    save_file({"w.weight": q, "w.weight_scale_inv": scale}, str(path))
    block = fp8_sources(read_header(path), (128, 128))["w.weight"]
    assert isinstance(block, Fp8Block)
    return block


def test_dequantized_weight_is_the_block_formula(tmp_path: Path) -> None:
    """``w[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]``, partial last blocks included,
    computed here element by element; within e4m3's rounding of the original weight."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    w[130:256] *= 40.0  # blocks of very different scales
    q, scale = fp8_quantize(w)
    assert scale.shape == (3, 2)
    block = _save_fp8(tmp_path / "w.safetensors", q, scale)
    values, scales = q.to(torch.float32).numpy(), scale.numpy()
    want = np.empty((300, 200), dtype=np.float32)
    for i in range(300):
        for j in range(200):
            want[i, j] = values[i, j] * scales[i // 128, j // 128]
    got = read_source(block)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value, or the block's smallest step
    floor = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200] * 2.0**-9
    assert bool(((got - w).abs() <= w.abs() / 16 + floor).all())
    np.testing.assert_array_equal(
        scales[1], w[128:256].abs().reshape(128, 2, 100).amax(dim=(0, 2)) / 448
    )


def test_whole_blocks_dequantize_as_transformers_does(tmp_path: Path) -> None:
    """Where every block is whole, ``transformers``' FP8 dequantization gives the same."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q, scale = fp8_quantize(torch.randn(256, 384, generator=torch.Generator().manual_seed(3)))
    block = _save_fp8(tmp_path / "w.safetensors", q, scale)
    want = Fp8Dequantize(None)._dequantize_one(q, scale, torch.float32)
    assert torch.equal(read_source(block), want)


def test_sliced_reads_equal_the_slice_and_read_only_its_blocks(tmp_path: Path) -> None:
    """Rows or columns across block boundaries (and empty ones) equal that slice of the whole
    dequantized weight; the bytes read are those of the slice and of its blocks' scales."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(2))
    block = _save_fp8(tmp_path / "w.safetensors", *fp8_quantize(w))
    full = read_source(block)
    from tpm_faas.runtime.model_store import _read

    for dim in (0, 1):
        size = full.shape[dim]
        for start, length in ((0, size), (100, 60), (128, 72), (127, 2), (size - 1, 1), (5, 0)):
            got, nbytes = _read(block, dim, start, length)
            assert torch.equal(got, full.narrow(dim, start, length)), (dim, start, length)
            blocks = math.ceil((start + length) / 128) - start // 128 if length else 0
            other = math.ceil(full.shape[1 - dim] / 128)
            assert nbytes == length * full.shape[1 - dim] + blocks * other * 4


def test_fused_experts_of_fp8_parts_read_only_their_slice(pair: tuple[Any, Path, Path]) -> None:
    """A fused expert parameter over FP8 per-expert tensors: experts, gate/up rows across
    their boundary, and columns across a block boundary equal that slice of the stacked
    dequantized weights."""
    model, fp8, ref = pair
    params = dict(model.named_parameters())
    files = fp8_sources(weight_files(fp8), (128, 128))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    fused = published_entries(params, files)[name]
    assert isinstance(fused, FusedExperts)
    assert all(isinstance(p, Fp8Block) for parts in fused.parts for p in parts)
    plain = published_entries(params, weight_files(ref))[name]
    want = read_source(plain)  # the reference checkpoint's dequantized weights, stacked
    inner = model.config.moe_intermediate_size
    assert fused.shape == tuple(want.shape) == (6, 2 * inner, 160)
    assert torch.equal(read_source(fused), want)
    assert torch.equal(read_source(fused, 0, 2, 3), want[2:5])
    assert torch.equal(read_source(fused, 1, inner - 5, 9), want[:, inner - 5 : inner + 4])
    assert torch.equal(read_source(fused, 2, 120, 30), want[:, :, 120:150])
    down = published_entries(params, files)["model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(read_source(down, 2, 90, 6), read_source(down)[:, :, 90:96])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_checkpoint_serves_as_its_dequantized_weights(
    pair: tuple[Any, Path, Path], tmp_path: Path, dtype: str
) -> None:
    """Imported and loaded, the FP8 checkpoint equals the float checkpoint of its dequantized
    weights: every parameter and buffer, the logits, the greedy tokens. Its card says what is
    served; the loader reads every byte of the file once (scales included)."""
    model, fp8, ref = pair
    root = tmp_path / "root"
    card = import_checkpoint(fp8, "ds-fp8@1", root, tokenizer="bytes")
    import_checkpoint(ref, "ds-ref@1", root, tokenizer="bytes")
    assert card["quantization"] == FP8_CARD and card["dtype"] == "bfloat16"
    assert card["parameters"] == sum(t.numel() for t in model.state_dict().values())
    a = ModelRunner.load("ds-fp8@1", root / "ds-fp8" / "1", dtype=dtype, tp_size=1)
    b = ModelRunner.load("ds-ref@1", root / "ds-ref" / "1", dtype=dtype, tp_size=1)
    mine, theirs = a.model.state_dict(), b.model.state_dict()
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), name
    original = dict(model.named_parameters())["model.layers.0.self_attn.q_a_proj.weight"]
    assert not torch.equal(mine["model.layers.0.self_attn.q_a_proj.weight"].float(), original)
    with (fp8 / "model.safetensors").open("rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert a.weight_bytes == (fp8 / "model.safetensors").stat().st_size - header
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    got = _served(a.attach_decoder(slots=2, max_len=64), [_query(PROMPTS[:2], new=NEW)])
    want = _served(b.attach_decoder(slots=2, max_len=64), [_query(PROMPTS[:2], new=NEW)])
    assert [c["token_ids"] for c in got] == [c["token_ids"] for c in want]
    assert all(len(c["token_ids"]) > 0 for c in got)


def test_models_add_imports_a_kimi_k2_fp8_checkpoint(tmp_path: Path) -> None:
    """``tpm-faas models add`` of an FP8 Kimi K2 checkpoint (``model_type`` ``kimi_k2``, read
    as DeepSeek-V3 without its ``quantization_config``); it loads as its dequantized weights."""
    _, fp8, ref = _fp8_pair(tmp_path, "kimi_k2")
    kimi_checkpoint(fp8)
    root = tmp_path / "root"
    out = CliRunner().invoke(
        main, ["models", "add", str(fp8), "kimi-fp8@1", "--root", str(root), "--tokenizer", "bytes"]
    )
    assert out.exit_code == 0, out.output
    card = json.loads((root / "kimi-fp8" / "1" / "tpm_model.json").read_text())
    assert card["architecture"] == "kimi_k2" and card["quantization"] == FP8_CARD
    check_servable(root / "kimi-fp8" / "1")
    runner = ModelRunner.load("kimi-fp8@1", root / "kimi-fp8" / "1", dtype="float32", tp_size=1)
    want = load_file(str(ref / "model.safetensors"))
    loaded = runner.model.state_dict()
    assert torch.equal(
        loaded["model.layers.0.self_attn.kv_b_proj.weight"],
        want["model.layers.0.self_attn.kv_b_proj.weight"],
    )
    stacked = torch.stack(
        [want[f"model.layers.2.mlp.experts.{e}.down_proj.weight"] for e in range(6)]
    )
    assert torch.equal(loaded["model.layers.2.mlp.experts.down_proj"], stacked)


def _broken(pair: tuple[Any, Path, Path], dest: Path) -> Path:
    """A copy of the FP8 checkpoint to break."""
    _, fp8, _ = pair
    dest.mkdir(parents=True)
    for p in fp8.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _refused(src: Path, root: Path, code: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        import_checkpoint(src, "bad@1", root, tokenizer="bytes")
    assert info.value.code == code and "\n" not in info.value.message
    assert not (root / "bad").exists() or not any((root / "bad").iterdir())


def test_an_fp8_weight_without_its_scale_is_refused(
    pair: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    src = _broken(pair, tmp_path / "noscale")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _refused(
        src,
        tmp_path / "root",
        "missing_fp8_scale",
        r"FP8 weight model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight has no "
        r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight_scale_inv",
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"weight_block_size": [64, 64]}, r"weight_block_size \[64, 64\] is not served"),
        ({"quant_method": "gptq"}, r"quant_method 'gptq' is not served"),
        ({"fmt": "e5m2"}, r"FP8 format 'e5m2' is not served"),
        ({"activation_scheme": "static"}, r"activation_scheme 'static' is not served"),
        (None, r"is FP8 \(float8_e4m3fn\) but config\.json declares no quantization_config"),
    ],
    ids=["block64", "gptq", "e5m2", "static", "no-config"],
)
def test_other_quantizations_are_refused(
    pair: tuple[Any, Path, Path], tmp_path: Path, change: dict[str, Any] | None, match: str
) -> None:
    """Refused at import, at launch (:func:`check_servable`) and at load alike."""
    src = _broken(pair, tmp_path / "other")
    config = json.loads((src / "config.json").read_text())
    if change is None:
        del config["quantization_config"]
    else:
        config["quantization_config"].update(change)
    (src / "config.json").write_text(json.dumps(config))
    _refused(src, tmp_path / "root", "unsupported_quantization", match)
    if change is not None:
        with pytest.raises(ConfigError, match=match):
            check_servable(src)
        with pytest.raises(ConfigError, match=match):
            hf_config(src)
    with pytest.raises(ConfigError, match=match):
        ModelRunner.load("other@1", src, dtype="float32", tp_size=1)


def test_a_scale_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    q, scale = fp8_quantize(torch.randn(300, 200))
    save_file({"w.weight": q, "w.weight_scale_inv": scale[:2]}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match=r"w\.weight_scale_inv is float32 \[2, 2\]; .* needs"):
        fp8_sources(read_header(tmp_path / "w.safetensors"), (128, 128))
