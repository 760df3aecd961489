"""``tpm-faas usage`` and ``tpm-faas ledger``: the SU ledger's reports, checks and credits.

The ledger is ``TPM_FAAS_LEDGER`` (default: ``$TPM_FAAS_HOME/ledger.sqlite``); what is shown
is computed in :mod:`tpm_faas.gateway.reports`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tpm_faas.cli._app import echo_json

if TYPE_CHECKING:
    from tpm_faas.gateway.ledger import Ledger


def _open() -> Ledger:
    from tpm_faas.config import Settings
    from tpm_faas.gateway.ledger import Ledger

    return Ledger(Settings.from_env().ledger_url)


@click.command()
@click.option("--project", default=None, help="One project (default: all).")
@click.option("--days", default=None, type=int, help="Only the last N days.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV instead of a table.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.option(
    "--plot",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write a PNG of SU by day and mode, per project.",
)
def usage(
    project: str | None, days: int | None, as_csv: bool, as_json: bool, plot: Path | None
) -> None:
    """SU charged per project, day (UTC) and mode, from the ledger (TPM_FAAS_LEDGER)."""
    from tpm_faas.gateway import reports

    lg = _open()
    try:
        rows = reports.usage_rows(lg, project, days)
    finally:
        lg.close()
    if as_json:
        echo_json(rows)
    elif as_csv:
        click.echo(reports.usage_csv(rows), nl=False)
    else:
        click.echo(reports.usage_table(rows))
    if plot is not None:
        reports.plot_usage(rows, plot)
        click.echo(f"wrote {plot}", err=True)


@click.group()
def ledger() -> None:
    """Check the SU ledger, show balances, credit projects."""


@ledger.command("reconcile")
@click.option("--expire", is_flag=True, help="Void holds past their expiry first.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def ledger_reconcile(expire: bool, as_json: bool) -> None:
    """Check that no hold is open past its expiry, every balance equals the sum of its
    transfers, and every posted charge matches its request's hold (exit 1 if not)."""
    from tpm_faas.gateway import reports

    lg = _open()
    try:
        voided = lg.expire_holds() if expire else None
        r = lg.reconcile()
    finally:
        lg.close()
    if as_json:
        echo_json(reports.reconcile_record(r, voided_expired=voided))
    else:
        if voided is not None:
            click.echo(f"voided {voided} expired holds")
        click.echo(reports.reconcile_text(r))
    raise click.exceptions.Exit(0 if r.ok else 1)


@ledger.command("credit")
@click.argument("project")
@click.argument("su")
@click.option("--note", default="", help="Why (kept on the transfer, at most 512 characters).")
@click.option("--json", "as_json", is_flag=True, help="Print the transfer as JSON.")
def ledger_credit(project: str, su: str, note: str, as_json: bool) -> None:
    """Add SU to PROJECT's allocation (creating the project): one new ledger transfer with
    its own id. SU may have up to 6 decimals (the ledger counts micro-SU)."""
    import pwd

    from tpm_faas.gateway import reports

    amount = reports.parse_su(su)
    try:
        who = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        who = str(os.getuid())
    lg = _open()
    try:
        c = reports.credit(lg, project, amount, note=note, identity=f"posix:{who}")
    finally:
        lg.close()
    if as_json:
        echo_json(c.record())
        return
    b = c.balance
    click.echo(
        f"credited {amount / 1e6:.6f} SU to {project} (transfer {c.transfer_id}); "
        f"allocation {b.credited / 1e6:.6f}, available {b.available / 1e6:.6f} SU"
    )


@ledger.command("balance")
@click.argument("project", required=False)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def ledger_balance(project: str | None, as_json: bool) -> None:
    """Allocation, held, posted and available SU per project (or PROJECT's)."""
    from tpm_faas.gateway import reports

    lg = _open()
    try:
        rows = reports.balances(lg, project)
    finally:
        lg.close()
    if as_json:
        echo_json([reports.balance_record(b) for b in rows])
    else:
        click.echo(reports.balance_table(rows))
