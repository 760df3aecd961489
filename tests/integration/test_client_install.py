"""`pip install tpm-faas` in a fresh environment is the client, and nothing heavier.

A new virtual environment, the project installed from its source WITHOUT extras, its
dependencies resolved from the package registry (with the project's constraints file), then:
``TPMClient`` and the Globus Compute SDK transport import and build, and none of the heavy
distributions is installed. Skips, with the reason, where the registry cannot be reached.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpm_faas._extras import HEAVY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Runs in the new environment: import the client and build the SDK transport's pieces.
PROBE = """
import json, sys
from tpm_faas import TPMClient
from tpm_faas.compute.sdk import ExecutorTransport, Manifest, compute_client
from globus_compute_sdk.serialize import JSONData
from tpm_faas._extras import require
from tpm_faas.errors import MissingExtra

try:
    require("torch", "runtime")
    missing = None
except MissingExtra as e:
    missing = str(e)
heavy = sorted(m for m in ("torch", "deepspeed", "parsl", "zmq", "sqlalchemy",
               "transformers", "globus_compute_endpoint") if m in sys.modules)
print(json.dumps({"client": TPMClient.__name__, "transport": ExecutorTransport.__name__,
                  "missing": missing, "heavy_loaded": heavy}))
"""


def _registry_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


def test_client_only_install(tmp_path: Path) -> None:
    if not _registry_reachable():
        pytest.skip("the package registry (pypi.org) cannot be reached")
    t0 = time.monotonic()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "tpm_faas", src / "tpm_faas", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "-c", str(src / "constraints.txt"), str(src)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    installed = subprocess.run(
        [py, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    )
    names = {d["name"].lower().replace("_", "-") for d in json.loads(installed.stdout)}
    assert "tpm-faas" in names
    assert not names & HEAVY, f"a plain install brought {sorted(names & HEAVY)}"
    probe = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["client"] == "TPMClient" and seen["transport"] == "ExecutorTransport"
    assert seen["heavy_loaded"] == []
    assert seen["missing"] and "pip install 'tpm-faas[runtime]'" in seen["missing"]
    print(f"client-only install: {len(names)} distributions in {time.monotonic() - t0:.0f} s")
