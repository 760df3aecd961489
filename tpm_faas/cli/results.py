"""``tpm-faas results``: by-reference results in ``$TPM_FAAS_HOME/results``."""

from __future__ import annotations

from typing import Any

import click

from tpm_faas.cli._app import echo_json

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def _duration(_ctx: Any, _param: Any, value: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` (or a bare number of days) as seconds."""
    text = value.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit is not None else text
    try:
        amount = float(number)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration such as 7d, 12h or 30m") from None
    if not amount >= 0 or amount == float("inf"):
        raise click.BadParameter(f"{value!r} must be a finite, non-negative duration")
    return amount * (unit or _UNITS["d"])


@click.group()
def results() -> None:
    """Results that came back by reference (safetensors files in the results directory)."""


@results.command("prune")
@click.option(
    "--older-than",
    "older_than",
    default="7d",
    show_default=True,
    callback=_duration,
    help="Delete results last written longer ago than this (7d, 12h, 30m; at least 10m).",
)
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) deleted.")
def results_prune(older_than: float, dry_run: bool, as_json: bool) -> None:
    """Delete old by-reference results ($TPM_FAAS_HOME/results); run it from cron.

    A pruned result can no longer be fetched or used by reference in a later request
    (those requests get unknown_result)."""
    import time

    from tpm_faas.config import Settings
    from tpm_faas.gateway.results import prune

    where = Settings.from_env().results_dir
    try:
        p = prune(where, older_than, now=time.time(), dry_run=dry_run)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from None
    if as_json:
        echo_json(
            {
                "directory": str(where),
                "dry_run": dry_run,
                "older_than_s": older_than,
                "files": p.files,
                "bytes": p.bytes,
                "kept": p.kept,
                "skipped": p.skipped,
            }
        )
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{where}: {verb} {p.files} files ({p.bytes / 1e6:.1f} MB); kept {p.kept}")
    if p.skipped:
        click.echo(
            f"  {p.skipped} old files belong to other accounts and were not deleted; run this "
            "as root or as the directory's owner"
        )
