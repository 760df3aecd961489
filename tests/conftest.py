"""Fixtures every test package shares."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tpm_faas.config import path_with_first


@pytest.fixture(scope="session", autouse=True)
def _venv_on_path() -> None:
    # Engine workers, Parsl and Slurm jobs are launched through executables of this environment.
    os.environ["PATH"] = path_with_first(str(Path(sys.executable).parent))
