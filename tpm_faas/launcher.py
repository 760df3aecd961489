"""Start, watch and stop shard groups through Parsl: the only module that imports parsl.

A shard group is ``max(tp_size, ep_size)`` long-running Parsl tasks (one per rank) on one block
of a Parsl provider: tensor parallelism (DeepSpeed AutoTP) and, for a mixture of experts, expert
parallelism (the routed experts split over the ranks) over the same ranks
(:func:`check_parallel`). Where the block runs is an :class:`Allocation`: the machine itself
(``LocalProvider``), or a batch job on a Slurm or PBS Pro cluster (``SlurmProvider``,
``PBSProProvider``), on the provider's allocation or on one a user owns ("bring your own").
The ranks stay warm until :meth:`ShardGroup.stop`, which also ends the batch job.

Starting a group has two clocks. While the batch job waits in the scheduler's queue it is
*queued*: that can take hours on a busy cluster, so it has no limit unless ``queue_timeout_s``
sets one. Once the job runs (Parsl reports it running, or a rank joins the rendezvous), the
ranks start and load their weights, and ``start_timeout_s`` (default
:data:`START_TIMEOUT_S`) bounds the time until rank 0 answers. Progress goes to ``progress``
on every change of phase and every :data:`REPORT_EVERY_S` seconds.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpm_faas._extras import require
from tpm_faas.config import Settings
from tpm_faas.errors import ConfigError, ShardGroupError, TPMError
from tpm_faas.registry import GroupEntry, Registry
from tpm_faas.runtime.model_store import check_parallel
from tpm_faas.shard_client import ShardClient

log = logging.getLogger(__name__)


#: Seconds from when a group's job runs until it must serve (ranks started, weights loaded).
START_TIMEOUT_S = 1800.0
#: Seconds between "still queued / still loading" progress lines.
REPORT_EVERY_S = 30.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_WALLTIME = re.compile(r"^\d{1,4}:[0-5]\d:[0-5]\d$")


@dataclass(frozen=True)
class Allocation:
    """Where a shard group's block runs, and on whose account.

    :param kind: ``provider`` (the site's allocation, shared by everyone) or ``byo`` (an
        allocation the user owns; the scheduler bills it, the ledger still records use)
    :param provider: ``local``, ``slurm`` or ``pbspro``
    :param launcher: how the worker pool starts in the job: ``simple``, ``srun``, ``mpiexec``
    :param account: the scheduler account charged (``--account`` / ``-A``)
    :param partition: Slurm partition or PBS queue
    :param walltime: ``HH:MM:SS`` of the batch job
    :param nodes: nodes per block: a shard group's ranks are spread evenly over them
    :param gpus_per_node: GPUs requested per node (Slurm ``--gpus-per-node``)
    :param worker_init: shell lines run before the workers start (modules, venv)
    :param address: address the workers reach the interchange at (the submit host)
    """

    kind: str = "provider"
    provider: str = "local"
    launcher: str = "simple"
    account: str | None = None
    partition: str | None = None
    walltime: str = "01:00:00"
    nodes: int = 1
    gpus_per_node: int = 0
    worker_init: str = ""
    address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        types: dict[str, type] = {
            "nodes": int,
            "gpus_per_node": int,
            "walltime": str,
            "worker_init": str,
        }
        for field_name, kind in types.items():
            got = getattr(self, field_name)
            if not isinstance(got, kind) or isinstance(got, bool):
                raise ConfigError(
                    f"allocation {field_name}={got!r}: must be {kind.__name__}"
                    + (' (quote it: "HH:MM:SS")' if field_name == "walltime" else "")
                )
        checks = [
            ("kind", self.kind in ("provider", "byo"), "provider or byo"),
            ("provider", self.provider in ("local", "slurm", "pbspro"), "local, slurm or pbspro"),
            ("launcher", self.launcher in ("simple", "srun", "mpiexec"), "simple, srun, mpiexec"),
            ("walltime", bool(_WALLTIME.match(self.walltime)), "HH:MM:SS"),
            ("nodes", 1 <= self.nodes <= 1024, "1..1024"),
            (
                "launcher",
                self.nodes == 1 or self.launcher != "simple",
                "srun or mpiexec for a block of several nodes (a worker pool on each)",
            ),
            ("gpus_per_node", 0 <= self.gpus_per_node <= 64, "0..64"),
        ]
        for name in ("account", "partition"):
            value = getattr(self, name)
            ok = value is None or (isinstance(value, str) and bool(_NAME.match(value)))
            checks.append((name, ok, "letters, digits and _.+- (at most 64)"))
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"allocation {name}={getattr(self, name)!r}: must be {want}")
        if self.provider != "local" and self.kind == "byo" and not self.account:
            raise ConfigError("a bring-your-own allocation on a scheduler needs an account")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Allocation:
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown allocation settings: {', '.join(sorted(unknown))}")
        return cls(**raw)

    def describe(self) -> str:
        if self.provider == "local":
            return "this machine (LocalProvider)"
        where = f"{self.provider} partition {self.partition or '(default)'}"
        return f"{where}, account {self.account or '(default)'}, {self.kind} allocation"

    def parsl_provider(self, bindir: Path) -> Any:
        require("parsl", "launch")
        from parsl.launchers import MpiExecLauncher, SimpleLauncher, SrunLauncher
        from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

        init = f"export PATH={bindir}:$PATH\n{self.worker_init}".strip()
        launcher = {"simple": SimpleLauncher, "srun": SrunLauncher, "mpiexec": MpiExecLauncher}[
            self.launcher
        ]()
        blocks: dict[str, Any] = {
            "init_blocks": 1,
            "min_blocks": 1 if self.provider == "local" else 0,
            "max_blocks": 1,
        }
        if self.provider == "local":
            return LocalProvider(worker_init=init, **blocks)
        if self.provider == "slurm":
            return SlurmProvider(
                partition=self.partition,
                account=self.account,
                nodes_per_block=self.nodes,
                gpus_per_node=self.gpus_per_node or None,
                walltime=self.walltime,
                worker_init=init,
                exclusive=False,
                launcher=launcher,
                cmd_timeout=60,
                **blocks,
            )
        return PBSProProvider(
            account=self.account,
            queue=self.partition,
            nodes_per_block=self.nodes,
            select_options=f"ngpus={self.gpus_per_node}" if self.gpus_per_node else "",
            walltime=self.walltime,
            worker_init=init,
            launcher=launcher,
            **blocks,
        )


def layout(tp_size: int, ep_size: int) -> str:
    """``tp=2`` or ``tp=2, ep=2``: a group's layout in messages (ep only when it is > 1)."""
    return f"tp={tp_size}" + (f", ep={ep_size}" if ep_size > 1 else "")


@dataclass
class ShardGroup:
    """One shard group of ``model`` over ``max(tp_size, ep_size)`` ranks
    (:func:`check_parallel`).

    :param model: ``name@version``
    :param tp_size: tensor-parallel ranks (CPU ranks use gloo): 1 or the group's size
    :param settings: where the model roots and the registry are
    :param run_dir: Parsl's run directory (logs, submit scripts)
    :param dtype: ``float32`` or ``bfloat16``
    :param max_batch: sequences decoded together at most (the KV cache's slots)
    :param max_wait_ms: how long an idle group waits for more requests to batch with
    :param allocation: where the block runs (default: this machine)
    :param replica: this group's name among the model's replicas ("" when it is the only one)
    :param start_timeout_s: seconds from when the job runs until the group serves
    :param queue_timeout_s: seconds the job may wait in the scheduler's queue (``None``: no
        limit)
    :param ep_size: expert-parallel ranks of a mixture of experts (its routed experts split
        evenly over them): 1 or the group's size
    """

    model: str
    tp_size: int
    settings: Settings
    run_dir: Path
    dtype: str = "float32"
    max_batch: int = 8
    max_wait_ms: float = 0.0
    allocation: Allocation = field(default_factory=Allocation)
    replica: str = ""
    start_timeout_s: float = START_TIMEOUT_S
    queue_timeout_s: float | None = None
    ep_size: int = 1
    _dfk: Any = field(default=None, init=False, repr=False)
    _executor: Any = field(default=None, init=False, repr=False)
    #: The scheduler's ids of the group's batch jobs (Parsl blocks), once submitted.
    job_ids: list[str] = field(default_factory=list, init=False)
    #: Where each rank ran (rank, host, pid), once the group serves.
    ranks: list[dict[str, Any]] = field(default_factory=list, init=False)
    _futures: list[Future[Any]] = field(default_factory=list, init=False, repr=False)
    entry: GroupEntry | None = field(default=None, init=False)
    #: The version's directory in the store's cache, leased while the group starts and serves.
    _cached: Path | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # NAME@latest is the store's newest version now; the group (and its restarts) keep it.
        from tpm_faas.versions.cache import concrete

        self.model = concrete(self.model, self.settings)

    def start(
        self,
        *,
        timeout_s: float | None = None,
        queue_timeout_s: float | None = None,
        progress: Any = None,
    ) -> GroupEntry:
        """Start the ranks and wait until rank 0 answers a ping, reporting progress.

        :param timeout_s: seconds from when the job runs until the group serves (default
            :attr:`start_timeout_s`)
        :param queue_timeout_s: seconds the job may stay queued (default
            :attr:`queue_timeout_s`; ``None``: no limit)
        :raises ShardGroupError: a rank exited, the job failed, or a limit passed
        """
        load_limit = self.start_timeout_s if timeout_s is None else timeout_s
        queue_limit = self.queue_timeout_s if queue_timeout_s is None else queue_timeout_s
        require("parsl", "launch")
        from parsl.app.app import python_app
        from parsl.config import Config
        from parsl.dataflow.dflow import DataFlowKernel
        from parsl.executors import HighThroughputExecutor

        from tpm_faas.runtime.rank import serve_rank

        model_dir = self.check()
        size, nodes = self.size, self.allocation.nodes
        registry = Registry(self.settings.registry_dir)
        registry.unregister(self.model, replica=self.replica)  # left by a group that died
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent
        executor = HighThroughputExecutor(
            label=f"shards-{self.model.replace('@', '-')}",
            address=self.allocation.address,
            loopback_address="127.0.0.1",
            max_workers_per_node=size // nodes,  # ranks per node
            cores_per_worker=0.01,  # ranks are placed by us, not by Parsl's core count
            heartbeat_period=5,
            heartbeat_threshold=30,
            poll_period=100,
            encrypted=False,
            provider=self.allocation.parsl_provider(bindir),
        )
        config = Config(
            executors=[executor],
            run_dir=str(self.run_dir),
            strategy="none",
            initialize_logging=False,
            usage_tracking=0,
        )
        _say(
            progress,
            f"starting {size} rank(s) of {self.model} ({self.layout}) through Parsl on "
            f"{self.allocation.describe()}",
        )
        self._dfk = DataFlowKernel(config)
        self._executor = executor
        app = python_app(serve_rank, data_flow_kernel=self._dfk, executors=[executor.label])
        rendezvous = self.run_dir / f"rendezvous-{uuid.uuid4().hex[:12]}"
        self._futures = [
            app(
                rank,
                self.tp_size,
                str(rendezvous),
                self.model,
                str(model_dir),
                str(self.settings.registry_dir),
                self.dtype,
                max_batch=self.max_batch,
                max_wait_ms=self.max_wait_ms,
                replica=self.replica,
                ep_size=self.ep_size,
            )
            for rank in range(size)
        ]
        watch = _StartWatch(self, rendezvous, progress, load_limit, queue_limit)
        while True:
            for f in self._futures:
                if f.done():
                    err = f.exception()
                    self._cleanup()
                    raise ShardGroupError(
                        f"a rank of {self.model} exited during start-up on "
                        f"{self.allocation.describe()}: {err}"
                    )
            try:
                mine = [e for e in registry.entries(self.model) if e.replica == self.replica]
                if not mine:
                    raise ShardGroupError("not registered yet")
                entry = mine[0]
                ShardClient(entry.address).ping(timeout_s=5)
                self.ranks = _joined(rendezvous)
                shutil.rmtree(rendezvous, ignore_errors=True)  # every rank has joined
                self.entry = entry
                _say(
                    progress,
                    f"{self.model} is serving at {entry.address} ({self.layout}"
                    f"{', job ' + ', '.join(self.job_ids) if self.job_ids else ''}; "
                    f"{watch.elapsed()})",
                )
                return entry
            except TPMError:
                pass
            failure = watch.check()
            if failure is not None:
                self._cleanup()
                raise ShardGroupError(failure)
            time.sleep(0.2)

    def check(self) -> Path:
        """Refuse, before any rank starts, a model this site cannot serve or a layout it cannot
        serve it in (:func:`check_parallel`, ranks spread evenly over the nodes); returns the
        version's directory (a model root's, or the version store's materialised in the
        cache)."""
        from tpm_faas.catalog import check_servable
        from tpm_faas.versions.cache import locate

        # A version from the store is rebuilt (verified) into the cache once; versions live
        # groups serve are never evicted to make room.
        serving = Registry(self.settings.registry_dir).models()
        model_dir = locate(self.model, self.settings, protect=serving)
        if model_dir.is_relative_to(self.settings.version_cache_dir):
            self._cached = model_dir  # leased by locate until the group stops
        check_servable(model_dir)
        size = check_parallel(self.model, model_dir, self.tp_size, self.ep_size)
        nodes = self.allocation.nodes
        if size % nodes:
            raise ConfigError(
                f"{size} ranks ({self.layout}) do not spread evenly over {nodes} nodes"
            )
        return model_dir

    @property
    def size(self) -> int:
        """The group's ranks: ``max(tp_size, ep_size)``."""
        return max(self.tp_size, self.ep_size)

    @property
    def layout(self) -> str:
        """``tp=2`` or ``tp=2, ep=2`` (for messages)."""
        return layout(self.tp_size, self.ep_size)

    def job_state(self) -> str:
        """``queued``, ``running`` or ``unknown``: the batch job's state as Parsl last polled it
        (and, as a side effect, :attr:`job_ids` brought up to date)."""
        ex = self._executor
        if ex is None:
            return "unknown"
        self.job_ids = [str(j) for j in getattr(ex, "blocks_to_job_id", {}).values()]
        states = {str(s.state.name) for s in getattr(ex, "status_facade", {}).values()}
        if "RUNNING" in states:
            return "running"
        if states & {"PENDING", "INIT", "HELD"}:
            return "queued"
        if states & {"FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "MISSING"}:
            return "ended"
        return "unknown"

    def job_messages(self) -> list[str]:
        """What the scheduler said about the batch jobs (e.g. why a submission failed)."""
        ex = self._executor
        statuses = getattr(ex, "status_facade", {}).values() if ex is not None else []
        return [str(s.message) for s in statuses if getattr(s, "message", None)]

    def describe(self) -> dict[str, Any]:
        """The serving group as JSON: address, job ids, ranks (``tpm-faas launch --json``)."""
        e = self.entry
        return {
            "model": self.model,
            "replica": self.replica,
            "address": e.address if e else None,
            "host": e.host if e else None,
            "pid": e.pid if e else None,
            "tp": self.tp_size,
            "ep": self.ep_size,
            "size": self.size,
            "job_ids": list(self.job_ids),
            "ranks": list(self.ranks),
            "allocation": self.allocation.describe(),
            "started_at": e.started_at if e else None,
        }

    def client(self) -> ShardClient:
        if self.entry is None:
            raise ShardGroupError("the shard group is not running")
        return ShardClient(self.entry.address)

    def healthy(self) -> bool:
        """Every rank is alive and rank 0 answers a ping (a rank that exited or died makes the
        group unhealthy: the others would stall in their next collective)."""
        if self.entry is None or any(f.done() for f in self._futures):
            return False
        try:
            self.client().ping(timeout_s=5)
        except TPMError:
            return False
        return True

    def restart(self, *, timeout_s: float | None = None, progress: Any = None) -> GroupEntry:
        """Stop what is left of the group (a dead rank stalls the others) and start it anew."""
        _say(progress, f"restarting {self.model} ({self.layout})")
        self.stop(timeout_s=10.0)
        return self.start(timeout_s=timeout_s, progress=progress)

    def stop(self, *, timeout_s: float = 60.0) -> None:
        """Ask rank 0 to stop every rank, wait for them, and shut Parsl down."""
        try:
            if self.entry is not None and not any(f.done() for f in self._futures):
                self.client().call("shutdown", timeout_s=timeout_s)
                for f in self._futures:
                    f.result(timeout=timeout_s)
        except Exception as e:  # still tear Parsl down: no orphan ranks
            log.warning("shard group %s did not stop cleanly: %s", self.model, e)
        finally:
            if self.entry is not None:
                Registry(self.settings.registry_dir).unregister(
                    self.model, address=self.entry.address, replica=self.replica
                )
            self._cleanup()

    def _cleanup(self) -> None:
        if self._dfk is not None:
            self._dfk.cleanup()
            self._dfk = None
        self._executor = None
        self.entry = None
        if self._cached is not None:
            from tpm_faas.versions.cache import release

            release(self._cached)
            self._cached = None

    def __enter__(self) -> ShardGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ReplicaSet:
    """Replicas of one model's shard group: scaled in and out, restarted when unhealthy.

    Each replica is a :class:`ShardGroup` (named ``r0``, ``r1``, ...) with its own batch job
    or local block, registered separately; the gateway spreads requests over the replicas
    whose heartbeat is fresh.
    """

    model: str
    tp_size: int
    settings: Settings
    run_dir: Path
    dtype: str = "float32"
    allocation: Allocation = field(default_factory=Allocation)
    max_batch: int = 8
    max_wait_ms: float = 0.0
    start_timeout_s: float = START_TIMEOUT_S
    queue_timeout_s: float | None = None
    ep_size: int = 1
    groups: dict[str, ShardGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from tpm_faas.versions.cache import concrete

        self.model = concrete(self.model, self.settings)  # every replica serves one version

    def scale(self, n: int, *, progress: Any = None) -> list[GroupEntry]:
        """Run exactly ``n`` replicas: start the missing ones, stop the newest extra ones."""
        if n < 0:
            raise ConfigError("replicas cannot be negative")
        for name in sorted(self.groups, key=lambda r: int(r[1:]), reverse=True)[
            : max(0, len(self.groups) - n)
        ]:
            _say(progress, f"scaling in: stopping replica {name} of {self.model}")
            self.groups.pop(name).stop()
        k = 0
        while len(self.groups) < n:
            name = f"r{k}"
            k += 1
            if name in self.groups:
                continue
            group = ShardGroup(
                self.model,
                self.tp_size,
                self.settings,
                self.run_dir / name,
                dtype=self.dtype,
                max_batch=self.max_batch,
                max_wait_ms=self.max_wait_ms,
                allocation=self.allocation,
                replica=name,
                start_timeout_s=self.start_timeout_s,
                queue_timeout_s=self.queue_timeout_s,
                ep_size=self.ep_size,
            )
            _say(progress, f"scaling out: starting replica {name} of {self.model}")
            group.start(progress=progress)
            self.groups[name] = group
        return [g.entry for g in self.groups.values() if g.entry is not None]

    def supervise(self, *, progress: Any = None) -> list[str]:
        """Restart every replica that is not healthy; returns their names."""
        restarted = []
        for name, group in sorted(self.groups.items()):
            if not group.healthy():
                _say(progress, f"replica {name} of {self.model} is unhealthy: restarting it")
                group.restart(progress=progress)
                restarted.append(name)
        return restarted

    def stop(self) -> None:
        self.scale(0)


def _joined(rendezvous: Path) -> list[dict[str, Any]]:
    """The ranks that joined the rendezvous so far: rank, host, pid."""

    out = []
    for f in sorted(rendezvous.glob("rank-*.json")):
        try:
            raw = json.loads(f.read_text())
        except (OSError, ValueError):  # being written
            continue
        out.append({"rank": raw.get("rank"), "host": raw.get("host"), "pid": raw.get("pid")})
    return sorted(out, key=lambda r: int(r["rank"] or 0))


class _StartWatch:
    """The two clocks of a start (queued, then starting) and the progress lines about them."""

    def __init__(
        self,
        group: ShardGroup,
        rendezvous: Path,
        progress: Any,
        load_limit: float,
        queue_limit: float | None,
    ) -> None:
        self.group, self.rendezvous, self.progress = group, rendezvous, progress
        self.load_limit, self.queue_limit = load_limit, queue_limit
        self.t0 = time.monotonic()
        self.running_since: float | None = None
        self.phase = ""
        self.reported = 0.0

    def elapsed(self) -> str:
        now = time.monotonic()
        if self.running_since is None:
            return f"{now - self.t0:.0f} s"
        queued = self.running_since - self.t0
        return f"{queued:.0f} s queued, {now - self.running_since:.0f} s starting"

    def check(self) -> str | None:
        """Report a new phase (or a periodic line); the failure message once a limit passed."""
        g, now = self.group, time.monotonic()
        state = g.job_state()
        jobs = ", ".join(g.job_ids) or "not submitted yet"
        joined = len(_joined(self.rendezvous))
        if state == "ended" and not joined:
            why = "; ".join(g.job_messages())
            return (
                f"the batch job of {g.model} on {g.allocation.describe()} ({jobs}) ended before "
                "any rank started" + (f": {why.strip()}" if why else "")
            )
        if self.running_since is None and (state == "running" or joined):
            self.running_since = now
        if self.running_since is None:
            phase = f"queued: job {jobs} waits for {g.allocation.describe()}"
            if self.queue_limit is not None and now - self.t0 > self.queue_limit:
                return (
                    f"{g.model}: job {jobs} was still queued after {self.queue_limit:.0f} s "
                    "(the queue timeout)"
                )
        else:
            if joined < g.size:
                phase = f"job {jobs} running: {joined}/{g.size} ranks started ({g.layout})"
            else:
                phase = f"{g.size} rank(s) loading weights ({g.layout})"
            if now - self.running_since > self.load_limit:
                return (
                    f"{g.model} did not serve within {self.load_limit:.0f} s of its job "
                    f"starting ({phase}; the start timeout)"
                )
        if phase != self.phase or now - self.reported >= REPORT_EVERY_S:
            still = "still " if phase == self.phase else ""
            _say(self.progress, f"{still}{phase} ({self.elapsed()})")
            self.phase, self.reported = phase, now
        return None


def _say(progress: Any, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)
