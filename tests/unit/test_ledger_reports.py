"""`tpm-faas usage` and `tpm-faas ledger reconcile` on a real SQLite ledger."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tpm_faas.cli import main
from tpm_faas.gateway.ledger import Ledger, balances


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TPM_FAAS_HOME", str(tmp_path))
    monkeypatch.delenv("TPM_FAAS_LEDGER", raising=False)
    t = [86400.0 * 20000 + 3600]  # 2024-10-04, 01:00 UTC
    lg = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}", clock=lambda: t[0])
    lg.credit("chem", 10_000_000, reference="alloc")
    lg.credit("bio", 10_000_000, reference="alloc-bio")
    for k, (project, mode) in enumerate(
        [("chem", "query"), ("chem", "intervene"), ("chem", "query"), ("bio", "embed")]
    ):
        lg.hold(f"r{k}", project, 50_000, ttl_s=600, mode=mode)
        lg.post(f"r{k}", 10_000 * (k + 1))
        t[0] += 86400 * (k % 2)
    lg.hold("open", "chem", 1000, ttl_s=600)
    lg.void("open")
    lg.close()
    return tmp_path


def test_usage_table_csv_json_and_plot(home: Path) -> None:
    run = CliRunner().invoke
    table = run(main, ["usage"])
    assert table.exit_code == 0, table.output
    assert "chem" in table.output and "intervene" in table.output and "0.100000" in table.output
    rows = list(csv.DictReader(io.StringIO(run(main, ["usage", "--csv"]).output)))
    assert {(r["project"], r["day"], r["mode"]) for r in rows} == {
        ("chem", "2024-10-04", "query"),
        ("chem", "2024-10-04", "intervene"),
        ("chem", "2024-10-05", "query"),
        ("bio", "2024-10-05", "embed"),
    }
    data = json.loads(run(main, ["usage", "--json", "--project", "chem"]).output)
    assert sum(r["charged_micro"] for r in data) == 10_000 + 20_000 + 30_000
    png = home / "usage.png"
    assert run(main, ["usage", "--plot", str(png)]).exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reconcile_passes_then_catches_a_tampered_balance(home: Path) -> None:
    ok = CliRunner().invoke(main, ["ledger", "reconcile"])
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    eng = sa.create_engine(f"sqlite:///{home / 'ledger.sqlite'}")
    with eng.begin() as c:
        c.execute(balances.update().where(balances.c.project == "bio").values(charged=1))
    eng.dispose()
    bad = CliRunner().invoke(main, ["ledger", "reconcile"])
    assert bad.exit_code == 1 and "NOT RECONCILED" in bad.output and "bio" in bad.output
