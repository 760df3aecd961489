"""``tpm-faas launch`` and ``tpm-faas deploy``: shard groups that serve until interrupted
(:mod:`tpm_faas.launcher`).

Progress goes to stderr while the batch job is queued, while the ranks start and load their
weights, and when the group serves; stdout gets one line (or, with ``--json``, one JSON
document per line) each time the set of serving groups changes. The start has two limits:
``--queue-timeout`` for the time the job waits in the scheduler's queue (none by default) and
``--start-timeout`` from when the job runs until the group serves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tpm_faas.cli._app import progress, read_yaml_mapping

_FILE = click.Path(path_type=Path, dir_okay=False)


def _timeouts(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that starts shard groups takes."""
    f = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print each serving group as one line of JSON (address, job ids, ranks).",
    )(f)
    f = click.option(
        "--queue-timeout",
        type=click.FloatRange(min=1),
        default=None,
        help="Give up if the batch job is still queued after this many seconds (default: wait).",
    )(f)
    f = click.option(
        "--start-timeout",
        type=click.FloatRange(min=1),
        default=1800.0,
        show_default=True,
        help="Seconds from when the job runs until the group must serve (ranks started, "
        "weights loaded).",
    )(f)
    return f


@click.command()
@click.argument("model", default="demo-tpm@1")
@click.option("--tp", "tp_size", default=1, show_default=True, help="Tensor-parallel ranks.")
@click.option(
    "--ep",
    "ep_size",
    default=1,
    show_default=True,
    help="Expert-parallel ranks of a mixture of experts (its routed experts split evenly over "
    "them); the group has max(tp, ep) ranks, and tp and ep are each 1 or that size.",
)
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
    type=_FILE,
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
@_timeouts
def launch(
    model: str,
    tp_size: int,
    ep_size: int,
    dtype: str,
    max_batch: int,
    max_wait_ms: float,
    allocation_file: Path | None,
    replicas: int | None,
    start_timeout: float,
    queue_timeout: float | None,
    as_json: bool,
) -> None:
    """Start a shard group for MODEL and keep it serving until interrupted.

    MODEL is NAME@VERSION from the model roots or the version store (rebuilt once into the
    cache, verified), or NAME@latest: the store's newest version of NAME now."""
    from tpm_faas.launcher import Allocation

    allocation = Allocation()
    if allocation_file is not None:
        allocation = Allocation.from_dict(read_yaml_mapping(allocation_file, "allocation file"))
    kw: dict[str, Any] = {
        "max_batch": max_batch,
        "max_wait_ms": max_wait_ms,
        "start_timeout_s": start_timeout,
        "queue_timeout_s": queue_timeout,
        "ep_size": ep_size,
    }
    if replicas is None:
        serve_group(model, tp_size, dtype, allocation, as_json=as_json, **kw)
    else:
        serve_replicas(model, tp_size, dtype, allocation, replicas, as_json=as_json, **kw)


@click.command()
@click.option(
    "--vars",
    "vars_file",
    type=_FILE,
    required=True,
    help="Your variables (account, partition, model, venv, ...).",
)
@click.option(
    "--manifest", type=_FILE, help="A function manifest: its ids become allowed_functions."
)
@click.option(
    "--templates",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The BYO template directory (default: the bundled one).",
)
@click.option(
    "--endpoint-config",
    type=_FILE,
    default=Path("tpm-faas-endpoint.yaml"),
    show_default=True,
    help="Where to write your endpoint's rendered config.",
)
@_timeouts
def deploy(
    vars_file: Path,
    manifest: Path | None,
    templates: Path | None,
    endpoint_config: Path,
    start_timeout: float,
    queue_timeout: float | None,
    as_json: bool,
) -> None:
    """Bring your own allocation: render the BYO endpoint config, start a shard group on your
    allocation and serve until interrupted."""
    from tpm_faas.cli.endpoint import read_vars
    from tpm_faas.compute.templates import TEMPLATES, render

    tdir = templates or TEMPLATES / "byo"
    variables = read_vars(vars_file, manifest)
    ep = render(tdir / "config.yaml.j2", variables)
    endpoint_config.parent.mkdir(parents=True, exist_ok=True)
    endpoint_config.write_text(ep.text)
    progress(f"wrote your endpoint config to {endpoint_config}")
    spec = render(tdir / "shard_group.yaml.j2", variables).config
    serve_group(
        spec["model"],
        spec["tp"],
        spec["dtype"],
        spec["allocation"],
        as_json=as_json,
        start_timeout_s=start_timeout,
        queue_timeout_s=queue_timeout,
        ep_size=spec.get("ep", 1),
    )


def _echo_record(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, sort_keys=True))


def serve_replicas(
    model: str,
    tp_size: int,
    dtype: str,
    allocation: Any,
    replicas: int,
    *,
    as_json: bool = False,
    **kw: Any,
) -> None:
    """Run ``replicas`` supervised replicas until SIGINT/SIGTERM; SIGUSR1/2 scale by one."""
    import signal

    from tpm_faas.config import Settings
    from tpm_faas.launcher import ReplicaSet, ShardGroup

    settings = Settings.from_env()
    layout = {k: v for k, v in kw.items() if k == "ep_size"}
    ShardGroup(model, tp_size, settings, Path(), allocation=allocation, **layout).check()
    rs = ReplicaSet(
        model,
        tp_size,
        settings,
        settings.home / "runs" / "replicas",
        dtype=dtype,
        allocation=allocation,
        **kw,
    )

    def report() -> None:
        if as_json:
            _echo_record(
                {"model": model, "replicas": [g.describe() for _, g in sorted(rs.groups.items())]}
            )

    wanted = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        n = replicas
        for e in rs.scale(n, progress=progress):
            if not as_json:
                click.echo(f"{model} replica {e.replica} serving at {e.address} on {e.host}")
        report()
        while True:
            sig = signal.sigtimedwait(wanted, 10.0)
            if sig is None:
                if rs.supervise(progress=progress):
                    report()
                continue
            if sig.si_signo in (signal.SIGINT, signal.SIGTERM):
                break
            n = n + 1 if sig.si_signo == signal.SIGUSR1 else max(1, n - 1)
            rs.scale(n, progress=progress)
            if as_json:
                report()
            else:
                click.echo(f"{model}: {n} replica(s)")
    finally:
        rs.stop()
        click.echo(f"{model} stopped", err=True)


def serve_group(
    model: str, tp_size: int, dtype: str, allocation: Any, *, as_json: bool = False, **kw: Any
) -> None:
    """Start a shard group, say where it runs, serve until SIGINT/SIGTERM, tear it down."""
    import signal

    from tpm_faas.config import Settings
    from tpm_faas.launcher import ShardGroup, layout

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
    group.check()  # a model or layout it cannot serve: one line, before anything starts
    # Block the signals first: sigwait below takes them, and a signal during start-up
    # still tears the group down.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        entry = group.start(progress=progress)
        if as_json:
            _echo_record(group.describe())
        else:
            click.echo(
                f"{model} serving at {entry.address} on {entry.host} (pid {entry.pid}, "
                f"{layout(tp_size, group.ep_size)}; {allocation.describe()}); Ctrl-C stops it",
            )
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        group.stop()
        click.echo(f"{model} stopped", err=True)
