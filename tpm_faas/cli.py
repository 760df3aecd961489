"""The ``tpm-faas`` command line. Heavy modules are imported inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tpm_faas.errors import TPMError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except TPMError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="tpm-faas")
def main() -> None:
    """Serve a large frozen model in three modes (query, embed, intervene) through Globus
    Compute."""


@main.command()
@click.option("--tp", "tp_size", default=1, show_default=True, help="Tensor-parallel ranks.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary only.")
@click.option("--home", type=click.Path(path_type=Path), help="Keep the demo's state here.")
def demo(tp_size: int, as_json: bool, home: Path | None) -> None:
    """Bring up a local endpoint and a shard group, run each mode once, print the SU ledger,
    tear everything down."""
    import logging

    from tpm_faas.demo import dumps, run_demo

    logging.basicConfig(level=logging.WARNING)
    if as_json:
        summary = run_demo(tp_size=tp_size, home=home, emit=lambda _s: None)
        click.echo(dumps(summary))
    else:
        click.echo(f"tpm-faas demo: demo-tpm@1 on {tp_size} rank(s)")
        summary = run_demo(
            tp_size=tp_size,
            home=home,
            emit=click.echo,
            progress=lambda m: click.echo(f"  .. {m}", err=True),
        )
        click.echo(
            f"\ndone in {summary['total_s']} s (start-up {summary['startup_s']} s); "
            f"open holds: {summary['ledger']['open_holds']}"
        )
    sys.exit(0 if summary["ok"] else 1)


@main.command()
@click.argument("model", default="demo-tpm@1")
@click.option("--tp", "tp_size", default=1, show_default=True, help="Tensor-parallel ranks.")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True
)
@click.option(
    "--max-batch", default=8, show_default=True, help="Sequences decoded together at most."
)
@click.option(
    "--max-wait-ms",
    default=0.0,
    show_default=True,
    help="How long an idle group waits for more requests to batch with.",
)
def launch(model: str, tp_size: int, dtype: str, max_batch: int, max_wait_ms: float) -> None:
    """Start a shard group for MODEL and keep it serving until interrupted."""
    import signal

    from tpm_faas.config import Settings
    from tpm_faas.launcher import ShardGroup

    settings = Settings.from_env()
    group = ShardGroup(
        model,
        tp_size,
        settings,
        settings.home / "runs" / "launch",
        dtype=dtype,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    entry = group.start(progress=lambda m: click.echo(f".. {m}", err=True))
    click.echo(f"{model} serving at {entry.address} (tp={tp_size}); Ctrl-C stops it")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        group.stop()
