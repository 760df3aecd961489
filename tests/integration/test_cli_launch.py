"""``tpm-faas launch --json`` in a fresh process: progress on stderr while the job is queued,
while ranks start and load weights, then one JSON line (address, job ids, ranks) on stdout;
SIGINT stops the group and the command exits 0."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpm_faas.shard_client import ShardClient

pytestmark = pytest.mark.integration


def test_launch_json_reports_progress_and_serves(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "tpm-faas"
    env = {**os.environ, "TPM_FAAS_HOME": str(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    p = subprocess.Popen(
        [str(exe), "launch", "demo-tpm@1", "--json", "--start-timeout", "240"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 240
        line = ""
        while not line and time.monotonic() < deadline and p.poll() is None:
            if sel.select(timeout=1.0):
                line = p.stdout.readline()
        assert line, f"no JSON line; exit {p.poll()}"
        record = json.loads(line)
        assert record["model"] == "demo-tpm@1" and record["tp"] == 1
        assert record["address"] and record["job_ids"]
        assert [r["rank"] for r in record["ranks"]] == [0]
        ShardClient(record["address"]).ping(timeout_s=10)
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    assert "queued: job" in err or "running" in err, err
    assert "loading weights" in err and "is serving at" in err, err
    assert "demo-tpm@1 stopped" in err
