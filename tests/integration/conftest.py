"""Shared fixtures: one embedded site (real engine, real Parsl shard group) per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpm_faas.testing.embedded import EmbeddedSite


@pytest.fixture(scope="session", autouse=True)
def _venv_on_path() -> None:
    # Workers are launched through executables of this environment.
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSite]:
    s = EmbeddedSite(tmp_path_factory.mktemp("site"), tp_size=1)
    s.start()
    try:
        yield s
    finally:
        s.stop()
