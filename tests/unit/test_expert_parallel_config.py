"""A shard group's layout (``--tp``, ``--ep``) is checked from ``config.json`` alone, before any
rank starts: tp and ep are each 1 or the group's size ``max(tp, ep)``, ep > 1 only for a
mixture of experts and only when it divides the routed experts, tp > 1 only where AutoTP
shards; an admin sees one line and exit 7. The layout is carried by the BYO templates and the
registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _families import FAMILIES, kimi_checkpoint, random_model, save_checkpoint

from tpm_faas.compute.templates import TEMPLATES, render
from tpm_faas.errors import ConfigError
from tpm_faas.launcher import layout
from tpm_faas.registry import GroupEntry, ModelInfo
from tpm_faas.runtime.model_store import check_parallel, routed_experts

EXE = Path(sys.executable).parent / "tpm-faas"


def _config(tmp_path: Path, family: str) -> Path:
    FAMILIES[family]().save_pretrained(tmp_path)  # config.json is all check_parallel reads
    return kimi_checkpoint(tmp_path) if family == "kimi_k2" else tmp_path


#: Routed experts per layer of the test shapes (_families).
EXPERTS = {"mixtral": 5, "qwen3_moe": 6, "deepseek_v3": 8, "kimi_k2": 12}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routed_experts_read_from_config(tmp_path: Path, family: str) -> None:
    import json

    config = json.loads((_config(tmp_path, family) / "config.json").read_text())
    assert routed_experts(config) == EXPERTS.get(family, 0)


@pytest.mark.parametrize(
    ("family", "tp", "ep", "size"),
    [
        ("llama", 1, 1, 1),
        ("llama", 2, 1, 2),
        ("qwen3_moe", 1, 2, 2),
        ("qwen3_moe", 2, 2, 2),
        ("qwen3_moe", 2, 1, 2),
        ("qwen3_moe", 1, 3, 3),
        ("qwen3_moe", 6, 6, 6),
        ("mixtral", 1, 5, 5),
        ("deepseek_v3", 1, 2, 2),
        ("deepseek_v3", 1, 8, 8),
        ("kimi_k2", 1, 4, 4),
    ],
)
def test_layouts_served(tmp_path: Path, family: str, tp: int, ep: int, size: int) -> None:
    assert check_parallel(f"{family}@1", _config(tmp_path, family), tp, ep) == size


@pytest.mark.parametrize(
    ("family", "tp", "ep", "message"),
    [
        ("llama", 1, 2, "llama model, which has no experts to spread; serve it with ep=1"),
        ("gpt2", 1, 2, "gpt2 model, which has no experts"),
        ("mixtral", 1, 2, "5 routed experts per layer, which ep=2 does not divide"),
        ("mixtral", 2, 1, "mixtral model, whose attention DeepSpeed AutoTP does not shard"),
        ("qwen3_moe", 1, 4, "6 routed experts per layer, which ep=4 does not divide"),
        ("deepseek_v3", 1, 3, "8 routed experts per layer, which ep=3 does not divide"),
        ("qwen3_moe", 2, 3, r"tp=2 with ep=3: each must be 1 or the group's size \(3 ranks\)"),
        ("qwen3_moe", 3, 2, r"tp=3 with ep=2: each must be 1 or the group's size \(3 ranks\)"),
        ("qwen3_moe", 0, 1, "tp=0: must be a number of ranks, 1 or more"),
        ("qwen3_moe", 1, 0, "ep=0: must be a number of ranks, 1 or more"),
        ("deepseek_v3", 2, 2, r"AutoTP does not shard; serve it with tp=1 \(--ep 2 spreads"),
        ("kimi_k2", 2, 1, "kimi_k2 model, whose attention DeepSpeed AutoTP does not shard"),
        ("gpt2", 2, 1, "AutoTP does not shard; serve it with tp=1"),
    ],
)
def test_layouts_refused(tmp_path: Path, family: str, tp: int, ep: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        check_parallel(f"{family}@1", _config(tmp_path, family), tp, ep)
    assert e.value.code == "config_error" and e.value.exit_code == 7
    assert "\n" not in e.value.message


def test_layout_in_messages() -> None:
    assert layout(2, 1) == "tp=2" and layout(1, 4) == "tp=1, ep=4" and layout(2, 2) == "tp=2, ep=2"


def _launch(root: Path, home: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPM_FAAS_", "GLOBUS_"))}
    env.update(TPM_FAAS_HOME=str(home), TPM_FAAS_MODELS=str(root))
    p = subprocess.run(
        [str(EXE), "launch", *args, "--start-timeout", "30"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return p.returncode, p.stdout, p.stderr


def test_launch_refuses_bad_layouts_in_one_line_before_any_rank(tmp_path: Path) -> None:
    """Through the real ``tpm-faas`` executable: exit 7, one line naming the problem, and no
    Parsl run directory (no rank was started)."""
    root, home = tmp_path / "models", tmp_path / "home"
    save_checkpoint(random_model("mixtral"), root / "tiny-mixtral" / "1", byte_card=True)
    save_checkpoint(random_model("llama"), root / "tiny-llama" / "1", byte_card=True)
    cases = [
        (("tiny-mixtral@1", "--ep", "2"), "5 routed experts per layer, which ep=2 does not divide"),
        (("tiny-llama@1", "--ep", "2"), "llama model, which has no experts to spread"),
        (("tiny-mixtral@1", "--tp", "2", "--ep", "5"), "each must be 1 or the group's size"),
        (("tiny-mixtral@1", "--ep", "2", "--replicas", "2"), "which ep=2 does not divide"),
    ]
    for args, message in cases:
        code, out, err = _launch(root, home, *args)
        lines = err.strip().splitlines()
        assert "Traceback" not in out + err, err
        assert code == 7, (args, err)
        assert len(lines) == 1 and lines[0].startswith("tpm-faas: error: "), err
        assert message in lines[0], err
    assert not list(home.glob("runs/launch/**/rank-*.json"))


def test_byo_templates_carry_ep() -> None:
    byo = {
        "account": "tpm-test",
        "partition": "debug",
        "model": "kimi@1",
        "venv": "/opt/tpm-faas/venv",
        "state_dir": "/var/tmp/tpm-faas",
        "gpus_per_node": 8,
        "ep": 8,
    }
    spec = render(TEMPLATES / "byo" / "shard_group.yaml.j2", byo).config
    assert (spec["tp"], spec["ep"]) == (1, 8)
    plain = {k: v for k, v in byo.items() if k != "ep"}
    assert render(TEMPLATES / "byo" / "shard_group.yaml.j2", plain).config["ep"] == 1
    with pytest.raises(ConfigError, match="ep"):
        render(TEMPLATES / "byo" / "shard_group.yaml.j2", {**byo, "ep": 0})


def test_registry_entry_carries_ep_and_reads_entries_without_it() -> None:
    info = ModelInfo("m@1", 8, 1, 264, 16, "bytes", "0" * 64, "float32")
    entry = GroupEntry(info, "tcp://127.0.0.1:1", 1, 1, "h", 0.0, ep_size=4)
    again = GroupEntry.from_json(entry.to_json())
    assert again == entry and again.size == 4
    import json

    old = json.loads(entry.to_json())
    del old["ep_size"]  # written before expert parallelism
    legacy = GroupEntry.from_json(json.dumps(old))
    assert (legacy.tp_size, legacy.ep_size, legacy.size) == (1, 1, 1)
