"""``tpm-faas sites`` and ``tpm-faas schema``: what a model and a mode accept."""

from __future__ import annotations

from pathlib import Path

import click

from tpm_faas.cli._app import echo_json
from tpm_faas.modes import MODE_NAMES


@click.command()
@click.argument("model", default="demo-tpm@1")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sites(model: str, as_json: bool) -> None:
    """List MODEL's canonical hook sites with their per-token shapes.

    MODEL is name@version (looked up in TPM_FAAS_MODELS) or a model directory.
    """
    import json

    from tpm_faas.config import Settings
    from tpm_faas.runtime.model_store import resolve
    from tpm_faas.sites import ModelShape, site_table

    path = Path(model)
    model_dir = (
        path
        if (path / "config.json").is_file()
        else resolve(model, Settings.from_env().model_roots)
    )
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    rows = site_table(shape)
    if as_json:
        echo_json({"model": model, "shape": shape.__dict__, "sites": rows})
        return
    click.echo(
        f"{model}: {shape.architecture}, {shape.num_layers} layers, d_model {shape.hidden_size}, "
        f"{shape.num_heads} heads x {shape.head_dim}, vocab {shape.vocab_size}"
    )
    width = max(len(r["site"]) for r in rows)
    for r in rows:
        click.echo(f"  {r['site']:<{width}}  {r['shape']}")
    click.echo(
        "Block sites take 'layers' (a list, {start, stop, step} or '*'); see docs/interventions.md."
    )


@click.command()
# The default is the last mode of the registry (intervene: the largest schema).
@click.argument("mode", type=click.Choice(MODE_NAMES), default=MODE_NAMES[-1])
def schema(mode: str) -> None:
    """Print the JSON Schema of MODE's requests (docs/schemas/ holds the published copies)."""
    from tpm_faas.modes import json_schema

    click.echo(json_schema(mode), nl=False)
