"""Hook-site vocabulary, the `sites` and `schema` commands, and by-reference results."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.client import (
    Result,
    decode_array,
    encode_array,
    load_results_file,
    parse_reply,
)
from tpm_faas.errors import LimitExceeded, RequestError, UnsupportedArchitecture
from tpm_faas.gateway.results import offload, payloads, read_tensors, resolve
from tpm_faas.modes import json_schema
from tpm_faas.protocol.requests import ResultTensor, TensorPayload
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
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba' model.*supported: llama"):
        ModelShape.from_config({"model_type": "mamba"})
    qwen3 = ModelShape.from_config(
        {
            "model_type": "qwen3",
            "hidden_size": 96,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "num_hidden_layers": 2,
            "vocab_size": 300,
            "max_position_embeddings": 4096,
        }
    )
    assert (qwen3.num_heads, qwen3.head_dim) == (6, 24)


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
    run = {"token_ids": [], "prompt_tokens": rows, "completion_tokens": 0}
    return {
        "results": [
            {
                **run,
                "text": "x",
                "saved": {"embed": {"positions": list(range(rows)), "tensor": encode_array(a)}},
            },
            {
                **run,
                "text": "y",
                "saved": {"embed": {"positions": [0], "tensor": encode_array(a[:1])}},
            },
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
    assert (tmp_path / ref["name"]).stat().st_mode & 0o777 == 0o600  # its writer's alone
    assert hashlib.sha256((tmp_path / ref["name"]).read_bytes()).hexdigest() == ref["sha256"]
    assert payloads(out) == []  # no inline data left
    r = _result("req", out)
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


def _result(request_id: str, output: dict[str, Any]) -> Result:
    """``output`` as the client reads it from an intervene reply."""
    receipt = {
        "request_id": request_id,
        "model": "demo-tpm@1",
        "checkpoint_sha256": "0" * 64,
        "request_sha256": "0" * 64,
        "dtype": "float32",
        "tp_size": 1,
        "policy_sha256": "0" * 64,
        "versions": {},
        "issued_at": 0.0,
    }
    reply = {
        "ok": True,
        "request_id": request_id,
        "mode": "intervene",
        "model": "demo-tpm@1",
        "output": output,
        "usage": {},
        "receipt": receipt,
    }
    return parse_reply(json.dumps(reply))


def _offloaded(tmp_path: Path, request_id: str = "req-9", owner: str = "alice") -> Result:
    out = _output(100)
    offload(out, request_id, tmp_path, limit=16, owner=owner)
    return _result(request_id, out)


def test_an_earlier_result_is_read_back_by_reference_for_its_owner(tmp_path: Path) -> None:
    r = _offloaded(tmp_path)
    ref = ResultTensor(**r.saved_ref("embed", prompt=0))
    ref1 = ResultTensor(**r.saved_ref("embed", prompt=1))
    got = read_tensors(tmp_path, ref.result, ref.sha256, [ref.key], frozenset({"alice"}), 1 << 20)
    assert got[ref.key].dtype == "float32" and got[ref.key].shape == [100, 64]
    np.testing.assert_array_equal(decode_array(got[ref.key].model_dump()), r.saved["embed"])
    # in a request's tensors table, next to an inline tensor, within one byte budget; two
    # tensors of one file (one of them named twice) are read in one pass
    inline = TensorPayload(**encode_array(np.ones(64)))
    budget = 101 * 64 * 4
    table = resolve(
        {"a": ref, "b": inline, "c": ref1, "d": ref}, tmp_path, frozenset({"x", "alice"}), budget
    )
    assert table["a"] == table["d"] == got[ref.key] and table["b"] is inline
    np.testing.assert_array_equal(decode_array(table["c"].model_dump()), r.saved_for(1)["embed"])
    with pytest.raises(LimitExceeded, match=r"come to 25856 bytes; the limit left .* 25855"):
        resolve({"a": ref, "c": ref1}, tmp_path, frozenset({"alice"}), budget - 1)
    many = {f"t{k}": ref.model_copy(update={"result": f"r{k}"}) for k in range(5)}
    with pytest.raises(LimitExceeded, match="names 5 earlier results; at most 4"):
        resolve(many, tmp_path, frozenset({"alice"}), budget)


def test_result_references_are_refused_clearly(tmp_path: Path) -> None:
    r = _offloaded(tmp_path)
    ref = ResultTensor(**r.saved_ref("embed"))
    owners = frozenset({"alice"})

    def refused(ref: ResultTensor, who: frozenset[str] = owners, sha: str = "") -> RequestError:
        with pytest.raises(RequestError) as info:
            read_tensors(tmp_path, ref.result, sha or ref.sha256, [ref.key], who, 1 << 20)
        assert info.value.message.startswith("tensors:"), info.value.message
        return info.value

    # someone else's result and a missing one get the same answer
    assert refused(ref, frozenset({"mallory"})).code == "unknown_result"
    assert refused(ref, frozenset()).code == "unknown_result"
    assert refused(ref.model_copy(update={"result": "nope"})).code == "unknown_result"
    assert "no tensor 'results.0.saved.x'" in str(
        refused(ref.model_copy(update={"key": "results.0.saved.x"}))
    )
    assert refused(ref, sha="0" * 64).code == "bad_tensor"
    # a file without an owner, a link, a FIFO (would block a plain open) or a directory is
    # nobody's
    _offloaded(tmp_path, "req-10", owner="")
    assert refused(ref.model_copy(update={"result": "req-10"}), frozenset({""})).code == (
        "unknown_result"
    )
    (tmp_path / "req-11.safetensors").symlink_to(tmp_path / "req-9.safetensors")
    os.mkfifo(tmp_path / "req-12.safetensors")
    (tmp_path / "req-13.safetensors").mkdir()
    for rid in ("req-11", "req-12", "req-13"):
        assert refused(ref.model_copy(update={"result": rid})).code == "unknown_result"
    # corrupt files never reach an allocation: each is checked with its own (matching) hash,
    # so what refuses it is the check named, not the hash
    path = tmp_path / "req-9.safetensors"
    good = path.read_bytes()
    n = int.from_bytes(good[:8], "little")
    head = json.loads(good[8 : 8 + n])
    key = ref.key

    def with_header(h: dict[str, object]) -> bytes:
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + good[8 + n :]

    cases = [
        (good[:5], "unknown_result", "no result"),
        ((1 << 40).to_bytes(8, "little") + good[8:], "unknown_result", "no result"),
        (good[:8] + b"[" * n, "unknown_result", "no result"),  # not JSON
        ((10**5).to_bytes(8, "little") + b"[" * 10**5 + good, "unknown_result", "no result"),
        (
            with_header({**head, "__metadata__": {"owner": ["alice"]}}),
            "unknown_result",
            "no result",
        ),
        (with_header({**head, key: [1, 2]}), "bad_tensor", "has no tensor"),
        (with_header({**head, key: {**head[key], "dtype": "I64"}}), "bad_tensor", "not a float32"),
        (with_header({**head, key: {**head[key], "shape": [True, 64]}}), "bad_tensor", "float32"),
        (good[: 8 + n + 16], "bad_tensor", "does not fit its file"),
        (
            with_header({**head, key: {**head[key], "data_offsets": [10**9, 10**9 + 25600]}}),
            "bad_tensor",
            "does not fit its file",
        ),
    ]
    for broken, want, words in cases:
        path.write_bytes(broken)
        err = refused(ref, sha=hashlib.sha256(broken).hexdigest())
        assert (err.code, words in err.message) == (want, True), (err, broken[:40])
    path.write_bytes(good)
    assert read_tensors(tmp_path, ref.result, ref.sha256, [key], owners, 1 << 20)[key].nbytes
    with pytest.raises(ValueError, match="inline"):
        _result("r", _output(2)).saved_ref("embed")
    with pytest.raises(KeyError, match="saved: embed"):
        r.saved_ref("ln_final")


def test_results_prune_removes_only_old_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TPM_FAAS_HOME", str(tmp_path))
    where = tmp_path / "results"
    now = time.time()
    for rid, age_days in (("old", 9), ("new", 1)):
        _offloaded(where, rid)
        os.utime(where / f"{rid}.safetensors", (now - age_days * 86400,) * 2)
    stale_tmp = where / ".gone.safetensors.tmp"
    stale_tmp.write_bytes(b"x")
    os.utime(stale_tmp, (now - 30 * 86400,) * 2)
    other = where / "notes.txt"  # not ours: never touched, however old
    other.write_text("keep")
    os.utime(other, (now - 99 * 86400,) * 2)
    run = CliRunner().invoke
    dry = run(main, ["results", "prune", "--older-than", "7d", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete 2 files" in dry.output and "kept 1" in dry.output
    assert (where / "old.safetensors").exists()
    done = run(main, ["results", "prune"])  # 7 days by default
    assert "deleted 2 files" in done.output, done.output
    assert sorted(p.name for p in where.iterdir()) == ["new.safetensors", "notes.txt"]
    assert "deleted 1 files" in run(main, ["results", "prune", "--older-than", "12h"]).output
    bad = run(main, ["results", "prune", "--older-than", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output
    assert run(main, ["results", "prune", "--older-than", "-1d"]).exit_code == 2
    young = run(main, ["results", "prune", "--older-than", "0"])  # may still be in use
    assert young.exit_code == 2 and "never pruned" in young.output


@pytest.mark.parametrize(
    "name",
    ["blocks.01.hook_resid_post", "blocks.\u0661.hook_resid_post", "blocks.1.hook_resid_post\n"],
)
def test_a_site_has_one_spelling(name: str) -> None:
    """A leading zero, a non-ASCII digit or a trailing newline is not the site's name."""
    m = ModelShape("llama", 4, 256, 8, 32, 264)
    with pytest.raises(RequestError, match="unknown hook site"):
        parse_site(name, m)
    assert parse_site("blocks.1.hook_resid_post", m).layer == 1
