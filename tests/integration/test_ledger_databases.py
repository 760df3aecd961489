"""The SU ledger on real databases: SQLite (WAL) and the PostgreSQL server on loopback.

Eight processes hold and post concurrently; the totals must be exact (0 lost, 0 double), the
balance guard must never let a project overdraw, replays must change nothing, and expired
holds must be voided. The PostgreSQL cases skip, with the reason, only where no server answers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tpm_faas.errors import DuplicateRequest, InsufficientFunds, RateLimited
from tpm_faas.gateway.ledger import Ledger

pytestmark = pytest.mark.integration

PG = os.environ.get("TPM_FAAS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
WORKERS, PAIRS = 8, 1000


def _pg_database() -> Iterator[str]:
    """A fresh database on the server at ``PG``, dropped afterwards."""
    try:
        admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql("SELECT 1")
    except Exception as e:  # no driver or no server: say so
        pytest.skip(f"no PostgreSQL server at {PG}: {type(e).__name__}: {e}")
    name = f"tpm_ledger_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield str(sa.engine.make_url(PG).set(database=name))
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    else:
        yield from _pg_database()


def _hold(k: int) -> int:
    return 100 + k % 7


def _actual(k: int) -> int:
    return 100 + k % 7 - k % 5


def _pairs(url: str, worker: int, n: int) -> tuple[int, int]:
    """``n`` hold/post pairs; every 100th request is retried and must be refused."""
    lg = Ledger(url)
    charged = refused = 0
    for k in range(n):
        rid = f"w{worker}-{k}"
        lg.hold(rid, "p", _hold(k), ttl_s=3600, mode="query", identity=f"user{worker}")
        charged += lg.post(rid, _actual(k))
        if k % 100 == 0:  # a retried post, then a retried hold
            try:
                lg.post(rid, _actual(k))
            except DuplicateRequest:
                refused += 1
            try:
                lg.hold(rid, "p", 1, ttl_s=3600)
            except DuplicateRequest:
                refused += 1
    lg.close()
    return charged, refused


def _greedy(url: str, worker: int, n: int) -> int:
    lg = Ledger(url)
    won = 0
    for k in range(n):
        try:
            lg.hold(f"g{worker}-{k}", "tight", 100, ttl_s=3600)
            won += 1
        except InsufficientFunds:
            pass
    lg.close()
    return won


def _busy(url: str, worker: int, n: int, start: Any) -> int:
    """One identity's requests, each worker charging its own project, none finishing."""
    lg = Ledger(url)
    lg.balance(f"proj{worker}")  # connected before the race starts
    start.wait(timeout=60)  # a worker that failed early breaks the barrier, never hangs it
    won = 0
    for k in range(n):
        try:
            lg.hold(f"c{worker}-{k}", f"proj{worker}", 10, ttl_s=3600, identity="u", max_open=3)
            won += 1
        except RateLimited:
            pass
    lg.close()
    return won


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"))


def test_concurrent_holds_and_posts_are_exact(url: str) -> None:
    lg = Ledger(url)
    lg.credit("p", 10**12, reference="allocation-2026")
    with _pool() as pool:
        results = list(pool.map(_pairs, [url] * WORKERS, range(WORKERS), [PAIRS] * WORKERS))
    want = WORKERS * sum(_actual(k) for k in range(PAIRS))
    assert sum(c for c, _ in results) == want
    assert all(r == 2 * (PAIRS // 100) for _, r in results)  # every retry refused
    bal = lg.balance("p")
    assert (bal.charged, bal.held, bal.credited) == (want, 0, 10**12)
    assert len(lg.charges("p")) == WORKERS * PAIRS and lg.open_holds() == []
    report = lg.reconcile()
    assert report.ok, report
    assert report.transfers == 1 + 3 * WORKERS * PAIRS
    lg.close()


def test_the_balance_guard_never_lets_a_project_overdraw(url: str) -> None:
    lg = Ledger(url)
    lg.credit("tight", 50 * 100, reference="small")
    with _pool() as pool:
        won = sum(pool.map(_greedy, [url] * WORKERS, range(WORKERS), [20] * WORKERS))
    assert won == 50
    bal = lg.balance("tight")
    assert bal.held == 5000 and bal.available == 0
    assert lg.reconcile().ok
    lg.close()


def test_concurrency_limit_holds_across_projects(url: str) -> None:
    """``max_open`` counts an identity's open holds whichever projects they charge: eight
    processes racing on eight different project rows get exactly three holds between them."""
    lg = Ledger(url)
    for w in range(WORKERS):
        lg.credit(f"proj{w}", 10**6, reference=f"seed-{w}")
    with multiprocessing.Manager() as manager, _pool() as pool:
        start = manager.Barrier(WORKERS)
        n = WORKERS
        won = sum(pool.map(_busy, [url] * n, range(n), [10] * n, [start] * n))
    assert won == 3 and len(lg.open_holds()) == 3
    assert lg.reconcile().ok
    lg.close()


def test_replaying_the_same_events_changes_nothing(url: str) -> None:
    lg = Ledger(url)

    def events() -> None:
        lg.credit("r", 10_000, reference="seed-r")
        for k in range(20):
            rid = f"replay-{k}"
            with contextlib.suppress(DuplicateRequest):
                lg.hold(rid, "r", 300, ttl_s=3600)
            try:
                if k % 3 == 0:
                    lg.void(rid)
                else:
                    lg.post(rid, 100 + k)
            except DuplicateRequest:
                pass

    events()
    first = lg.balance("r")
    for _ in range(3):
        events()
        assert lg.balance("r") == first
    assert first.held == 0 and first.charged == sum(100 + k for k in range(20) if k % 3)
    assert lg.reconcile().ok
    lg.close()


def test_expired_holds_are_voided(url: str) -> None:
    now = [1_000_000.0]
    lg = Ledger(url, clock=lambda: now[0])
    lg.credit("e", 1000, reference="seed-e")
    lg.hold("stale", "e", 900, ttl_s=60)
    with pytest.raises(InsufficientFunds):
        lg.hold("fresh", "e", 900, ttl_s=60)
    now[0] += 61
    assert lg.reconcile().expired_open_holds == ["stale"]
    lg.hold("fresh", "e", 900, ttl_s=60)  # the stale hold is voided to make room
    assert lg.open_holds("e")[0]["request_id"] == "fresh"
    with pytest.raises(DuplicateRequest):
        lg.post("stale", 10)
    now[0] += 61
    assert lg.expire_holds() == 1 and lg.balance("e").held == 0
    assert lg.reconcile().ok
    lg.close()


def test_usage_days_are_utc_days(url: str) -> None:
    """A charge posted in the afternoon (UTC) counts on that day on every database."""
    now = [86400.0 * 20000 + 13 * 3600]  # 13:00 UTC
    lg = Ledger(url, clock=lambda: now[0])
    lg.credit("u", 1000, reference="seed-u")
    lg.hold("afternoon", "u", 10, ttl_s=60, mode="query")
    lg.post("afternoon", 10)
    assert [r["day"] for r in lg.usage("u")] == ["2024-10-04"]
    lg.close()
