"""``tpm-faas models``, ``tpm-faas sites`` and ``tpm-faas schema``: the model versions a site
serves, and what a model and a mode accept."""

from __future__ import annotations

from pathlib import Path

import click

from tpm_faas.cli._app import echo_json
from tpm_faas.modes import MODE_NAMES


@click.group()
def models() -> None:
    """Import, list and show model versions (published Hugging Face checkpoints)."""


@models.command("add")
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.argument("model")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model root to import into (default: the first of TPM_FAAS_MODELS, else "
    "$TPM_FAAS_HOME/models).",
)
@click.option(
    "--tokenizer",
    type=click.Choice(["auto", "bytes"]),
    default="auto",
    show_default=True,
    help="auto: the checkpoint's own tokenizer.json (required); bytes: byte-level ids.",
)
@click.option("--copy", is_flag=True, help="Copy the files (default: hard links where possible).")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def models_add(
    source: Path, model: str, root: Path | None, tokenizer: str, copy: bool, as_json: bool
) -> None:
    """Import the checkpoint directory SOURCE as model version MODEL (name@version).

    The architecture must be one the runtime serves; weights are served as they are (bf16,
    fp16, fp32). Versions are immutable: an existing one is never replaced.
    """
    from tpm_faas.catalog import import_checkpoint
    from tpm_faas.config import Settings

    target = root or Settings.from_env().model_roots[0]
    card = import_checkpoint(source, model, target, tokenizer=tokenizer, copy=copy)
    if as_json:
        echo_json(card)
        return
    click.echo(f"imported {model} into {target}")
    click.echo(_card_text(model, card))


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """List the model versions in the model roots (TPM_FAAS_MODELS)."""
    from tpm_faas.catalog import summary, versions
    from tpm_faas.config import Settings

    rows = [summary(ref, d) for ref, d in versions(Settings.from_env().model_roots)]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no model versions (import one with `tpm-faas models add DIR NAME@VERSION`)")
        return
    head = ("MODEL", "ARCH", "PARAMS", "DTYPE", "CONTEXT", "TOKENIZER", "CHAT")
    table = [head] + [
        (
            r["model"],
            str(r.get("architecture", "?")),
            _params(r.get("parameters")),
            str(r.get("dtype", "?")),
            str(r.get("context_length", "?")),
            str(r.get("tokenizer", "?")),
            "yes" if r.get("chat_template") else "no",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@models.command("show")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def models_show(model: str, as_json: bool) -> None:
    """Show MODEL's card (name@version)."""
    from tpm_faas.catalog import resolve, summary
    from tpm_faas.config import Settings

    card = summary(model, resolve(model, Settings.from_env().model_roots))
    if as_json:
        echo_json(card)
        return
    click.echo(_card_text(model, card))


def _params(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _card_text(model: str, card: dict[str, object]) -> str:
    keys = (
        "architecture",
        "family",
        "parameters",
        "dtype",
        "quantization",
        "context_length",
        "layers",
        "hidden_size",
        "attention_heads",
        "kv_heads",
        "head_dim",
        "vocab_size",
        "tied_embeddings",
        "tensor_parallel",
        "tokenizer",
        "bos_token_id",
        "eos_token_ids",
        "chat_template",
        "checkpoint_sha256",
        "imported_at",
    )
    lines = [f"{model}"]
    for k in keys:
        if k in card:
            v = card[k]
            shown = f"{v:,} ({_params(v)})" if k == "parameters" and isinstance(v, int) else v
            lines.append(f"  {k:<18} {shown}")
    for kind in ("adapters", "heads"):
        extras = card.get(kind)
        if isinstance(extras, dict) and extras:
            lines.append(f"  {kind:<18} {', '.join(sorted(extras))}")
    return "\n".join(lines)


@click.command()
@click.argument("model", default="demo-tpm@1")
@click.option(
    "--prompt",
    help="Also show how the model's tokenizer splits this text: the token positions that "
    "'positions' index.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sites(model: str, prompt: str | None, as_json: bool) -> None:
    """List MODEL's canonical hook sites with their per-token shapes.

    MODEL is name@version (looked up in TPM_FAAS_MODELS) or a model directory.
    """
    import json

    from tpm_faas.catalog import resolve
    from tpm_faas.config import Settings
    from tpm_faas.sites import ModelShape, site_table

    path = Path(model)
    model_dir = (
        path
        if (path / "config.json").is_file()
        else resolve(model, Settings.from_env().model_roots)
    )
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    rows = site_table(shape)
    tokens = _tokens(model, model_dir, prompt) if prompt is not None else None
    if as_json:
        out = {"model": model, "shape": shape.__dict__, "sites": rows}
        if tokens is not None:
            out["tokens"] = tokens
        echo_json(out)
        return
    click.echo(
        f"{model}: {shape.architecture}, {shape.num_layers} layers, d_model {shape.hidden_size}, "
        f"{shape.num_heads} heads x {shape.head_dim}, vocab {shape.vocab_size}"
    )
    if shape.moe_layers:
        layers = shape.moe_layers
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        if list(layers) != list(range(layers[0], layers[-1] + 1)):
            span = ", ".join(map(str, layers))
        click.echo(
            f"  a mixture of {shape.num_experts} experts, {shape.experts_per_token} per token, "
            f"at layers {span}" + (", beside a shared expert" if shape.shared_experts else "")
        )
    width = max(len(r["site"]) for r in rows)
    for r in rows:
        click.echo(f"  {r['site']:<{width}}  {r['shape']}")
    click.echo(
        "Block sites take 'layers' (a list, {start, stop, step} or '*'); see docs/interventions.md."
    )
    if tokens is not None:
        click.echo(f"Tokens of the prompt ({len(tokens)}; 'positions' index them):")
        for t in tokens:
            click.echo(f"  {t['position']:>5}  {t['id']:>7}  {t['token']!r}")


def _tokens(model: str, model_dir: Path, prompt: str) -> list[dict[str, object]]:
    """The prompt's tokens as the gateway makes them (BOS included), with their text."""
    from tpm_faas.catalog import model_info
    from tpm_faas.tokenizer import load_tokenizer

    info = model_info(model, model_dir)
    tok = load_tokenizer(info.tokenizer, info.tokenizer_dir, vocab_size=info.vocab_size)
    return [
        {"position": i, "id": t, "token": tok.token_str(t)}
        for i, t in enumerate(tok.encode(prompt))
    ]


@click.command()
# The default is the last mode of the registry (intervene: the largest schema).
@click.argument("mode", type=click.Choice(MODE_NAMES), default=MODE_NAMES[-1])
def schema(mode: str) -> None:
    """Print the JSON Schema of MODE's requests (docs/schemas/ holds the published copies)."""
    from tpm_faas.modes import json_schema

    click.echo(json_schema(mode), nl=False)
