"""Importing published checkpoints as model versions (``tpm-faas models add``), their cards,
and the refusals: an unsupported architecture, no tokenizer, a broken index, unserved
dtypes, an existing version."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _published import STYLE_OF, VOCAB, published
from click.testing import CliRunner
from safetensors.torch import save_file

from tpm_faas.catalog import (
    card,
    checkpoint_sha256,
    describe,
    import_checkpoint,
    model_info,
    resolve,
    versions,
)
from tpm_faas.cli import main
from tpm_faas.errors import ConfigError, UnknownModel, UnsupportedArchitecture

FAMILIES = sorted(STYLE_OF)


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint directory to spoil."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("published")
    return {f: (root / f, published(f, root / f)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_records_the_card(
    family: str, sources: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    src, model = sources[family]
    ref = f"{family.replace('.', '-')}@1"
    got = import_checkpoint(src, ref, tmp_path)
    d = tmp_path / ref.replace("@", "/")
    assert got == json.loads((d / "tpm_model.json").read_text())
    assert got["architecture"] == model.config.model_type
    assert got["parameters"] == sum(p.numel() for p in model.state_dict().values()) - (
        model.config.vocab_size * model.config.hidden_size
        if model.config.tie_word_embeddings and "lm_head.weight" in model.state_dict()
        else 0
    )
    assert got["dtype"] == "float32" and got["tokenizer"] == "hf"
    assert got["attention_heads"] == model.config.num_attention_heads and got["heads"] == {}
    assert d.stat().st_mode & 0o777 == 0o755  # readable by the site's service accounts
    assert got["chat_template"] is (family != "gpt2")
    generation = json.loads((src / "generation_config.json").read_text())
    assert got["eos_token_ids"] == generation["eos_token_id"]
    assert got["checkpoint_sha256"] == checkpoint_sha256(d)
    # The weights are hard links to the source (same filesystem), never converted.
    assert os.path.samefile(d / "model.safetensors", src / "model.safetensors")
    info = model_info(ref, d)
    assert info.tokenizer == "hf" and info.tokenizer_dir == str(d)
    assert info.chat is (family != "gpt2") and info.vocab_size == VOCAB
    assert info.checkpoint_sha256 == got["checkpoint_sha256"]
    assert resolve(ref, [tmp_path]) == d and versions([tmp_path]) == [(ref, d)]


def test_sharded_checkpoint_imports_whole(tmp_path: Path) -> None:
    model = published("qwen3", tmp_path / "src")
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")  # several files + index
    files = sorted((tmp_path / "src").glob("model-*.safetensors"))
    assert len(files) > 1
    (tmp_path / "src" / "model.safetensors").unlink(missing_ok=True)
    got = import_checkpoint(tmp_path / "src", "q@1", tmp_path / "root", copy=True)
    assert got["weight_files"] == len(files)
    assert got["parameters"] == sum(p.numel() for p in model.state_dict().values())
    d = tmp_path / "root" / "q" / "1"
    assert not os.path.samefile(d / files[0].name, files[0])  # --copy


def test_unsupported_architecture_lists_the_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitecture, match=r"'mamba'.*supported: llama.*qwen3"):
        describe(tmp_path)
    out = CliRunner().invoke(main, ["models", "add", str(tmp_path), "m@1", "--root", "r"])
    assert out.exit_code == 7
    assert out.output.count("\n") == 1  # one line for the admin, no traceback
    assert "supported: llama" in out.output


def test_launch_refuses_an_unservable_version_before_any_rank(tmp_path: Path) -> None:
    version = tmp_path / "models" / "m" / "1"
    version.mkdir(parents=True)
    (version / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    env = {"TPM_FAAS_MODELS": str(tmp_path / "models"), "TPM_FAAS_HOME": str(tmp_path)}
    out = CliRunner(env=env).invoke(main, ["launch", "m@1"])
    errors = [line for line in out.output.splitlines() if line.startswith("tpm-faas: error:")]
    assert out.exit_code == 7 and len(errors) == 1 and "Traceback" not in out.output
    assert "model m@1 is a 'mamba' model" in out.output and "supported: llama" in out.output
    assert not (tmp_path / "registry").exists()


def test_no_tokenizer_is_refused_unless_bytes_is_said(tmp_path: Path) -> None:
    from _families import random_model, save_checkpoint

    save_checkpoint(random_model("llama"), tmp_path / "src")  # byte-sized vocabulary
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        import_checkpoint(tmp_path / "src", "b@1", tmp_path / "root")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json and no tpm_model\.json"):
        card(tmp_path / "src")  # never silently byte-tokenized
    got = import_checkpoint(tmp_path / "src", "b@1", tmp_path / "root", tokenizer="bytes")
    assert got["tokenizer"] == "bytes" and got["chat_template"] is False
    assert model_info("b@1", tmp_path / "root" / "b" / "1").tokenizer == "bytes"


def test_an_existing_version_is_never_replaced(
    sources: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    src, _ = sources["llama"]
    import_checkpoint(src, "l@1", tmp_path)
    before = checkpoint_sha256(tmp_path / "l" / "1")
    with pytest.raises(ConfigError, match="already exists"):
        import_checkpoint(src, "l@1", tmp_path)
    assert checkpoint_sha256(tmp_path / "l" / "1") == before
    assert [p.name for p in (tmp_path / "l").iterdir()] == ["1"]  # no temporary left
    with pytest.raises(UnknownModel, match="name@version"):
        import_checkpoint(src, "../x@1", tmp_path)


def test_broken_index_and_unserved_dtypes_are_refused(
    sources: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    src, _ = sources["qwen2"]
    bad = _copy(src, tmp_path / "bad")
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ConfigError, match="missing"):
        describe(bad)
    (bad / "model.safetensors.index.json").unlink()
    save_file({"x": torch.zeros(4, dtype=torch.int8)}, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match="served as they are"):
        describe(bad)


def test_models_cli_add_list_show(sources: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    src, _ = sources["mistral"]
    env = {"TPM_FAAS_MODELS": str(tmp_path / "root"), "TPM_FAAS_HOME": str(tmp_path)}
    runner = CliRunner(env=env)
    out = runner.invoke(main, ["models", "add", str(src), "mistral-tiny@1", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["architecture"] == "mistral"
    listed = runner.invoke(main, ["models", "list", "--json"])
    assert [r["model"] for r in json.loads(listed.output)] == ["mistral-tiny@1"]
    table = runner.invoke(main, ["models", "list"])
    assert "mistral-tiny@1" in table.output and "hf" in table.output
    shown = runner.invoke(main, ["models", "show", "mistral-tiny@1"])
    assert shown.exit_code == 0 and "chat_template      True" in shown.output
    missing = runner.invoke(main, ["models", "show", "nope@1"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    sites = runner.invoke(main, ["sites", "mistral-tiny@1", "--prompt", "And God", "--json"])
    tokens = json.loads(sites.output)["tokens"]
    assert tokens[0]["token"] == "<s>" and "".join(t["token"] for t in tokens[1:]) == "And God"


def test_dynamic_rope_is_refused_before_any_rank(
    sources: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    src, _ = sources["llama"]
    bad = _copy(src, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="rope_type 'dynamic'"):
        describe(bad)
