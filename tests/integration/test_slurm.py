"""Shard groups through Parsl's SlurmProvider on a real single-node Slurm cluster with
accounts enforced (``scripts/slurm-up.sh``: Debian's slurmctld/slurmd/slurmdbd on MariaDB).

``tpm-faas deploy`` renders the bring-your-own templates with a user's variables, starts a
shard group as a batch job charged to their account, serves requests, and leaves no job
behind when stopped; an unknown account is refused with Slurm's own message. The tests skip,
with the reason, only where no Slurm cluster answers (``.ci/run`` brings one up).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tpm_faas.config import Settings
from tpm_faas.errors import ShardGroupError
from tpm_faas.launcher import Allocation, ShardGroup
from tpm_faas.registry import Registry
from tpm_faas.shard_client import ShardClient
from tpm_faas.tokenizer import ByteTokenizer

pytestmark = pytest.mark.integration
ACCOUNT = "tpm-test"


def _slurm_up() -> str | None:
    if shutil.which("scontrol") is None:
        return "Slurm is not installed (scripts/slurm-up.sh installs and starts it)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    if "UP" not in ping.stdout:
        return f"no Slurm controller answers (scripts/slurm-up.sh): {ping.stdout.strip()}"
    return None


@pytest.fixture(autouse=True)
def _need_slurm() -> None:
    why = _slurm_up()
    if why:
        pytest.skip(why)


def _jobs(name_part: str = "parsl") -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %a %j"], capture_output=True, text=True)
    return [ln for ln in out.stdout.splitlines() if name_part in ln]


def _no_jobs_left(timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _jobs():
            return True
        time.sleep(0.5)
    return False


def test_deploy_serves_from_a_batch_job_on_your_account(tmp_path: Path) -> None:
    variables = {
        "account": ACCOUNT,
        "partition": "debug",
        "walltime": "00:15:00",
        "model": "demo-tpm@1",
        "dtype": "float32",
        "venv": sys.prefix,
        "state_dir": str(tmp_path / "state"),
    }
    vars_file = tmp_path / "vars.yaml"
    vars_file.write_text(yaml.safe_dump(variables))
    home = tmp_path / "home"
    env = {
        **os.environ,
        "TPM_FAAS_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tpm_faas",
            "deploy",
            "--vars",
            str(vars_file),
            "--endpoint-config",
            str(tmp_path / "endpoint.yaml"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving at" in line or "error" in line.lower():
                break
        assert any("serving at" in ln for ln in lines), "".join(lines)
        assert "account tpm-test" in "".join(lines)
        jobs = _jobs()
        assert len(jobs) == 1 and f" {ACCOUNT} " in f" {jobs[0]} ", jobs  # billed to you
        entry = Registry(home / "registry").lookup("demo-tpm@1")
        out = ShardClient(entry.address).call(
            "query", {"prompt_ids": [ByteTokenizer().encode("And God said")], "max_new_tokens": 6}
        )
        assert out["completions"][0]["completion_tokens"] == 6
        cfg = yaml.safe_load((tmp_path / "endpoint.yaml").read_text())
        assert cfg["engine"]["provider"]["account"] == ACCOUNT
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == 0, "".join(lines)
    assert _no_jobs_left(), _jobs()


def test_an_unknown_account_is_refused_with_slurms_message(tmp_path: Path) -> None:
    group = ShardGroup(
        "demo-tpm@1",
        1,
        Settings.from_env({}, home=tmp_path),
        tmp_path / "runs",
        allocation=Allocation(
            kind="byo", provider="slurm", account="no-such-account", walltime="00:05:00"
        ),
    )
    with pytest.raises(ShardGroupError) as info:
        group.start(timeout_s=120)
    msg = info.value.message
    assert "Invalid account" in msg and "no-such-account" in msg
    assert _no_jobs_left(), _jobs()
