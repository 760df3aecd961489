"""``tpm-faas ledger credit`` and ``ledger balance`` on SQLite and on the PostgreSQL server on
loopback: credits are transfers with their own ids, balances add up, reconcile stays OK."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.gateway.ledger import Ledger, transfers

pytestmark = pytest.mark.integration

PG = os.environ.get("TPM_FAAS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.setenv("TPM_FAAS_HOME", str(tmp_path))
    if request.param == "sqlite":
        u = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        monkeypatch.setenv("TPM_FAAS_LEDGER", u)
        yield u
        return
    try:
        admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql("SELECT 1")
    except Exception as e:
        pytest.skip(f"no PostgreSQL server at {PG}: {type(e).__name__}: {e}")
    name = f"tpm_cli_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    u = str(sa.engine.make_url(PG).set(database=name).render_as_string(hide_password=False))
    monkeypatch.setenv("TPM_FAAS_LEDGER", u)
    try:
        yield u
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def test_credit_then_balance(url: str) -> None:
    run = CliRunner().invoke
    first = run(main, ["ledger", "credit", "chem", "12.5", "--note", "2026 allocation", "--json"])
    assert first.exit_code == 0, first.output
    c1 = json.loads(first.output)
    assert c1["amount_micro"] == 12_500_000 and c1["balance"]["available_micro"] == 12_500_000
    again = run(main, ["ledger", "credit", "chem", "0.000001"])
    assert again.exit_code == 0 and "credited 0.000001 SU to chem" in again.output
    assert run(main, ["ledger", "credit", "bio", "3"]).exit_code == 0

    lg = Ledger(url)
    lg.hold("r1", "chem", 2_000_000, ttl_s=600, mode="query")
    lg.hold("r2", "chem", 1_000_000, ttl_s=600, mode="query")
    lg.post("r2", 400_000)
    credits = lg.credits("chem")
    lg.close()
    assert credits[0]["id"] == c1["transfer_id"]
    assert len({c["id"] for c in credits}) == 2  # each credit its own transfer
    assert credits[0]["note"] == "2026 allocation" and credits[0]["identity"].startswith("posix:")

    table = run(main, ["ledger", "balance"])
    assert table.exit_code == 0, table.output
    assert [ln.split()[0] for ln in table.output.splitlines()] == ["project", "bio", "chem"]
    got = json.loads(run(main, ["ledger", "balance", "chem", "--json"]).output)
    assert got == [
        {
            "project": "chem",
            "allocation_micro": 12_500_001,
            "held_micro": 2_000_000,
            "posted_micro": 400_000,
            "available_micro": 12_500_001 - 2_000_000 - 400_000,
            "allocation_su": 12.500001,
            "held_su": 2.0,
            "posted_su": 0.4,
            "available_su": 10.100001,
        }
    ]
    ok = run(main, ["ledger", "reconcile", "--json"])
    assert ok.exit_code == 0, ok.output
    rec = json.loads(ok.output)
    assert rec["ok"] and rec["projects"] == 2 and rec["transfers"] == 3 + 1 + 3


def test_bad_credits_and_unknown_projects(url: str) -> None:
    run = CliRunner().invoke
    for amount, why in (("-1", "positive"), ("0", "positive"), ("1e-7", "6 decimals"), ("x", "")):
        r = run(main, ["ledger", "credit", "chem", "--", amount])
        assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, r.output
    none = run(main, ["ledger", "balance", "nope"])
    assert none.exit_code == 5 and "no project 'nope'" in none.output
    engine = sa.create_engine(url)
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(transfers)).scalar() == 0
    engine.dispose()
