"""Ledger throughput: hold+post pairs per second with 8 concurrent writers, SQLite and PostgreSQL.

Each writer is a separate process with its own :class:`~tpm_faas.gateway.ledger.Ledger`
(as endpoint workers are), all charging one project, so every pair contends for the same
balance row: the worst case for the ledger. Baseline in the same run: one writer alone.
Target: >= 2,000 pairs/s on SQLite with 8 writers. PostgreSQL rows need the server at
``TPM_FAAS_TEST_PG`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).

    python bench/ledger.py [--pairs 2000] [--writers 8] [--out bench/out/ledger.json]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import record, write

from tpm_faas.gateway.ledger import Ledger

PG = os.environ.get("TPM_FAAS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def writer(url: str, worker: int, pairs: int, start_at: float) -> float:
    """Wait for the common start, run ``pairs`` hold/post pairs; returns the finish time."""
    lg = Ledger(url)
    lg.balance("bench")  # connect before the clock starts
    time.sleep(max(0.0, start_at - time.time()))
    for k in range(pairs):
        rid = f"{worker}-{k}"
        lg.hold(rid, "bench", 1000, ttl_s=3600, mode="query", identity=f"user{worker}")
        lg.post(rid, 900)
    done = time.time()
    lg.close()
    return done


def measure(url: str, writers: int, pairs: int) -> dict[str, Any]:
    lg = Ledger(url)
    lg.credit("bench", 10**15, reference="bench")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(writers, mp_context=ctx) as pool:
        start_at = time.time() + 3.0  # every writer has started and connected by then
        futures = [pool.submit(writer, url, w, pairs, start_at) for w in range(writers)]
        finish = max(f.result() for f in futures)
    elapsed = finish - start_at
    report = lg.reconcile()
    bal = lg.balance("bench")
    lg.close()
    assert report.ok and bal.charged == writers * pairs * 900 and bal.held == 0, report
    return {
        "writers": writers,
        "pairs": writers * pairs,
        "seconds": elapsed,
        "pairs_per_s": writers * pairs / elapsed,
    }


def sqlite_url(tmp: str, name: str) -> str:
    return f"sqlite:///{Path(tmp) / name}"


def pg_url() -> tuple[str, Any] | None:
    try:
        admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
        name = f"tpm_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
    except Exception as e:
        print(f"PostgreSQL skipped: {type(e).__name__}: {e}")
        return None

    def drop() -> None:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()

    return str(sa.engine.make_url(PG).set(database=name)), drop


def run(writers: int, pairs: int) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tpm-ledger-bench-") as tmp:
        for n in (1, writers):
            r = measure(sqlite_url(tmp, f"w{n}.sqlite"), n, pairs)
            rows.append({"database": "SQLite (WAL)", **r})
            print(f"  SQLite, {n} writer(s): {r['pairs_per_s']:.0f} pairs/s", flush=True)
    for n in (1, writers):
        pg = pg_url()
        if pg is None:
            break
        url, drop = pg
        try:
            r = measure(url, n, pairs)
        finally:
            drop()
        rows.append({"database": "PostgreSQL 127.0.0.1", **r})
        print(f"  PostgreSQL, {n} writer(s): {r['pairs_per_s']:.0f} pairs/s", flush=True)
    return record("ledger", pairs_per_writer=pairs, rows=rows)


def table(result: dict[str, Any]) -> str:
    head = f"{'database':<22} {'writers':>7} {'pairs':>7} {'seconds':>8} {'pairs/s':>9}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['database']:<22} {r['writers']:>7} {r['pairs']:>7} {r['seconds']:>8.2f} "
            f"{r['pairs_per_s']:>9.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000, help="hold/post pairs per writer")
    p.add_argument("--writers", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("bench/out/ledger.json"))
    a = p.parse_args(argv)
    result = run(a.writers, a.pairs)
    print(table(result))
    write(result, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
