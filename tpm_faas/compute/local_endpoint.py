"""An embedded Globus Compute endpoint that runs on loopback, with no cloud in the loop.

:class:`LocalEndpoint` drives the *real* execution engine of a Globus Compute endpoint,
:class:`globus_compute_endpoint.engines.GlobusComputeEngine` (Parsl's HighThroughputExecutor
with a :class:`~parsl.providers.LocalProvider`), and feeds it tasks packed byte for byte as the
Globus Compute SDK and web service pack them:

* registration (``Client.register_function``) ships
  ``function_code = ComputeSerializer.pack_buffers([serialize(function)])``; here the code
  strategy is always :class:`~globus_compute_sdk.serialize.PureSourceTextInspect` (source
  text, never a pickle) -- see :func:`pack_function`;
* submission (``Batch.add``) ships ``payload = pack_buffers([serialize(args),
  serialize(kwargs)])`` with the data strategy :class:`~globus_compute_sdk.serialize.JSONData`,
  and the web service forwards ``messagepack.pack(Task(task_id, function_code + payload))``
  to the endpoint -- see :func:`pack_task`;
* the engine answers with a messagepack-packed ``Result``, whose data is serialized with the
  result serializer (JSON again) -- see :func:`unpack_result`.

The engine is configured with ``allowed_serializers=[PureSourceTextInspect, JSONData]``, so a
task carrying a pickled (dill) function or pickled arguments is refused by the worker, exactly
as a production endpoint with that allowlist refuses it.

Because :func:`pack_function` ships source text only, a registered function must be a plain
module-level ``def`` whose body imports everything it needs: the worker ``exec``\\ s only the
function's source in an empty namespace: no module globals, so no decorators and no default
values that name anything but builtins.  (Annotations are harmless: the SDK compiles the source
with postponed evaluation of annotations.)
"""

# The engine's imports come after the check that names the missing extra.
# ruff: noqa: E402

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from tpm_faas._extras import require
from tpm_faas.config import path_with_first, restore_process_env, search_path, set_process_env

# Without the endpoint extra, say which one to install before the imports below fail.
require("globus_compute_endpoint", "endpoint")

from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, Task
from globus_compute_endpoint.engines import GlobusComputeEngine
from globus_compute_endpoint.engines.base import GCFuture
from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect
from parsl.jobs.error_handlers import windowed_error_handler
from parsl.providers import LocalProvider

__all__ = [
    "ALLOWED_SERIALIZERS",
    "CODE_SERIALIZER",
    "DATA_SERIALIZER",
    "RESULT_SERIALIZERS",
    "LocalEndpoint",
    "RemoteTaskError",
    "pack_function",
    "pack_task",
    "unpack_result",
]

log = logging.getLogger(__name__)

#: Import path of the only code strategy used and accepted: the function's source text.
CODE_SERIALIZER: Final[str] = "globus_compute_sdk.serialize.PureSourceTextInspect"
#: Import path of the only data strategy used and accepted: JSON.
DATA_SERIALIZER: Final[str] = "globus_compute_sdk.serialize.JSONData"
#: The engine's deserializer allowlist (one code and one data strategy, as the SDK requires).
ALLOWED_SERIALIZERS: Final[tuple[str, str]] = (CODE_SERIALIZER, DATA_SERIALIZER)
#: Strategies the worker may use to serialize a function's return value.
RESULT_SERIALIZERS: Final[tuple[str, ...]] = (DATA_SERIALIZER,)

# Client side: serializes with source text + JSON and refuses to deserialize anything else.
_SERDE: Final = ComputeSerializer(
    strategy_code=PureSourceTextInspect,
    strategy_data=JSONData,
    allowed_deserializer_types=ALLOWED_SERIALIZERS,
)

_SHUTDOWN_GRACE_S: Final = 10.0

#: Seconds between the worker pool's heartbeats to the interchange, which is also how often
#: the pool's watchdog looks for dead workers (Parsl's default is 30).
HEARTBEAT_PERIOD_S: Final = 1
#: Seconds without a heartbeat after which the interchange declares a pool lost and fails its
#: tasks with ``ManagerLost`` (Parsl's default is 120).
HEARTBEAT_THRESHOLD_S: Final = 10
#: Seconds between two looks of :class:`_PoolWatch` at the block's processes.
_WATCH_PERIOD_S: Final = 0.5
_POOL: Final = "process_worker_pool"


class RemoteTaskError(RuntimeError):
    """A task failed on the endpoint: the function raised, or the worker refused the task.

    :param message: one-line summary, normally the remote exception's last line
        (``"ValueError: ..."``)
    :param code: ``error_details.code`` of the ``Result`` (e.g. ``"RemoteExecutionError"``)
    :param user_message: ``error_details.user_message`` of the ``Result``
    :param remote_traceback: the formatted remote traceback (``Result.data``)
    :param task_id: the Globus Compute task id
    """

    def __init__(
        self,
        message: str,
        code: str,
        *,
        user_message: str | None = None,
        remote_traceback: str | None = None,
        task_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.user_message = user_message if user_message is not None else message
        self.remote_traceback = remote_traceback
        self.task_id = task_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_remote_task_error,
            (self.message, self.code, self.user_message, self.remote_traceback, self.task_id),
        )


def _rebuild_remote_task_error(
    message: str,
    code: str,
    user_message: str | None,
    remote_traceback: str | None,
    task_id: str | None,
) -> RemoteTaskError:
    return RemoteTaskError(
        message,
        code,
        user_message=user_message,
        remote_traceback=remote_traceback,
        task_id=task_id,
    )


def _summarize_traceback(text: str) -> str:
    """The exception part of a formatted traceback, on one line.

    Skips the frames (``  File ...`` lines and the indented source and caret lines under the
    last of them); what remains is ``ExcType: message``.  Text without frames (the endpoint
    sends ``repr(exc)`` for its internal errors) is returned whole.
    """
    lines = text.strip().splitlines()
    last_frame = max((i for i, ln in enumerate(lines) if ln.startswith("  File ")), default=-1)
    start = last_frame + 1
    if last_frame >= 0:
        while start < len(lines) and lines[start].startswith("    "):
            start += 1
    return " ".join(" ".join(lines[start:]).split())


def pack_function(fn: Callable[..., Any]) -> str:
    """Serialize a function as ``Client.register_function`` does, with source text only.

    The result is the ``function_code`` the SDK sends to the web service:
    ``ComputeSerializer.pack_buffers([PureSourceTextInspect().serialize(fn)])``.  The source
    is ``exec``\\ d once here, in an empty namespace, as the worker will ``exec`` it, so that a
    function that cannot be shipped this way fails at registration, not at its first task.

    :param fn: a module-level function defined with ``def``; its body must import what it uses
    :returns: the packed function code
    :raises TypeError: if ``fn`` is not a plain function
    :raises ValueError: if ``fn`` is a lambda, nested function or method, or its source does
        not define it when run on its own (decorators, defaults naming module globals)
    """
    name = getattr(fn, "__name__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not isinstance(name, str) or isinstance(fn, type):
        raise TypeError(f"expected a function, got {type(fn).__name__}")
    if name == "<lambda>" or qualname != name:
        raise ValueError(
            f"{qualname or name!r} must be a module-level function defined with def "
            "(its source text is shipped and exec'd on its own)"
        )
    serialized = _SERDE.serialize(fn)
    try:
        rebuilt = _SERDE.deserialize(serialized)
    except Exception as exc:
        raise ValueError(
            f"the source of {name!r} does not define it when exec'd on its own "
            f"({type(exc).__name__}: {exc}); remove decorators and keep default values to "
            "literals and builtins"
        ) from exc
    if not callable(rebuilt):
        raise ValueError(f"the source of {name!r} does not define a callable")
    return ComputeSerializer.pack_buffers([serialized])


def pack_task(
    function_code: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    task_id: uuid.UUID | str,
) -> bytes:
    """Pack one task as the SDK (``Batch.add``) and the web service pack it for an endpoint.

    :param function_code: the packed function, as returned by :func:`pack_function`
    :param args: positional arguments; must be JSON-serializable
    :param kwargs: keyword arguments with ``str`` keys; must be JSON-serializable
    :param task_id: the task id the result will carry
    :returns: ``messagepack.pack(Task(task_id=..., task_buffer=function_code + payload))``
    :raises TypeError: if ``args`` is not a list or tuple, or ``kwargs`` has non-str keys
    :raises globus_compute_sdk.errors.SerializationError: if an argument is not
        JSON-serializable (refused here, client side, before anything is sent)
    """
    if not isinstance(args, list | tuple):
        raise TypeError(f"args: expected tuple, got {type(args).__name__}")
    kwargs = dict(kwargs)
    bad_keys = [k for k in kwargs if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"kwargs: expected str keys, got {type(bad_keys[0]).__name__}")
    payload = _SERDE.pack_buffers([_SERDE.serialize(tuple(args)), _SERDE.serialize(kwargs)])
    tid = task_id if isinstance(task_id, uuid.UUID) else uuid.UUID(str(task_id))
    packed: bytes = messagepack.pack(Task(task_id=tid, task_buffer=function_code + payload))
    return packed


def unpack_result(packed_result: bytes) -> Any:
    """Unpack a messagepack ``Result`` from the engine into the function's return value.

    :param packed_result: the bytes an engine future resolves to
    :returns: the deserialized return value (JSON only)
    :raises RemoteTaskError: if the result reports an error (the function raised, or the
        worker refused the task), or the message is not a ``Result``
    """
    msg = messagepack.unpack(packed_result)
    if not isinstance(msg, Result):
        raise RemoteTaskError(
            f"expected a Result message, got {type(msg).__name__}", "UnexpectedMessage"
        )
    if msg.is_error:
        details = msg.error_details
        code = details.code if details is not None else "RemoteExecutionError"
        user_message = details.user_message if details is not None else None
        summary = _summarize_traceback(msg.data) or user_message or "remote task failed"
        raise RemoteTaskError(
            summary,
            code,
            user_message=user_message,
            remote_traceback=msg.data,
            task_id=str(msg.task_id),
        )
    return _SERDE.deserialize(msg.data)


def _process_table() -> list[tuple[int, int, str]] | None:
    """``(pid, pgid, state)`` of every process, from ``/proc``; ``None`` where unavailable."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    table: list[tuple[int, int, str]] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3:
            table.append((int(entry.name), int(fields[2]), fields[0]))
    return table


def _processes() -> dict[int, tuple[int, int, str, str]]:
    """``pid -> (ppid, pgid, state, cmdline)`` of every process from ``/proc`` (or none)."""
    out: dict[int, tuple[int, int, str, str]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3:
            out[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], cmdline)
    return out


class _PoolWatch:
    """Replaces a worker pool that can no longer serve.

    Parsl's pool restarts a dead worker itself (its watchdog looks every heartbeat period and
    fails the task the worker was running with ``WorkerLost``), and the interchange fails the
    tasks of a pool that stopped beating with ``ManagerLost``. What neither sees is a pool
    whose own helper processes were killed with its workers (its queue manager, the
    resource tracker): the pool process lives on and keeps beating, but its watchdog thread
    died on the broken queue, so the killed workers stay zombies, the task never fails and no
    later task runs. This watch counts the live children of each block's pool process; when
    they stay below the most it has seen for ``grace_s`` (longer than Parsl needs to restart
    a worker), or the pool process is gone while others of its block live on, it kills the
    block's process group. The interchange then fails the block's tasks (``ManagerLost``,
    ``heartbeat_threshold`` seconds after the last beat), the killed processes are reaped
    by their parents, and the provider's next status poll lets the scaling strategy start a
    new block.
    """

    def __init__(self, provider: Any, *, grace_s: float, period_s: float = _WATCH_PERIOD_S) -> None:
        self.provider = provider
        self.grace_s = grace_s
        self.period_s = period_s
        self.replaced = 0  # blocks this watch has killed
        self._pgids: dict[str, int] = {}  # job id -> its process group
        self._pools: dict[int, int] = {}  # process group -> its pool process, once seen
        self._strength: dict[int, int] = {}  # pool pid -> most live children seen
        self._short_since: dict[int, float] = {}  # pool pid -> since when below strength
        self._killed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="local-endpoint-pool-watch")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check()
            except Exception:  # never let the watch die: log and look again
                log.exception("the worker pool watch failed; looking again")

    def check(self, now: float | None = None) -> list[int]:
        """One look; returns the process groups killed."""
        now = time.monotonic() if now is None else now
        try:
            jobs = list(getattr(self.provider, "resources", {}).items())
        except RuntimeError:  # changed while copied (a block being submitted): next look
            return []
        table = _processes()
        killed = []
        for job_id, job in jobs:
            pgid = self._pgids.get(job_id)
            if pgid is None:
                pid = job.get("remote_pid")
                if pid is None or int(pid) not in table:
                    continue
                pgid = self._pgids[job_id] = table[int(pid)][1]
            if pgid in self._killed:
                continue
            members = {p: v for p, v in table.items() if v[1] == pgid and v[2] not in "ZX"}
            # The pool process: the member running process_worker_pool whose parent does not
            # (the bash of the submit script only names the script).
            pools = [
                p
                for p, v in members.items()
                if _POOL in v[3] and _POOL not in members.get(v[0], (0, 0, "", ""))[3]
            ]
            reason = None
            if pools:
                pool = self._pools.setdefault(pgid, pools[0])
                if pool not in members:
                    reason = f"its pool process {pool} is gone"
                else:
                    live = sum(1 for v in table.values() if v[0] == pool and v[2] not in "ZX")
                    strength = self._strength[pool] = max(self._strength.get(pool, 0), live)
                    if live >= strength:
                        self._short_since.pop(pool, None)
                    elif now - self._short_since.setdefault(pool, now) > self.grace_s:
                        reason = (
                            f"its pool {pool} has had {live} of its {strength} processes for "
                            f"over {self.grace_s:.0f} s"
                        )
            elif pgid in self._pools and members:
                reason = f"its pool process {self._pools[pgid]} is gone"
            if reason is not None:
                log.warning("worker block %s cannot serve (%s): killing it", job_id, reason)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                self._killed.add(pgid)
                self.replaced += 1
                killed.append(pgid)
        return killed


def _live_groups(pgids: Iterable[int]) -> set[int]:
    """The process groups among ``pgids`` that still have a live (non-zombie) member."""
    wanted = set(pgids)
    table = _process_table()
    if table is not None:
        return {pgid for _pid, pgid, state in table if pgid in wanted and state not in "ZX"}
    live: set[int] = set()
    for pgid in wanted:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        live.add(pgid)
    return live


class LocalEndpoint:
    """An embedded Globus Compute endpoint: the real engine, fed tasks packed as the SDK packs them.

    One :class:`~parsl.providers.LocalProvider` block of ``max_workers`` worker processes,
    launched through the ``globus-compute-endpoint`` executable of the running interpreter's
    environment; every socket is bound to and connects over ``127.0.0.1``.

    **Environment.** Workers inherit the environment of this process (the provider launches
    them with plain ``subprocess``, possibly some time after :meth:`start` returns), so
    :meth:`start` writes ``env`` -- and ``PATH`` with ``Path(sys.executable).parent``
    prepended -- into :data:`os.environ`, and :meth:`shutdown` restores the previous values.
    While started, the whole process therefore sees these variables; run one endpoint with a
    given ``env`` at a time per process.

    :param run_dir: directory for engine logs, submit scripts and the tasks' working directory
        (``<run_dir>/tasks_working_dir``); created if missing
    :param max_workers: worker processes in the block (``max_workers_per_node``)
    :param env: extra environment variables the workers must see
    :param encrypted: CurveZMQ between engine, interchange and workers
    :param strategy_period: seconds between Parsl scaling ticks; the block is launched at the
        first tick, so this bounds the delay before the first task can run
    :param heartbeat_period: seconds between the pool's heartbeats, and between its
        watchdog's looks for dead workers (a dead busy worker fails its task with Parsl's
        ``WorkerLost`` within about this long and is restarted)
    :param heartbeat_threshold: seconds without a heartbeat after which the interchange fails
        a pool's tasks with ``ManagerLost``

    **Lost workers.** A killed worker fails the task it ran (``WorkerLost``, within
    ``heartbeat_period``) and the pool starts another. A pool that cannot recover (its own
    helper processes killed with the workers, or the pool process itself killed) is killed
    whole by a watch thread (see :class:`_PoolWatch`) after ``3 * heartbeat_period + 2``
    seconds; its tasks fail with ``ManagerLost`` ``heartbeat_threshold`` seconds after its
    last heartbeat, and a new block is started at the provider's next status poll (every
    5 s). Tasks are never retried (``max_retries_on_system_failure=0``): a request may have
    run in part, and its caller decides. Three blocks in a row that fail put the engine in
    a failed state (Parsl's windowed block error handler) instead of restarting forever.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_workers: int = 2,
        env: Mapping[str, str] | None = None,
        encrypted: bool = True,
        strategy_period: float = 0.5,
        heartbeat_period: int = HEARTBEAT_PERIOD_S,
        heartbeat_threshold: int = HEARTBEAT_THRESHOLD_S,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if strategy_period <= 0:
            raise ValueError(f"strategy_period must be positive, got {strategy_period}")
        self.run_dir = Path(run_dir).resolve()
        self.max_workers = max_workers
        self.encrypted = encrypted
        self.strategy_period = strategy_period
        if not 1 <= heartbeat_period < heartbeat_threshold:
            raise ValueError(
                "heartbeat_period must be at least 1 and less than heartbeat_threshold, got "
                f"{heartbeat_period} and {heartbeat_threshold}"
            )
        self.heartbeat_period = int(heartbeat_period)
        self.heartbeat_threshold = int(heartbeat_threshold)
        self._watch: _PoolWatch | None = None
        self.endpoint_id = uuid.uuid4()
        self._env = {str(k): str(v) for k, v in (env or {}).items()}
        self._saved_env: dict[str, str | None] = {}
        self._functions: dict[str, str] = {}
        self._engine: GlobusComputeEngine | None = None
        self._pending: set[concurrent.futures.Future[bytes]] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the engine is running."""
        return self._engine is not None

    def start(self) -> None:
        """Set the workers' environment, then start the engine (interchange and scaling).

        Returns once the interchange is up; the worker block is launched at the first scaling
        tick, so the first task waits for it (see :meth:`wait_ready`).

        :raises RuntimeError: if already started or shut down
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("LocalEndpoint was shut down; create a new one")
            if self._engine is not None:
                raise RuntimeError("LocalEndpoint already started")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._apply_env()
            engine = GlobusComputeEngine(
                label="LocalEndpoint",
                provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
                max_workers_per_node=self.max_workers,
                address="127.0.0.1",
                loopback_address="127.0.0.1",
                encrypted=self.encrypted,
                allowed_serializers=list(ALLOWED_SERIALIZERS),
                job_status_kwargs={"strategy_period": self.strategy_period},
                heartbeat_period=self.heartbeat_period,
                heartbeat_threshold=self.heartbeat_threshold,
                max_retries_on_system_failure=0,
                block_error_handler=windowed_error_handler,
            )
            try:
                engine.start(endpoint_id=self.endpoint_id, run_dir=str(self.run_dir))
                self._watch = _PoolWatch(
                    engine.executor.provider, grace_s=3 * self.heartbeat_period + 2
                )
                self._watch.start()
            except BaseException:
                try:
                    engine.shutdown()
                except Exception:
                    log.exception("engine shutdown after a failed start also failed")
                self._restore_env()
                raise
            self._engine = engine
            log.info(
                "LocalEndpoint %s started in %s (%d workers, encrypted=%s)",
                self.endpoint_id,
                self.run_dir,
                self.max_workers,
                self.encrypted,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the worker block has connected to the interchange.

        :param timeout: seconds to wait
        :raises TimeoutError: if no worker connected in time
        :raises RuntimeError: if not started, or the engine reports a failure
        """
        engine = self._require_engine()
        deadline = time.monotonic() + timeout
        while True:
            if engine.executor_exception is not None:
                raise RuntimeError(f"engine failed: {engine.executor_exception!r}")
            managers = engine.get_connected_managers()
            if sum(int(m.get("worker_count", 0)) for m in managers) > 0:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no worker connected within {timeout} s")
            time.sleep(0.05)

    def shutdown(self) -> None:
        """Stop the engine and its worker block, and restore the environment.

        Waits for the block's processes to exit (killing them after a grace period), and
        fails any task still pending with :class:`RuntimeError`.  Idempotent.
        """
        with self._lock:
            self._closed = True
            engine, self._engine = self._engine, None
            if engine is None:
                self._restore_env()
                return
            watch, self._watch = self._watch, None
            if watch is not None:  # before the pool is stopped: its exit is not a failure
                watch.stop()
            pgids = self._block_pgids(engine)
            interchange = getattr(getattr(engine, "executor", None), "interchange_proc", None)
            try:
                engine.shutdown()
            finally:
                self._reap(pgids)
                if interchange is not None:  # Parsl may SIGKILL it without waiting: reap it
                    try:
                        interchange.wait(timeout=_SHUTDOWN_GRACE_S)
                    except subprocess.TimeoutExpired:
                        interchange.kill()
                        interchange.wait(timeout=5)
                # A copy: failing a future runs its done-callback, which discards it from the
                # set it was added to.
                pending, self._pending = list(self._pending), set()
                for fut in pending:
                    with contextlib.suppress(concurrent.futures.InvalidStateError):
                        fut.set_exception(
                            RuntimeError("LocalEndpoint shut down before the task finished")
                        )
                self._restore_env()
            log.info("LocalEndpoint %s shut down", self.endpoint_id)

    def __enter__(self) -> LocalEndpoint:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- functions and tasks ---------------------------------------------------------------

    def register_function(self, fn: Callable[..., Any]) -> str:
        """Register a function, keeping its ``function_code`` as the SDK would send it.

        :param fn: a module-level function (see :func:`pack_function`)
        :returns: a new function id (a uuid4 string)
        """
        return self.register_function_code(pack_function(fn))

    def register_function_code(self, function_code: str) -> str:
        """Register already-packed function code (what the web service receives).

        :param function_code: output of :func:`pack_function` or of the SDK
        :returns: a new function id (a uuid4 string)
        """
        function_id = str(uuid.uuid4())
        self._functions[function_id] = function_code
        return function_id

    def function_code(self, function_id: str) -> str:
        """The packed code registered under ``function_id``.

        :raises KeyError: if the id is unknown
        """
        try:
            return self._functions[function_id]
        except KeyError:
            raise KeyError(f"unknown function id {function_id!r}") from None

    def submit(self, function_id: str, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run a registered function on the endpoint.

        Arguments are packed client side, so a non-JSON-serializable argument raises here and
        nothing is sent.

        :param function_id: an id from :meth:`register_function`
        :returns: a future of the function's return value; if the function raised (or the
            worker refused the task) its exception is a :class:`RemoteTaskError`
        :raises KeyError: if the function id is unknown
        :raises globus_compute_sdk.errors.SerializationError: if an argument is not
            JSON-serializable
        :raises RuntimeError: if the endpoint is not started
        """
        code = self.function_code(function_id)
        task_id = uuid.uuid4()
        packed = pack_task(code, args, kwargs, task_id)
        raw = self.submit_packed(packed, task_id=task_id, function_id=function_id)

        out: concurrent.futures.Future[Any] = concurrent.futures.Future()
        out.set_running_or_notify_cancel()  # the engine cannot cancel a submitted task

        def _relay(done: concurrent.futures.Future[bytes]) -> None:
            try:
                out.set_result(unpack_result(done.result()))
            except BaseException as exc:
                out.set_exception(exc)

        raw.add_done_callback(_relay)
        return out

    def submit_packed(
        self,
        packed_task: bytes,
        *,
        task_id: uuid.UUID | str,
        function_id: str | None = None,
        resource_specification: dict[str, Any] | None = None,
        result_serializers: list[str] | None = None,
    ) -> concurrent.futures.Future[bytes]:
        """Hand an already-packed task to the engine, as the endpoint does with a queued task.

        :param packed_task: ``messagepack.pack(Task(...))``, e.g. from :func:`pack_task`
        :param task_id: the task's id (must match the one inside ``packed_task``)
        :param function_id: the function id, for the engine's bookkeeping
        :param resource_specification: the submitter's resource specification, if any
        :param result_serializers: import paths of the result serializers the submitter
            asked for (default: JSON)
        :returns: a future of the messagepack-packed ``Result`` bytes (see
            :func:`unpack_result`); errors come back inside the ``Result``
        :raises RuntimeError: if the endpoint is not started
        """
        with self._lock:
            engine = self._require_engine()
            fut: concurrent.futures.Future[bytes] = GCFuture(task_id, function_id=function_id)
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            engine.submit(
                fut,
                packed_task,
                resource_specification=resource_specification or {},
                result_serializers=list(result_serializers or RESULT_SERIALIZERS),
            )
        return fut

    def run(self, function_id: str, *args: Any, timeout: float = 120, **kwargs: Any) -> Any:
        """Submit and wait: :meth:`submit` then ``result(timeout)``.

        :raises RemoteTaskError: if the remote function raised
        :raises TimeoutError: if no result within ``timeout`` seconds
        """
        return self.submit(function_id, *args, **kwargs).result(timeout=timeout)

    # -- internals -------------------------------------------------------------------------

    def _require_engine(self) -> GlobusComputeEngine:
        if self._engine is None:
            raise RuntimeError("LocalEndpoint is not started")
        return self._engine

    def _apply_env(self) -> None:
        # Written into this process's environment because the provider launches the workers
        # later with plain subprocess and they inherit it (see the class docstring).
        bin_dir = str(Path(sys.executable).parent)
        wanted = dict(self._env)
        if search_path()[:1] != [bin_dir]:
            wanted["PATH"] = path_with_first(bin_dir)
        for key, previous in set_process_env(wanted).items():
            self._saved_env.setdefault(key, previous)

    def _restore_env(self) -> None:
        saved, self._saved_env = self._saved_env, {}
        restore_process_env(saved)

    @staticmethod
    def _block_pgids(engine: GlobusComputeEngine) -> set[int]:
        pgids: set[int] = set()
        provider = engine.executor.provider
        for job in getattr(provider, "resources", {}).values():
            pid = job.get("remote_pid")
            if pid is None:
                continue
            try:
                pgids.add(os.getpgid(int(pid)))
            except ProcessLookupError:
                continue
        return pgids

    @staticmethod
    def _reap(pgids: set[int]) -> None:
        """Wait for the block process groups to exit; SIGKILL what outlives the grace period."""
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        live = _live_groups(pgids)
        while live and time.monotonic() < deadline:
            time.sleep(0.1)
            live = _live_groups(live)
        for pgid in live:
            log.warning("worker process group %d outlived shutdown; killing it", pgid)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                continue
