"""``tpm-faas demo``: the embedded site end to end (:mod:`tpm_faas.demo`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--tp", "tp_size", default=1, show_default=True, help="Tensor-parallel ranks.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary only.")
@click.option("--home", type=click.Path(path_type=Path), help="Keep the demo's state here.")
def demo(tp_size: int, as_json: bool, home: Path | None) -> None:
    """Bring up a local endpoint and a shard group serving the chat demo model, run each mode
    (a chat and a prompt, text and adapter embeddings, a logit lens and steering); then on a
    second group the mixture-of-experts demo model's chat, the experts each token chose and
    the chat with an expert knocked out; print the SU ledger, tear everything down (exit 1 if
    a mode failed)."""
    import logging

    from tpm_faas.demo import MODEL, MOE_MODEL, dumps, run_demo

    logging.basicConfig(level=logging.WARNING)
    if as_json:
        summary = run_demo(tp_size=tp_size, home=home, emit=lambda _s: None)
        click.echo(dumps(summary))
    else:
        click.echo(f"tpm-faas demo: {MODEL} on {tp_size} rank(s), {MOE_MODEL} on 1")
        summary = run_demo(
            tp_size=tp_size,
            home=home,
            emit=click.echo,
            progress=lambda m: click.echo(f"  .. {m}", err=True),
        )
        click.echo(
            f"\ndone in {summary['total_s']} s (start-up {summary['startup_s']} s, "
            f"{MOE_MODEL}'s sections {summary['moe']['wall_s']} s); "
            f"open holds: {summary['ledger']['open_holds']}"
        )
    raise click.exceptions.Exit(0 if summary["ok"] else 1)
