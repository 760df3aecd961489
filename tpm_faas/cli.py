"""The ``tpm-faas`` command line. Heavy modules are imported inside the commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

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
@click.option(
    "--allocation",
    "allocation_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A YAML file of allocation settings (provider: local|slurm|pbspro, account, "
    "partition, walltime, launcher, gpus_per_node, worker_init); default: this machine.",
)
@click.option(
    "--replicas",
    default=None,
    type=click.IntRange(min=1),
    help="Run this many replicas, each its own shard group, supervised and restarted when "
    "unhealthy; SIGUSR1 adds one, SIGUSR2 removes one.",
)
def launch(
    model: str,
    tp_size: int,
    dtype: str,
    max_batch: int,
    max_wait_ms: float,
    allocation_file: Path | None,
    replicas: int | None,
) -> None:
    """Start a shard group for MODEL and keep it serving until interrupted."""
    import yaml

    from tpm_faas.launcher import Allocation

    allocation = Allocation()
    if allocation_file is not None:
        allocation = Allocation.from_dict(yaml.safe_load(allocation_file.read_text()) or {})
    if replicas is None:
        _serve_group(
            model, tp_size, dtype, allocation, max_batch=max_batch, max_wait_ms=max_wait_ms
        )
    else:
        _serve_replicas(
            model,
            tp_size,
            dtype,
            allocation,
            replicas,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
        )


def _serve_replicas(
    model: str, tp_size: int, dtype: str, allocation: Any, replicas: int, **kw: Any
) -> None:
    """Run ``replicas`` supervised replicas until SIGINT/SIGTERM; SIGUSR1/2 scale by one."""
    import signal

    from tpm_faas.config import Settings
    from tpm_faas.launcher import ReplicaSet

    settings = Settings.from_env()
    rs = ReplicaSet(
        model,
        tp_size,
        settings,
        settings.home / "runs" / "replicas",
        dtype=dtype,
        allocation=allocation,
        **kw,
    )
    say = lambda m: click.echo(f".. {m}", err=True)  # noqa: E731
    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        n = replicas
        for e in rs.scale(n, progress=say):
            click.echo(f"{model} replica {e.replica} serving at {e.address} on {e.host}")
        while True:
            sig = signal.sigtimedwait(wanted, 10.0)
            if sig is None:
                rs.supervise(progress=say)
                continue
            if sig.si_signo in (signal.SIGINT, signal.SIGTERM):
                break
            n = n + 1 if sig.si_signo == signal.SIGUSR1 else max(1, n - 1)
            rs.scale(n, progress=say)
            click.echo(f"{model}: {n} replica(s)")
    finally:
        rs.stop()
        click.echo(f"{model} stopped", err=True)


def _serve_group(model: str, tp_size: int, dtype: str, allocation: Any, **kw: Any) -> None:
    """Start a shard group, say where it runs, serve until SIGINT/SIGTERM, tear it down."""
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
        allocation=allocation,
        **kw,
    )
    # Block the signals first: sigwait below takes them, and a signal during start-up
    # still tears the group down.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        entry = group.start(progress=lambda m: click.echo(f".. {m}", err=True))
        click.echo(
            f"{model} serving at {entry.address} on {entry.host} (pid {entry.pid}, "
            f"tp={tp_size}; {allocation.describe()}); Ctrl-C stops it",
        )
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        group.stop()
        click.echo(f"{model} stopped", err=True)


@main.command()
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
        click.echo(json.dumps({"model": model, "shape": shape.__dict__, "sites": rows}, indent=2))
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


@main.command()
@click.argument("mode", type=click.Choice(["query", "embed", "intervene"]), default="intervene")
def schema(mode: str) -> None:
    """Print the JSON Schema of MODE's requests (docs/schemas/ holds the published copies)."""
    from tpm_faas.protocol.requests import json_schema

    click.echo(json_schema(mode), nl=False)


# -- policy ----------------------------------------------------------------------------------
@main.group()
def policy() -> None:
    """Validate and explain site policy files."""


@policy.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def policy_check(file: Path) -> None:
    """Validate FILE; errors name the path of the bad key."""
    from tpm_faas.policy import Policy

    p = Policy.load(file)
    d = p.data
    click.echo(f"{file}: valid (sha256 {p.sha256})")
    click.echo(
        f"  {len(d.groups)} groups, {len(d.models)} models, {len(d.projects)} projects, "
        f"tiers {', '.join(f'{k}={v}' for k, v in d.tiers.items())}; default {d.default}"
    )
    for g in d.groups:
        click.echo(
            f"  group {g.name}: {', '.join(g.modes)} on {', '.join(g.models)} -> project "
            f"{g.allocation} (tier {g.tier}{', writes' if g.limits.write else ''})"
        )
    missing = sorted({m for g in d.groups for m in g.models} - set(d.models))
    if missing:
        click.echo(f"  warning: no SU rates for {', '.join(missing)} (requests will be refused)")


@policy.command("explain")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--identity", required=True, help="Globus identity id or username.")
@click.option("--username", default="", help="Username, if --identity is an id.")
@click.option("--group", "groups", multiple=True, help="A Globus group id of the caller.")
@click.option("--mode", type=click.Choice(["query", "embed", "intervene"]), required=True)
@click.option("--model", default=None, help="name@version (default: the request's, or the first)")
@click.option(
    "--request",
    "request_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A request JSON file: also check it against the limits and price its worst case.",
)
def policy_explain(
    file: Path,
    identity: str,
    username: str,
    groups: tuple[str, ...],
    mode: str,
    model: str | None,
    request_file: Path | None,
) -> None:
    """Print the decision FILE makes for a caller, a mode and (optionally) a request, and why."""
    import json

    from tpm_faas.gateway.ledger import to_su
    from tpm_faas.policy import Caller, Policy

    p = Policy.load(file)
    body = json.loads(request_file.read_text()) if request_file else None
    model = model or (body or {}).get("model") or next(iter(p.data.models))
    caller = Caller(
        identity, username or (identity if "@" in identity else ""), frozenset(), frozenset(groups)
    )
    click.echo(f"policy {file} (sha256 {p.sha256[:16]}...)")
    click.echo(f"caller {caller.username or caller.identity}, mode {mode}, model {model}")
    matched = p.matching(caller)
    for g in p.data.groups:
        if g in matched:
            why = (
                "allows"
                if mode in g.modes and model in g.models
                else (f"matches but does not allow {mode!r} on {model}")
            )
            click.echo(f"  group {g.name}: matches; {why}")
        else:
            click.echo(f"  group {g.name}: does not match")
    decision = p.decide(caller, mode=mode, model=model)
    click.echo(
        f"ADMIT as group {decision.group}: project {decision.project}, tier "
        f"{decision.tier} (x{decision.multiplier})"
    )
    lim = decision.limits.model_dump(exclude_defaults=False)
    click.echo("  limits: " + ", ".join(f"{k}={v}" for k, v in lim.items() if v is not None))
    if body is not None:
        from tpm_faas.config import Settings
        from tpm_faas.gateway.pipeline import parse
        from tpm_faas.modes import MODES
        from tpm_faas.runtime.model_store import model_info, resolve

        info = model_info(model, resolve(model, Settings.from_env().model_roots))
        m = MODES[mode]
        adm = m.admit(
            parse(m.request_model, json.dumps({"model": model, **body})), info, decision.limits
        )
        w = adm.worst
        click.echo(
            f"  request admitted: worst case {w.input_tokens} tokens in, {w.output_tokens} out, "
            f"{w.bytes_returned} bytes, {w.hooked_sites} hook sites -> hold "
            f"{to_su(decision.price_micro(w)):.6f} SU"
        )


@policy.command("schema")
def policy_schema() -> None:
    """Print the JSON Schema of policy files (policies/schema.json)."""
    from tpm_faas.policy import json_schema

    click.echo(json_schema(), nl=False)


# -- the ledger ------------------------------------------------------------------------------
@main.command()
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
    import csv
    import json
    import time

    from tpm_faas.config import Settings
    from tpm_faas.gateway.ledger import Ledger, to_su

    ledger = Ledger(Settings.from_env().ledger_url)
    since = time.time() - days * 86400 if days else 0.0
    rows = [{**r, "su": to_su(r["charged_micro"])} for r in ledger.usage(project, since)]
    ledger.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif as_csv:
        w = csv.DictWriter(
            sys.stdout, fieldnames=["project", "day", "mode", "requests", "charged_micro", "su"]
        )
        w.writeheader()
        w.writerows(rows)
    else:
        click.echo(f"{'project':<20} {'day':<10} {'mode':<10} {'requests':>9} {'SU':>14}")
        for r in rows:
            click.echo(
                f"{r['project']:<20} {r['day']:<10} {r['mode']:<10} {r['requests']:>9} "
                f"{r['su']:>14.6f}"
            )
        total = sum(r["charged_micro"] for r in rows)
        click.echo(
            f"{'total':<20} {'':<10} {'':<10} {sum(r['requests'] for r in rows):>9} "
            f"{to_su(total):>14.6f}"
        )
    if plot is not None:
        _plot_usage(rows, plot)
        click.echo(f"wrote {plot}", err=True)


def _plot_usage(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

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


@main.group()
def ledger() -> None:
    """Check the SU ledger."""


@ledger.command("reconcile")
@click.option("--expire", is_flag=True, help="Void holds past their expiry first.")
def ledger_reconcile(expire: bool) -> None:
    """Check that no hold is open past its expiry, every balance equals the sum of its
    transfers, and every posted charge matches its request's hold (exit 1 if not)."""
    from tpm_faas.config import Settings
    from tpm_faas.gateway.ledger import Ledger

    lg = Ledger(Settings.from_env().ledger_url)
    if expire:
        click.echo(f"voided {lg.expire_holds()} expired holds")
    r = lg.reconcile()
    lg.close()
    click.echo(f"{r.projects} projects, {r.transfers} transfers")
    for name, items in (
        ("open holds past their expiry", r.expired_open_holds),
        ("balances that differ from their transfers", r.balance_mismatches),
        ("requests whose transfers differ from their hold", r.charge_mismatches),
    ):
        click.echo(f"  {name}: {len(items)}")
        for item in items[:20]:
            click.echo(f"    {item}")
    click.echo("OK" if r.ok else "NOT RECONCILED")
    sys.exit(0 if r.ok else 1)


@main.group()
def results() -> None:
    """Results that came back by reference (safetensors files in the results directory)."""


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
def results_prune(older_than: float, dry_run: bool) -> None:
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
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{where}: {verb} {p.files} files ({p.bytes / 1e6:.1f} MB); kept {p.kept}")
    if p.skipped:
        click.echo(
            f"  {p.skipped} old files belong to other accounts and were not deleted; run this "
            "as root or as the directory's owner"
        )


# -- Globus Auth -----------------------------------------------------------------------------
@main.group()
def auth() -> None:
    """Globus Auth for the TPM resource server."""


@auth.command("setup")
@click.option(
    "--client-id",
    envvar="TPM_FAAS_CLIENT_ID",
    required=True,
    help="The resource server's client id (TPM_FAAS_CLIENT_ID).",
)
@click.option(
    "--client-secret",
    envvar="TPM_FAAS_CLIENT_SECRET",
    required=True,
    help="Its secret (TPM_FAAS_CLIENT_SECRET).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be created; change nothing.")
@click.option(
    "--groups",
    is_flag=True,
    help="Let the endpoint look up callers' Globus groups (a dependent scope on Groups).",
)
def auth_setup(client_id: str, client_secret: str, dry_run: bool, groups: bool) -> None:
    """Create the scopes of the three modes on the resource server (those missing)."""
    from tpm_faas.globus_auth import setup_scopes

    for a in setup_scopes(client_id, client_secret, dry_run=dry_run, groups=groups):
        click.echo(f"{a.action:<12} {a.mode:<10} {a.scope}")


# -- Globus Compute --------------------------------------------------------------------------
@main.command()
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    required=True,
    help="An endpoint id that serves the functions (repeatable).",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    default=("demo-tpm@1",),
    show_default=True,
    help="A model@version the endpoints serve (repeatable).",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="MODE=GROUP_ID",
    help="Share a mode's function with a Globus group (repeatable).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("tpm-faas-functions.json"),
    show_default=True,
    help="Where to write the function manifest.",
)
@click.option(
    "--local-services",
    is_flag=True,
    help="Register with the loopback stand-in on localhost:5000 (tests, demos).",
)
def register(
    endpoints: tuple[str, ...],
    models: tuple[str, ...],
    groups: tuple[str, ...],
    out: Path,
    local_services: bool,
) -> None:
    """Register the mode functions with Globus Compute and write the function manifest."""
    from tpm_faas.compute.sdk import MODES, compute_client
    from tpm_faas.compute.sdk import register as register_functions
    from tpm_faas.errors import ConfigError

    shared: dict[str, str] = {}
    for g in groups:
        mode, sep, gid = g.partition("=")
        if not sep or mode not in MODES or not gid:
            raise ConfigError(f"--group takes MODE=GROUP_ID with MODE one of {MODES}, not {g!r}")
        shared[mode] = gid
    manifest = register_functions(
        compute_client(local_services=local_services),
        endpoints=endpoints,
        models=models,
        groups=shared,
    )
    manifest.write(out)
    for mode, fid in manifest.functions.items():
        click.echo(
            f"{mode:<10} {fid}"
            + (f"  (shared with group {shared[mode]})" if mode in shared else "")
        )
    click.echo(f"wrote {out} ({manifest.web_service}; endpoints {', '.join(manifest.endpoints)})")


# -- endpoint templates and bring-your-own deployment ----------------------------------------
@main.group()
def endpoint() -> None:
    """Globus Compute endpoint templates."""


def _read_vars(vars_file: Path | None, manifest: Path | None) -> dict[str, Any]:
    import yaml

    from tpm_faas.compute.sdk import Manifest
    from tpm_faas.errors import ConfigError

    variables: dict[str, Any] = {}
    if vars_file is not None:
        raw = yaml.safe_load(vars_file.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{vars_file} must be a YAML mapping of variables")
        variables.update(raw)
    if manifest is not None:
        variables["allowed_functions"] = list(Manifest.load(manifest).functions.values())
    return variables


@endpoint.command("render")
@click.argument("template", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--vars",
    "vars_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A YAML file of the template's variables.",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A function manifest: its ids become allowed_functions.",
)
@click.option(
    "--identity",
    default="00000000-0000-4000-8000-0000000000ee",
    show_default=True,
    help="The Globus identity to render for (user templates).",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The site policy the endpoint's workers use: validated too.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the rendered config here (default: print it).",
)
def endpoint_render(
    template: Path,
    vars_file: Path | None,
    manifest: Path | None,
    identity: str,
    policy_file: Path | None,
    out: Path | None,
) -> None:
    """Render TEMPLATE through the endpoint's own renderer and loader.

    For a multi-user (manager) config, the user endpoint template beside it is rendered and
    loaded too, with no user variables, so the pair is known to work before deployment.
    """
    from tpm_faas.compute.templates import render

    if policy_file is not None:
        from tpm_faas.policy import Policy

        p = Policy.load(policy_file)
        click.echo(f"{policy_file}: valid policy (sha256 {p.sha256[:16]}...)", err=True)
    r = render(template, _read_vars(vars_file, manifest), identity=identity)
    user_template = template.parent / "user_config_template.yaml.j2"
    if r.kind == "manager" and user_template.is_file():
        u = render(user_template, {}, identity=identity)
        click.echo(f"{user_template}: rendered and loaded ({u.kind} config)", err=True)
    if out is None:
        click.echo(r.text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(r.text)
    click.echo(f"{template}: rendered and loaded ({r.kind} config)", err=True)


@main.command()
@click.option(
    "--vars",
    "vars_file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Your variables (account, partition, model, venv, ...).",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, dir_okay=False),
    help="A function manifest: its ids become the endpoint's allowed_functions.",
)
@click.option(
    "--templates",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The BYO template directory (default: the bundled one).",
)
@click.option(
    "--endpoint-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("tpm-faas-endpoint.yaml"),
    show_default=True,
    help="Where to write your endpoint's rendered config.",
)
def deploy(
    vars_file: Path, manifest: Path | None, templates: Path | None, endpoint_config: Path
) -> None:
    """Bring your own allocation: render the BYO endpoint config, start a shard group on your
    allocation and serve until interrupted."""
    from tpm_faas.compute.templates import TEMPLATES, render

    tdir = templates or TEMPLATES / "byo"
    variables = _read_vars(vars_file, manifest)
    ep = render(tdir / "config.yaml.j2", variables)
    endpoint_config.parent.mkdir(parents=True, exist_ok=True)
    endpoint_config.write_text(ep.text)
    click.echo(f".. wrote your endpoint config to {endpoint_config}", err=True)
    spec = render(tdir / "shard_group.yaml.j2", variables).config
    _serve_group(spec["model"], spec["tp"], spec["dtype"], spec["allocation"])
