"""`tpm-faas demo --json` (what `make demo` runs) end to end, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tp", [1, 2])
def test_demo_json(tp: int, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "tpm-faas"
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(exe), "demo", "--json", "--tp", str(tp), "--home", str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["tp_size"] == tp
    assert set(summary["modes"]) >= {"query", "embed", "intervene"}
    for mode in summary["modes"].values():
        assert mode["ok"] and mode["su"] > 0
    assert summary["ledger"]["open_holds"] == 0
    assert summary["ledger"]["charges"] == len(summary["modes"]) + 1  # + the steering source read
    assert not any(p.is_file() for p in (tmp_path / "home" / "registry").glob("*.json"))
    # No rank, worker pool or interchange outlives the demo.
    ps = subprocess.run(["ps", "-ww", "-eo", "stat,args"], capture_output=True, text=True).stdout
    alive = [
        ln for ln in ps.splitlines() if str(tmp_path) in ln and not ln.lstrip().startswith("Z")
    ]
    assert alive == []
