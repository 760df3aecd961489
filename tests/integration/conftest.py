"""Shared fixtures: one embedded site (real engine, real Parsl shard group) per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tpm_faas.testing.embedded import EmbeddedSite


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSite]:
    s = EmbeddedSite(tmp_path_factory.mktemp("site"), tp_size=1)
    s.start()
    try:
        yield s
    finally:
        s.stop()
