"""Hook-site vocabulary, the `sites` and `schema` commands, and by-reference results."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.client import Result, decode_array, encode_array, load_results_file
from tpm_faas.errors import RequestError
from tpm_faas.gateway.results import offload, payloads
from tpm_faas.schemas import json_schema
from tpm_faas.sites import ModelShape, all_sites, parse_site, site_table

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ModelShape("llama", 4, 256, 8, 32, 264)


def test_site_vocabulary_and_shapes() -> None:
    names = [s.name for s in all_sites(LLAMA)]
    assert names[0] == "embed" and names[-2:] == ["ln_final", "unembed"]
    assert len(names) == 3 + 4 * 6 and len(set(names)) == len(names)
    shapes = {r["site"]: r["shape"] for r in site_table(LLAMA)}
    assert shapes["blocks.2.attn.hook_z"] == [8, 32]
    assert shapes["unembed"] == [264] and shapes["blocks.0.hook_mlp_out"] == [256]
    assert parse_site("blocks.3.hook_resid_mid", LLAMA).layer == 3
    for bad in ("blocks.4.hook_resid_post", "blocks.0.hook_q", "blocks..hook_z", "resid"):
        with pytest.raises(RequestError):
            parse_site(bad, LLAMA)


def test_model_shape_from_configs() -> None:
    gpt2 = ModelShape.from_config(
        {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
    )
    assert (gpt2.num_layers, gpt2.head_dim, gpt2.vocab_size) == (12, 64, 50257)
    with pytest.raises(RequestError, match="no hook-site mapping"):
        ModelShape.from_config({"model_type": "mamba"})


def test_sites_command_lists_the_demo_model() -> None:
    out = CliRunner().invoke(main, ["sites", "demo-tpm@1"])
    assert out.exit_code == 0, out.output
    assert "blocks.3.attn.hook_z" in out.output and "[8, 32]" in out.output
    js = CliRunner().invoke(main, ["sites", "demo-tpm@1", "--json"])
    assert len(json.loads(js.output)["sites"]) == 27
    missing = CliRunner().invoke(main, ["sites", "nope@1"])
    assert missing.exit_code != 0 and "nope@1" in missing.output


@pytest.mark.parametrize("mode", ["query", "embed", "intervene"])
def test_published_schemas_are_current(mode: str) -> None:
    published = (ROOT / "docs" / "schemas" / f"{mode}.schema.json").read_text()
    assert published == json_schema(mode), f"regenerate: tpm-faas schema {mode}"
    assert CliRunner().invoke(main, ["schema", mode]).output == published


def _output(rows: int) -> dict[str, object]:
    a = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64)
    return {
        "results": [
            {
                "text": "x",
                "saved": {"embed": {"positions": list(range(rows)), "tensor": encode_array(a)}},
            },
            {"text": "y", "saved": {"embed": {"positions": [0], "tensor": encode_array(a[:1])}}},
        ]
    }


def test_small_results_stay_inline(tmp_path: Path) -> None:
    out = _output(4)
    assert offload(out, "req-1", tmp_path, limit=4096) == 0
    assert "tensors_ref" not in out and not list(tmp_path.iterdir())


def test_large_results_go_by_reference_and_load_back(tmp_path: Path) -> None:
    out = _output(100)
    inline = json.loads(json.dumps(out))
    written = offload(out, "req/../2", tmp_path, limit=4096)
    ref = out["tensors_ref"]
    assert written == ref["bytes"] > 100 * 64 * 4
    assert ref["name"] == "req_.._2.safetensors" and (tmp_path / ref["name"]).is_file()
    assert hashlib.sha256((tmp_path / ref["name"]).read_bytes()).hexdigest() == ref["sha256"]
    assert payloads(out) == []  # no inline data left
    r = Result("req", "intervene", out, {}, {}, raw={})
    for i in (0, 1):
        got = r.saved_for(i)["embed"]
        want = decode_array(inline["results"][i]["saved"]["embed"]["tensor"])
        np.testing.assert_array_equal(got, want)


def test_a_tampered_results_file_is_refused(tmp_path: Path) -> None:
    out = _output(100)
    offload(out, "req-3", tmp_path, limit=16)
    path = tmp_path / out["tensors_ref"]["name"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_results_file(out["tensors_ref"])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_results_file({**out["tensors_ref"], "uri": "file:///nonexistent/x"}, moved)
