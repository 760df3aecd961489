"""The embedded local endpoint: the real GlobusComputeEngine, tasks packed as the SDK packs them.

Starts real processes on loopback (interchange + one LocalProvider block of workers).
Latencies are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Task
from globus_compute_sdk.errors import SerializationError
from globus_compute_sdk.serialize import (
    ComputeSerializer,
    DillCode,
    DillDataBase64,
    PureSourceTextInspect,
)

from tpm_faas.compute.local_endpoint import (
    LocalEndpoint,
    RemoteTaskError,
    pack_function,
    pack_task,
    unpack_result,
)

pytestmark = pytest.mark.integration

ENV_MARKER = "TPM_FAAS_LOCAL_ENDPOINT_TEST"
TASK_TIMEOUT = 120.0


def _load_funcs() -> ModuleType:
    """Import ``_gc_funcs.py`` by path, whatever the tests' package layout."""
    name = "_tpm_faas_gc_funcs"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_gc_funcs.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


funcs = _load_funcs()


def _engine_processes(run_dir: Path) -> dict[int, str]:
    """Live worker-pool processes of ``run_dir`` and interchanges that are our children, by pid.

    Keyed by pid: a process's state column (``S``/``R``) changes between two snapshots, so
    whole ``ps`` lines would make a busy, old process look new.  ``-ww``: without it ps cuts
    ``args`` to the terminal width (80 columns under pytest), which hides the run directory
    in the worker pool's command line.
    """
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in out.splitlines():
        pid, ppid, stat, args = line.split(None, 3)
        if stat.startswith("Z") or int(pid) == os.getpid():
            continue
        is_pool = "process_worker_pool" in args and str(run_dir) in args
        # the interchange retitles itself "parsl: HTEX interchange"
        is_ix = "interchange" in args and int(ppid) == os.getpid()
        if is_pool or is_ix:
            found[int(pid)] = args
    return found


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One started endpoint for the module, with the cold first-task latency measured."""
    run_dir = tmp_path_factory.mktemp("local_ep")
    ep = LocalEndpoint(run_dir, max_workers=2, env={ENV_MARKER: "seen-by-worker"})
    t0 = time.perf_counter()
    ep.start()
    t_started = time.perf_counter()
    fid = ep.register_function(funcs.echo_upper)
    first = ep.run(fid, "warm", timeout=TASK_TIMEOUT)
    t_first = time.perf_counter()
    print(
        f"\n[local-endpoint] start() {t_started - t0:.2f} s; "
        f"first task {t_first - t0:.2f} s after start() ({first!r})"
    )
    try:
        yield {"ep": ep, "echo_id": fid, "run_dir": run_dir}
    finally:
        ep.shutdown()
    assert ENV_MARKER not in os.environ


def test_round_trip(endpoint: dict[str, Any]) -> None:
    ep: LocalEndpoint = endpoint["ep"]
    text, _, pid = ep.run(endpoint["echo_id"], "hello", timeout=TASK_TIMEOUT).partition("|")
    assert text == "HELLO"
    assert int(pid) != os.getpid()  # ran in a worker process

    add_id = ep.register_function(funcs.add)
    assert ep.run(add_id, 2, b=3, timeout=TASK_TIMEOUT) == {"sum": 5, "args": [2, 3]}


def test_env_reaches_workers(endpoint: dict[str, Any]) -> None:
    ep: LocalEndpoint = endpoint["ep"]
    fid = ep.register_function(funcs.read_env)
    assert ep.run(fid, ENV_MARKER, timeout=TASK_TIMEOUT) == "seen-by-worker"


def test_remote_exception_is_remote_task_error(endpoint: dict[str, Any]) -> None:
    ep: LocalEndpoint = endpoint["ep"]
    fid = ep.register_function(funcs.boom)
    fut = ep.submit(fid, "xyz")
    exc = fut.exception(timeout=TASK_TIMEOUT)
    assert isinstance(exc, RemoteTaskError)
    assert str(exc) == "ValueError: boom: refused 'xyz'"
    assert exc.code == "RemoteExecutionError"
    assert exc.user_message  # error_details.user_message, shown to users
    assert exc.remote_traceback is not None and "in boom" in exc.remote_traceback
    with pytest.raises(RemoteTaskError, match="boom: refused 'abc'"):
        ep.run(fid, "abc", timeout=TASK_TIMEOUT)


def test_non_json_argument_refused_client_side(endpoint: dict[str, Any]) -> None:
    ep: LocalEndpoint = endpoint["ep"]
    pending_before = len(ep._pending)
    with pytest.raises(SerializationError):
        ep.submit(endpoint["echo_id"], {1, 2, 3})
    with pytest.raises(SerializationError):
        ep.submit(endpoint["echo_id"], s=object())
    with pytest.raises(TypeError):
        pack_task(ep.function_code(endpoint["echo_id"]), ["ok"], {1: "x"}, uuid.uuid4())
    assert len(ep._pending) == pending_before  # nothing reached the engine


def test_pickled_payloads_refused_by_engine(endpoint: dict[str, Any]) -> None:
    """Tasks serialized with dill are rejected by the engine's allowed_serializers."""
    ep: LocalEndpoint = endpoint["ep"]
    fid = endpoint["echo_id"]

    # SDK-default data strategy (dill) for the arguments, source text for the function
    dill_data = ComputeSerializer(strategy_code=PureSourceTextInspect, strategy_data=DillDataBase64)
    payload = dill_data.pack_buffers([dill_data.serialize(("x",)), dill_data.serialize({})])
    tid = uuid.uuid4()
    packed = messagepack.pack(Task(task_id=tid, task_buffer=ep.function_code(fid) + payload))
    raw = ep.submit_packed(packed, task_id=tid, function_id=fid).result(timeout=TASK_TIMEOUT)
    with pytest.raises(RemoteTaskError, match="DillDataBase64 disabled") as info:
        unpack_result(raw)
    assert "Allowed serializers: JSONData, PureSourceTextInspect" in info.value.message

    # pickled function (DillCode), JSON arguments
    dill_code = ComputeSerializer(strategy_code=DillCode)
    code = dill_code.pack_buffers([dill_code.serialize(funcs.echo_upper)])
    tid = uuid.uuid4()
    raw = ep.submit_packed(pack_task(code, ["x"], {}, tid), task_id=tid).result(
        timeout=TASK_TIMEOUT
    )
    with pytest.raises(RemoteTaskError, match="DillCode disabled"):
        unpack_result(raw)


def test_unshippable_functions_refused_at_registration(endpoint: dict[str, Any]) -> None:
    def nested(s: str) -> str:
        return s

    with pytest.raises(ValueError, match="module-level"):
        pack_function(nested)
    with pytest.raises(ValueError, match="module-level"):
        pack_function(lambda s: s)
    with pytest.raises(TypeError):
        pack_function(ComputeSerializer)
    with pytest.raises(ValueError, match="does not define it"):
        pack_function(_decorated)
    with pytest.raises(ValueError, match="does not define it"):
        pack_function(_module_default)


# Neither survives being exec'd alone, as the worker execs it: the decorator and the default
# name module globals.  (Annotations are fine: the SDK execs with postponed evaluation.)
@functools.lru_cache
def _decorated(s: str) -> str:
    return s


_SEP = "|"


def _module_default(s: str, sep: str = _SEP) -> str:
    return s + sep


def test_latency(endpoint: dict[str, Any]) -> None:
    """Per-task round trip over 20 sequential tasks, then 20 in flight at once (printed)."""
    ep: LocalEndpoint = endpoint["ep"]
    fid = endpoint["echo_id"]
    n = 20
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        assert ep.run(fid, f"t{i}", timeout=TASK_TIMEOUT).startswith(f"T{i}|")
        samples.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    futures = [ep.submit(fid, f"c{i}") for i in range(n)]
    results = [f.result(timeout=TASK_TIMEOUT) for f in futures]
    burst = time.perf_counter() - t0
    assert [r.partition("|")[0] for r in results] == [f"C{i}" for i in range(n)]
    ms = sorted(s * 1000 for s in samples)
    print(
        f"\n[local-endpoint] sequential round trip over {n} tasks: "
        f"median {statistics.median(ms):.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms; "
        f"{n} concurrent: {burst * 1000:.0f} ms total ({burst * 1000 / n:.1f} ms/task)"
    )


def test_shutdown_leaves_no_processes(tmp_path: Path) -> None:
    run_dir = (tmp_path / "ep").resolve()
    before = set(_engine_processes(run_dir))  # pids, e.g. the module endpoint's interchange
    with LocalEndpoint(run_dir, max_workers=1) as ep:
        fid = ep.register_function(funcs.echo_upper)
        assert ep.run(fid, "x", timeout=TASK_TIMEOUT).startswith("X|")
        now = _engine_processes(run_dir)
        ours = [now[pid] for pid in now.keys() - before]
        assert any("process_worker_pool" in p for p in ours), ours
        assert any("interchange" in p for p in ours), ours
    left = _engine_processes(run_dir)
    assert {pid: left[pid] for pid in left.keys() - before} == {}
    with pytest.raises(RuntimeError, match="not started"):
        ep.submit(fid, "late")
    ep.shutdown()  # idempotent


def test_shutdown_fails_pending_tasks_and_stops_cleanly(tmp_path: Path) -> None:
    """Shutdown with tasks in flight fails them and stops everything (issue 12, defect 7:
    failing a future ran its callback, which changed the set being iterated)."""
    run_dir = (tmp_path / "ep").resolve()
    before = set(_engine_processes(run_dir))
    ep = LocalEndpoint(run_dir, max_workers=1)
    ep.start()
    fid = ep.register_function(funcs.nap)
    assert ep.run(fid, 0.0, timeout=TASK_TIMEOUT) == 0.0
    slow = [ep.submit(fid, 30.0) for _ in range(3)]
    ep.shutdown()
    for fut in slow:
        with pytest.raises(RuntimeError, match="shut down before the task finished"):
            fut.result(timeout=10)
    left = _engine_processes(run_dir)
    assert {pid: left[pid] for pid in left.keys() - before} == {}


def nap_and_say(path: str, seconds: float) -> int:
    """Write this worker's pid to ``path``, then sleep (shipped as source text)."""
    import os
    import time

    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


def test_a_killed_busy_worker_fails_its_task_and_is_replaced(tmp_path: Path) -> None:
    """Issue 12, defect 6 (one worker): SIGKILL of the worker running a task fails that task
    with Parsl's WorkerLost within seconds (the pool's watchdog looks every heartbeat
    period), the pool starts another worker, nothing is left a zombie, and the next task
    runs."""
    run_dir = (tmp_path / "ep").resolve()
    before = set(_engine_processes(run_dir))
    with LocalEndpoint(run_dir, max_workers=1) as ep:
        fid = ep.register_function(nap_and_say)
        say = tmp_path / "pid"
        assert ep.run(fid, str(say), 0.0, timeout=TASK_TIMEOUT) > 0  # warm
        say.unlink()
        fut = ep.submit(fid, str(say), 60.0)
        deadline = time.monotonic() + TASK_TIMEOUT
        while not say.exists() or not say.read_text():
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)
        victim = int(say.read_text())
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        exc = fut.exception(timeout=30)
        waited = time.monotonic() - t0
        assert isinstance(exc, RemoteTaskError), exc
        assert "WorkerLost" in str(exc) or "ManagerLost" in str(exc), exc
        assert waited < 8, waited  # Parsl's default heartbeat period (30 s) looks too late
        print(f"\n[local-endpoint] killed worker reported after {waited:.1f} s")
        say.unlink()
        again = ep.run(fid, str(say), 0.0, timeout=TASK_TIMEOUT)
        assert again != victim
        gone = _pid_state(victim)
        assert gone is None, f"the killed worker is still there ({gone})"
    left = _engine_processes(run_dir)
    assert {pid: left[pid] for pid in left.keys() - before} == {}


def _pid_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``Z``: a zombie), or ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]
