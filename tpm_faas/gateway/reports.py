"""What a site admin reads from the SU ledger: usage tables, balances, reconciliation, credits.

The ledger (:mod:`tpm_faas.gateway.ledger`) keeps integer micro-SU; this module turns its
records into rows, tables and JSON for ``tpm-faas usage`` and ``tpm-faas ledger ...``. Floats
appear only here, for display; amounts an admin types (``ledger credit PROJECT 12.5``) are
parsed exactly (:func:`parse_su`).
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tpm_faas.errors import LedgerError, RequestError
from tpm_faas.gateway.ledger import Balance, Ledger, Reconciliation, to_su, transfer_id

USAGE_FIELDS = ["project", "day", "mode", "requests", "charged_micro", "su"]


def parse_su(text: str) -> int:
    """``"12.5"`` SU as integer micro-SU (exactly; at most 6 decimals, positive)."""
    try:
        su = Decimal(text.strip())
    except InvalidOperation:
        raise RequestError(f"{text!r} is not a number of SU") from None
    micro = su * 1_000_000
    if not su.is_finite() or micro != micro.to_integral_value():
        raise RequestError(f"{text!r}: SU are counted in millionths (at most 6 decimals)")
    if micro <= 0:
        raise RequestError(f"{text!r}: a credit must be positive")
    return int(micro)


# -- usage -----------------------------------------------------------------------------------
def usage_rows(
    ledger: Ledger, project: str | None = None, days: int | None = None, now: float | None = None
) -> list[dict[str, Any]]:
    """Posted charges per project, UTC day and mode (``days``: only the last N), with SU."""
    since = (time.time() if now is None else now) - days * 86400 if days else 0.0
    return [{**r, "su": to_su(r["charged_micro"])} for r in ledger.usage(project, since)]


def usage_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table with a total line."""
    lines = [f"{'project':<20} {'day':<10} {'mode':<10} {'requests':>9} {'SU':>14}"]
    for r in rows:
        lines.append(
            f"{r['project']:<20} {r['day']:<10} {r['mode']:<10} {r['requests']:>9} {r['su']:>14.6f}"
        )
    total = sum(r["charged_micro"] for r in rows)
    lines.append(
        f"{'total':<20} {'':<10} {'':<10} {sum(r['requests'] for r in rows):>9} "
        f"{to_su(total):>14.6f}"
    )
    return "\n".join(lines)


def usage_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=USAGE_FIELDS)
    w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def plot_usage(rows: list[dict[str, Any]], out: Path) -> None:
    """A PNG of SU by day and mode, one panel per project (needs the ``plot`` extra)."""
    from tpm_faas.errors import ConfigError

    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'tpm-faas[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    projects = sorted({str(r["project"]) for r in rows}) or ["(no usage)"]
    fig, axes = plt.subplots(len(projects), 1, figsize=(8, 2.6 * len(projects)), squeeze=False)
    for ax, proj in zip(axes[:, 0], projects, strict=True):
        mine = [r for r in rows if r["project"] == proj]
        days = sorted({str(r["day"]) for r in mine})
        bottom = [0.0] * len(days)
        for mode in sorted({str(r["mode"]) for r in mine}):
            su = [
                sum(float(r["su"]) for r in mine if r["day"] == d and r["mode"] == mode)
                for d in days
            ]
            ax.bar(days, su, bottom=bottom, label=mode)
            bottom = [b + s for b, s in zip(bottom, su, strict=True)]
        ax.set_title(f"project {proj}")
        ax.set_ylabel("SU")
        if mine:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# -- balances --------------------------------------------------------------------------------
def balance_record(b: Balance) -> dict[str, Any]:
    """A balance as JSON: micro-SU integers (exact) and SU (display)."""
    return {
        "project": b.project,
        "allocation_micro": b.credited,
        "held_micro": b.held,
        "posted_micro": b.charged,
        "available_micro": b.available,
        "allocation_su": to_su(b.credited),
        "held_su": to_su(b.held),
        "posted_su": to_su(b.charged),
        "available_su": to_su(b.available),
    }


def balances(ledger: Ledger, project: str | None = None) -> list[Balance]:
    """Every project's balance, or ``project``'s (:class:`LedgerError` if it has none)."""
    found = ledger.balances(project)
    if project is not None and not found:
        known = ", ".join(ledger.projects()) or "none yet"
        raise LedgerError(f"the ledger has no project {project!r} (projects: {known})")
    return found


def balance_table(rows: list[Balance]) -> str:
    head = f"{'project':<20} {'allocation':>16} {'held':>14} {'posted':>16} {'available':>16}"
    lines = [head]
    for b in rows:
        lines.append(
            f"{b.project:<20} {to_su(b.credited):>16.6f} {to_su(b.held):>14.6f} "
            f"{to_su(b.charged):>16.6f} {to_su(b.available):>16.6f}"
        )
    return "\n".join(lines)


# -- credits ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credit:
    """A credit made by :func:`credit`: its transfer id and the balance after it."""

    transfer_id: str
    project: str
    amount_micro: int
    note: str
    balance: Balance

    def record(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "project": self.project,
            "amount_micro": self.amount_micro,
            "amount_su": to_su(self.amount_micro),
            "note": self.note,
            "balance": balance_record(self.balance),
        }


def credit(
    ledger: Ledger, project: str, amount_micro: int, *, note: str = "", identity: str = ""
) -> Credit:
    """Add ``amount_micro`` to ``project``'s allocation as one new transfer (a fresh id)."""
    reference = f"credit:{uuid.uuid4()}"
    ledger.credit(project, amount_micro, reference=reference, note=note, identity=identity)
    return Credit(
        transfer_id(reference, "credit"), project, amount_micro, note, ledger.balance(project)
    )


# -- reconciliation --------------------------------------------------------------------------
def reconcile_record(r: Reconciliation, *, voided_expired: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": r.ok,
        "projects": r.projects,
        "transfers": r.transfers,
        "expired_open_holds": r.expired_open_holds,
        "balance_mismatches": r.balance_mismatches,
        "charge_mismatches": r.charge_mismatches,
    }
    if voided_expired is not None:
        out["voided_expired_holds"] = voided_expired
    return out


def reconcile_text(r: Reconciliation, *, show: int = 20) -> str:
    lines = [f"{r.projects} projects, {r.transfers} transfers"]
    for name, items in (
        ("open holds past their expiry", r.expired_open_holds),
        ("balances that differ from their transfers", r.balance_mismatches),
        ("requests whose transfers differ from their hold", r.charge_mismatches),
    ):
        lines.append(f"  {name}: {len(items)}")
        lines += [f"    {item}" for item in items[:show]]
    lines.append("OK" if r.ok else "NOT RECONCILED")
    return "\n".join(lines)
