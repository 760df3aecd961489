"""Start, watch and stop shard groups through Parsl: the only module that imports parsl.

A shard group is ``tp_size`` long-running Parsl tasks (one per rank) on one block of a Parsl
provider. Here that is a ``LocalProvider``; at sites the same code takes a Slurm or PBS
provider from configuration. The ranks stay warm until :meth:`ShardGroup.stop`.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpm_faas.config import Settings
from tpm_faas.errors import ShardGroupError, TPMError
from tpm_faas.registry import GroupEntry, Registry
from tpm_faas.shard_client import ShardClient

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ShardGroup:
    """One shard group of ``model`` over ``tp_size`` ranks.

    :param model: ``name@version``
    :param tp_size: tensor-parallel ranks (CPU ranks use gloo)
    :param settings: where the model roots and the registry are
    :param run_dir: Parsl's run directory (logs, submit scripts)
    :param dtype: ``float32`` or ``bfloat16``
    :param max_batch: sequences decoded together at most (the KV cache's slots)
    :param max_wait_ms: how long an idle group waits for more requests to batch with
    """

    model: str
    tp_size: int
    settings: Settings
    run_dir: Path
    dtype: str = "float32"
    max_batch: int = 8
    max_wait_ms: float = 0.0
    _dfk: Any = field(default=None, init=False, repr=False)
    _futures: list[Future[Any]] = field(default_factory=list, init=False, repr=False)
    entry: GroupEntry | None = field(default=None, init=False)

    def start(self, *, timeout_s: float = 300.0, progress: Any = None) -> GroupEntry:
        """Start the ranks and wait until rank 0 answers a ping."""
        from parsl.app.app import python_app
        from parsl.config import Config
        from parsl.dataflow.dflow import DataFlowKernel
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        from tpm_faas.runtime.model_store import resolve
        from tpm_faas.runtime.rank import serve_rank

        if self.tp_size < 1:
            raise ShardGroupError("tp_size must be at least 1")
        model_dir = resolve(self.model, self.settings.model_roots)
        registry = Registry(self.settings.registry_dir)
        registry.unregister(self.model)  # a stale entry from a group that died
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent
        executor = HighThroughputExecutor(
            label=f"shards-{self.model.replace('@', '-')}",
            address="127.0.0.1",
            loopback_address="127.0.0.1",
            max_workers_per_node=self.tp_size,
            cores_per_worker=0.01,  # ranks are placed by us, not by Parsl's core count
            heartbeat_period=5,
            heartbeat_threshold=30,
            poll_period=100,
            encrypted=False,
            provider=LocalProvider(
                init_blocks=1,
                min_blocks=1,
                max_blocks=1,
                worker_init=f"export PATH={bindir}:$PATH",
            ),
        )
        config = Config(
            executors=[executor],
            run_dir=str(self.run_dir),
            strategy="none",
            initialize_logging=False,
            usage_tracking=0,
        )
        _say(progress, f"starting {self.tp_size} rank(s) of {self.model} through Parsl")
        self._dfk = DataFlowKernel(config)
        app = python_app(serve_rank, data_flow_kernel=self._dfk, executors=[executor.label])
        port = _free_port()
        self._futures = [
            app(
                rank,
                self.tp_size,
                port,
                self.model,
                str(model_dir),
                str(self.settings.registry_dir),
                self.dtype,
                max_batch=self.max_batch,
                max_wait_ms=self.max_wait_ms,
            )
            for rank in range(self.tp_size)
        ]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for f in self._futures:
                if f.done():
                    err = f.exception()
                    self._cleanup()
                    raise ShardGroupError(f"a rank of {self.model} exited during start-up: {err!r}")
            try:
                entry = registry.lookup(self.model)
                ShardClient(entry.address).ping(timeout_s=5)
                self.entry = entry
                _say(progress, f"{self.model} is serving at {entry.address} (tp={self.tp_size})")
                return entry
            except TPMError:
                time.sleep(0.2)
        self._cleanup()
        raise ShardGroupError(f"{self.model} did not start within {timeout_s:.0f} s")

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

    def restart(self, *, timeout_s: float = 300.0, progress: Any = None) -> GroupEntry:
        """Stop what is left of the group (a dead rank stalls the others) and start it anew."""
        _say(progress, f"restarting {self.model} (tp={self.tp_size})")
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
                    self.model, address=self.entry.address
                )
            self._cleanup()

    def _cleanup(self) -> None:
        if self._dfk is not None:
            self._dfk.cleanup()
            self._dfk = None
        self.entry = None

    def __enter__(self) -> ShardGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _say(progress: Any, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)
