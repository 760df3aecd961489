"""Helpers of the fault suite (imported by its tests as ``faults._faults``)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PG_SERVER = os.environ.get("TPM_FAAS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
#: This run's own database (concurrent runs on one server never share one).
FAULTS_DB = f"tpm_faults_{os.getpid()}"


def wait_for(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def processes() -> dict[int, tuple[int, str, str]]:
    """``pid -> (ppid, state, args)`` of every process (``ps -ww``: whole command lines)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4:
            table[int(parts[0])] = (int(parts[1]), parts[2], parts[3])
    return table


def alive(pids: set[int] | list[int]) -> dict[int, str]:
    """The processes among ``pids`` that still exist (zombies included), with their state."""
    table = processes()
    return {p: f"{table[p][1]} {table[p][2][:120]}" for p in pids if p in table}


def pool_of(run_dir: Path) -> tuple[int, list[int]]:
    """The live worker pool process under ``run_dir`` and its children (workers, helpers)."""
    table = processes()
    pools = [
        p
        for p, (_pp, st, args) in table.items()
        if "process_worker_pool" in args
        and str(run_dir) in args
        and not st.startswith("Z")
        and not args.startswith(("bash", "/bin/bash", "/bin/sh"))
    ]
    assert len(pools) == 1, {p: table[p] for p in pools}
    return pools[0], [p for p, (pp, st, _a) in table.items() if pp == pools[0]]


def pg_url(db: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(PG_SERVER).set(database=db).render_as_string(hide_password=False)


def fresh_database(admin: Any, db: str) -> str:
    """Drop and create ``db`` (this suite's own: nobody else's connections are touched)."""
    with admin.connect() as c:
        if c.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).first():
            c.exec_driver_sql(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        c.exec_driver_sql(f'CREATE DATABASE "{db}"')
    return pg_url(db)


def assert_books_clean(ledger: Any) -> None:
    """No open hold, and ``reconcile`` finds the books right."""
    assert ledger.open_holds() == []
    report = ledger.reconcile()
    assert report.ok, report


def _pg_admin() -> Any:
    import sqlalchemy as sa

    engine = sa.create_engine(
        PG_SERVER, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    try:
        with engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
    except Exception as e:
        engine.dispose()
        pytest.skip(f"no PostgreSQL server at {PG_SERVER}: {type(e).__name__}: {e}")
    return engine


def hold_row(ledger: Any, request_id: str) -> dict[str, Any] | None:
    """The ledger's hold row of ``request_id`` (any state), or ``None``."""
    import sqlalchemy as sa

    from tpm_faas.gateway.ledger import holds

    with ledger.engine.connect() as c:
        row = c.execute(sa.select(holds).where(holds.c.request_id == request_id)).first()
    return dict(row._mapping) if row is not None else None


def cut_database(admin: Any, db: str) -> None:
    """Make ``db`` unreachable: refuse new connections and end every open one (ours only:
    the server and its other databases keep serving)."""
    with admin.connect() as c:
        c.exec_driver_sql(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
        c.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (db,),
        )


def restore_database(admin: Any, db: str) -> None:
    with admin.connect() as c:
        c.exec_driver_sql(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
