"""The fault suite: real processes killed with real signals, a real PostgreSQL ledger cut off,
a real RabbitMQ restarted; after each fault the site must recover without an operator.

Shared here: one embedded site (tp=1, the real engine and Parsl shard group) whose ledger is
a PostgreSQL database of its own (``tpm_faults_<pid>``), and helpers that find the processes a
fault leaves behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from faults._faults import FAULTS_DB, _pg_admin, fresh_database
from tpm_faas.testing.embedded import EmbeddedSite


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="package")
def pg_admin() -> Iterator[Any]:
    """An autocommit engine on the server's ``test`` database (to create and cut off ours)."""
    engine = _pg_admin()
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="package")
def pg_site(tmp_path_factory: pytest.TempPathFactory, pg_admin: Any) -> Iterator[EmbeddedSite]:
    """The embedded site (tp=1) on a PostgreSQL ledger of its own database."""
    url = fresh_database(pg_admin, FAULTS_DB)
    site = EmbeddedSite(tmp_path_factory.mktemp("faults-site"), tp_size=1)
    site.settings = replace(site.settings, ledger_url=url)
    site.start()
    try:
        yield site
    finally:
        site.stop()
        with pg_admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{FAULTS_DB}" ALLOW_CONNECTIONS true')
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{FAULTS_DB}" WITH (FORCE)')
