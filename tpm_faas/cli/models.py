"""``tpm-faas models``, ``tpm-faas sites`` and ``tpm-faas schema``: the model versions a site
serves, and what a model and a mode accept.

``models commit/log/diff/verify/export/gc`` work on the version store
(:mod:`tpm_faas.versions.store`): ``--store DIR``, else ``TPM_FAAS_VERSION_STORE``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tpm_faas.cli._app import echo_json
from tpm_faas.errors import ConfigError, LedgerError, TPMError, VersionError
from tpm_faas.modes import MODE_NAMES

if TYPE_CHECKING:
    from tpm_faas.config import Settings


@click.group()
def models() -> None:
    """Import, list and show model versions (published Hugging Face checkpoints); commit
    them to the version store, and log, diff, verify, export and collect its versions."""


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


# --- the version store ---------------------------------------------------------------------

# The same variable Settings.version_store reads; click reads it when the command runs.
_STORE_ENV = "TPM_FAAS_VERSION_STORE"

_store_option = click.option(
    "--store",
    "store_dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=_STORE_ENV,
    show_envvar=True,
    help="The version store directory.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
_workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Threads that decode tensors (default: the CPUs, at most 8).",
)


def _store(store_dir: Path | None) -> Path:
    """The version store: ``--store``, else ``TPM_FAAS_VERSION_STORE``."""
    if store_dir is None:
        raise ConfigError(f"no version store: pass --store DIR or set {_STORE_ENV}")
    return store_dir


def _size(n: int) -> str:
    """Bytes for people (decimal units)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    table = [head, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@models.command("commit")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--parent", metavar="NAME@PREV", help="Encode the changed tensors against it.")
@click.option(
    "--keyframe-every",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="No reconstruction chain longer than this many versions.",
)
@_store_option
@_json_option
def models_commit(
    source: Path,
    ref: str,
    parent: str | None,
    keyframe_every: int,
    store_dir: Path | None,
    as_json: bool,
) -> None:
    """Store the checkpoint directory SOURCE as NAME@VERSION in the version store.

    Unchanged tensors cost nothing; a changed one is stored in the smallest lossless encoding
    (a delta against --parent where that helps). Versions are immutable.
    """
    from tpm_faas.versions import store

    root = _store(store_dir)
    man = store.commit(source, root, ref, parent=parent, keyframe_every=keyframe_every)
    st = store.stats(root, man.ref)
    if as_json:
        echo_json(st.to_json())
        return
    click.echo(f"committed {st.ref}" + (f" (parent {st.parent})" if st.parent else ""))
    if st.parent is None or st.changed is None:
        click.echo(f"  tensors     {st.tensors}, every one stored")
    else:
        click.echo(f"  tensors     {st.tensors}: {st.changed} changed, {st.unchanged} unchanged")
    click.echo(
        f"  stored      {_size(st.stored_bytes)} of {_size(st.full_bytes)} "
        f"({st.share:.1%} of a full copy)"
    )
    used = ", ".join(f"{k} {v}" for k, v in st.encodings.items()) or "none"
    click.echo(f"  encodings   {used}")
    click.echo(f"  chain       {_chain_text(st.chain)}")
    click.echo(f"  manifest    sha256 {st.manifest_sha256}")


def _chain_text(chain: int) -> str:
    return "keyframe" if chain == 0 else f"{chain} delta{'s' if chain > 1 else ''} deep"


@models.command("log")
@click.argument("name")
@_store_option
@_json_option
def models_log(name: str, store_dir: Path | None, as_json: bool) -> None:
    """List the versions of NAME in the version store, oldest first."""
    from tpm_faas.versions import store

    entries = store.log(_store(store_dir), name)
    if as_json:
        echo_json(
            [
                {
                    "version": e.version,
                    "parent": e.parent,
                    "created": e.created,
                    "stored_bytes": e.stored_bytes,
                    "full_bytes": e.full_bytes,
                    "share": e.share,
                    "chain": e.chain,
                    "manifest_sha256": e.manifest_sha256,
                }
                for e in entries
            ]
        )
        return
    if not entries:
        click.echo(f"no versions of {name} in the store")
        return
    rows = [
        (
            e.version,
            e.parent or "-",
            e.created,
            _size(e.stored_bytes),
            f"{e.share:.1%}",
            _chain_text(e.chain),
            e.manifest_sha256[:12],
        )
        for e in entries
    ]
    _table(("VERSION", "PARENT", "COMMITTED", "STORED", "SHARE", "CHAIN", "MANIFEST"), rows)


def _abs(d: float | None) -> str:
    if d is None:
        return "-"
    return str(d) if not math.isfinite(d) else f"{d:.4g}"


@models.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@_store_option
@_workers_option
@_json_option
def models_diff(a: str, b: str, store_dir: Path | None, workers: int | None, as_json: bool) -> None:
    """Which tensors and files changed from version A to version B, and by how much."""
    from tpm_faas.versions import store

    d = store.diff(_store(store_dir), a, b, workers=workers)
    if as_json:
        echo_json(d.to_json())
        return
    changed = d.changed
    if changed:
        rows = [
            (
                t.name,
                t.status,
                f"{t.changed_share:.1%}",
                _abs(t.max_abs_diff),
                t.encoding or "-",
                _size(t.stored_bytes),
            )
            for t in changed
        ]
        _table(("TENSOR", "STATUS", "CHANGED", "MAX |Δ|", "ENCODING", "STORED"), rows)
    stored = sum(t.stored_bytes for t in changed)
    click.echo(
        f"{d.a} -> {d.b}: {len(changed)} of {len(d.tensors)} tensors changed "
        f"({_size(stored)} stored for them)"
    )
    for what, files in (
        ("added", d.files_added),
        ("removed", d.files_removed),
        ("changed", d.files_changed),
    ):
        if files:
            click.echo(f"files {what}: {', '.join(files)}")


@models.command("verify")
@click.argument("ref", metavar="NAME@VERSION")
@_store_option
@_workers_option
@_json_option
def models_verify(ref: str, store_dir: Path | None, workers: int | None, as_json: bool) -> None:
    """Rebuild every tensor and file of NAME@VERSION and check every hash."""
    from tpm_faas.versions import store

    problems = store.verify(_store(store_dir), ref, workers=workers)
    if as_json:
        echo_json({"ref": ref, "ok": not problems, "problems": problems})
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VersionError(f"{ref} does not verify: {problems[0]}{more}")
    if not as_json:
        click.echo(f"ok {ref}: every object, tensor and file matches its sha256")


@models.command("export")
@click.argument("ref", metavar="NAME@VERSION")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@_store_option
@_workers_option
def models_export(ref: str, dest: Path, store_dir: Path | None, workers: int | None) -> None:
    """Rebuild NAME@VERSION as a plain Hugging Face directory DEST (new or empty),
    bit-identical to what was committed."""
    from tpm_faas.versions import store

    man = store.export(_store(store_dir), ref, dest, workers=workers)
    click.echo(
        f"exported {man.ref} to {dest} ({len(man.files)} files, {_size(man.full_bytes)}, "
        "every file checked)"
    )


@models.command("gc")
@_store_option
@click.option(
    "--keep-last",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Keep this many newest versions of every name.",
)
@click.option("--dry-run", is_flag=True, help="Remove nothing; say what would go.")
@click.option(
    "--no-ledger",
    is_flag=True,
    help="Go on without the ledger's charges (versions charged for may then be removed).",
)
@_json_option
def models_gc(
    store_dir: Path | None, keep_last: int, dry_run: bool, no_ledger: bool, as_json: bool
) -> None:
    """Remove the versions no one needs, and the objects only they used.

    Kept: versions a charge in the ledger names (posted, or held by a request in flight),
    versions the site policy names (a group's models, the SU rates table), versions shard
    groups serve, the newest --keep-last of every name, and the delta bases of every kept
    version.
    """
    from tpm_faas.config import Settings
    from tpm_faas.versions import store

    root = _store(store_dir)
    settings = Settings.from_env()
    keep: dict[str, list[str]] = {}
    if not no_ledger:
        for ref in _charged(settings):
            keep.setdefault(ref, []).append("charged in the ledger")
    for ref in _pinned(settings):
        keep.setdefault(ref, []).append("pinned by the site policy")
    for ref in _served(settings):
        keep.setdefault(ref, []).append("served by a shard group")
    report = store.gc(
        root,
        keep={ref: "; ".join(why) for ref, why in keep.items()},
        keep_last=keep_last,
        dry_run=dry_run,
    )
    if as_json:
        echo_json(report.to_json())
        return
    for ref, why in report.kept.items():
        click.echo(f"kept {ref}: {why}")
    verb = "would remove" if dry_run else "removed"
    for ref in report.removed:
        click.echo(f"{verb} {ref}")
    click.echo(
        f"{'would free' if dry_run else 'freed'} {report.objects_freed} objects, "
        f"{_size(report.bytes_freed)}"
    )


def _charged(settings: Settings) -> set[str]:
    """The model versions the ledger's posted charges name; refuses when it cannot tell."""
    try:
        from tpm_faas.gateway.ledger import Ledger

        ledger = Ledger(settings.ledger_url)
        try:
            return ledger.charged_models()
        finally:
            ledger.close()
    except (TPMError, ImportError) as e:
        why = e.message if isinstance(e, TPMError) else f"{e} (pip install 'tpm-faas[site]')"
        raise LedgerError(
            f"gc keeps the versions the ledger charged for, and cannot read them: {why}; "
            "pass --no-ledger to go on without them"
        ) from e


def _served(settings: Settings) -> set[str]:
    """The versions registered shard groups serve (a restart must find them again)."""
    from tpm_faas.registry import Registry

    return set(Registry(settings.registry_dir).models())


def _pinned(settings: Settings) -> set[str]:
    """The concrete versions the site policy names (patterns such as ``name@*`` pin none)."""
    from tpm_faas.policy import PolicyStore

    return PolicyStore(settings.policy_path).current().pinned()


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
