"""A loopback stand-in for the Globus Compute web service, for offline tests and demos.

The Globus cloud cannot be reached from here, so this small HTTP service implements the routes
the **unmodified** ``globus_compute_sdk`` ``Client`` and ``Executor`` (4.19) use, delivers
results through a **real RabbitMQ broker**, and runs tasks on **real**
``GlobusComputeEngine`` endpoints (:class:`~tpm_faas.compute.local_endpoint.LocalEndpoint`):

=====================================  ===================================================
``GET  /v2/version``                    the SDK's version check
``POST /v3/functions``                  register a function -> ``function_uuid``
``POST /v3/endpoints/<id>/submit``      a batch of tasks: declare the task group's result
                                        queue, hand each task to the endpoint's engine
``GET  /v2/get_amqp_result_connection_url``  the broker URL and queue prefix
``POST /v2/batch_status``, ``GET /v2/tasks/<id>``  task status and result over HTTP
=====================================  ===================================================

The SDK reaches it with ``Client(local_compute_services=True, authorizer=NullAuthorizer())``,
which talks to ``http://localhost:5000`` (a fixed port: one stand-in per machine at a time).
A task's buffer is the registered function code followed by the submitted payload, packed as
the endpoint's messagepack ``Task``; the engine's packed ``Result`` is published unchanged to
queue ``<prefix><task group id>`` (durable, declared before the submit is answered), which
the SDK's result watcher consumes. Endpoints enforce ``allowed_functions`` as the real
service does (403), and their engines admit JSON and source-text serializers only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tpm_faas.compute.local_endpoint import LocalEndpoint

log = logging.getLogger(__name__)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PORT = 5000  # what ``Client(local_compute_services=True)`` talks to


@dataclass
class _Endpoint:
    endpoint: LocalEndpoint
    allowed_functions: set[str] | None


@dataclass
class _TaskRecord:
    task_id: str
    function_id: str
    endpoint_id: str
    created: float
    status: str = "pending"
    result: str | None = None
    exception: str | None = None
    completed: float | None = None


@dataclass
class _Job:
    kind: str
    name: str
    body: bytes | None = None
    done: threading.Event | None = None
    error: BaseException | None = None


@dataclass
class _Publisher:
    """One thread owns the broker connection (pika is not thread-safe).

    Between jobs it services the connection (heartbeats), so an idle stand-in keeps its
    connection; a job that fails on a dropped connection is retried once on a new one, and a
    caller that waits gets the error.
    """

    url: str
    jobs: queue.Queue[_Job] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def start(self) -> None:
        import pika

        ready = threading.Event()
        params = pika.URLParameters(self.url)
        state: dict[str, Any] = {}

        def connect() -> None:
            old = state.get("conn")
            if old is not None and old.is_open:
                with contextlib.suppress(Exception):
                    old.close()
            state["conn"] = pika.BlockingConnection(params)
            state["ch"] = state["conn"].channel()

        def do(job: _Job) -> None:
            ch = state["ch"]
            if job.kind == "declare":
                ch.queue_declare(job.name, durable=True)
            elif job.kind == "publish":
                props = pika.BasicProperties(timestamp=int(time.time()), delivery_mode=2)
                ch.basic_publish(exchange="", routing_key=job.name, body=job.body, properties=props)
            elif job.kind == "delete":
                ch.queue_delete(job.name)

        def run() -> None:
            try:
                connect()
            except BaseException as e:
                self.error = e
                ready.set()
                return
            ready.set()
            while True:
                try:
                    job = self.jobs.get(timeout=1.0)
                except queue.Empty:
                    try:
                        state["conn"].process_data_events(time_limit=0)  # heartbeats
                    except Exception:
                        log.warning("AMQP connection lost while idle; reconnecting")
                        try:
                            connect()
                        except Exception:
                            log.exception("AMQP reconnect failed")
                    continue
                if job.kind == "stop":
                    with contextlib.suppress(Exception):
                        state["conn"].close()
                    return
                for attempt in (1, 2):
                    try:
                        do(job)
                        job.error = None
                        break
                    except Exception as e:
                        job.error = e
                        if attempt == 1:
                            try:
                                connect()
                            except Exception as e2:
                                job.error = e2
                                break
                if job.error is not None:
                    log.error("AMQP %s of %s failed: %s", job.kind, job.name, job.error)
                if job.done is not None:
                    job.done.set()

        self.thread = threading.Thread(target=run, name="loopback-amqp", daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error is not None:
            raise RuntimeError(f"cannot reach the RabbitMQ broker at {self.url}: {self.error}")

    def call(self, kind: str, name: str, body: bytes | None = None, wait: bool = False) -> None:
        """Queue a job; with ``wait``, block until it is done and raise its error."""
        job = _Job(kind, name, body, threading.Event() if wait else None)
        self.jobs.put(job)
        if job.done is not None:
            if not job.done.wait(30):
                raise TimeoutError(f"AMQP {kind} of {name} did not finish")
            if job.error is not None:
                raise RuntimeError(f"AMQP {kind} of {name} failed: {job.error}")

    def stop(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.jobs.put(_Job("stop", ""))
            self.thread.join(10)


class LoopbackComputeService:
    """The stand-in service (see the module docstring).

    :param amqp_url: the broker results are published to (and that clients are told to use)
    :param port: the HTTP port (the SDK's local services use 5000)
    :param queue_prefix: prefix of the per-task-group result queues
    """

    def __init__(
        self,
        *,
        amqp_url: str = AMQP_URL,
        host: str = "127.0.0.1",
        port: int = PORT,
        queue_prefix: str | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.host, self.port = host, port
        self.queue_prefix = queue_prefix or f"tpm-loopback-{uuid.uuid4().hex[:8]}-"
        self.functions: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, _Endpoint] = {}
        self.tasks: dict[str, _TaskRecord] = {}
        self.queues: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call, for tests
        self._lock = threading.Lock()
        self._publisher = _Publisher(amqp_url)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_endpoint(
        self, endpoint: LocalEndpoint, *, allowed_functions: Iterable[str] | None = None
    ) -> str:
        """Serve tasks for ``endpoint`` (started by the caller); returns its endpoint id."""
        eid = str(endpoint.endpoint_id)
        allowed = None if allowed_functions is None else {str(f) for f in allowed_functions}
        self.endpoints[eid] = _Endpoint(endpoint, allowed)
        return eid

    def allow(self, endpoint_id: str, function_ids: Iterable[str]) -> None:
        """Set an endpoint's ``allowed_functions`` (as its config would)."""
        self.endpoints[endpoint_id].allowed_functions = {str(f) for f in function_ids}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> LoopbackComputeService:
        self._publisher.start()
        service = self

        class Handler(_Handler):
            svc = service

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as e:
            self._publisher.stop()
            raise RuntimeError(f"cannot listen on {self.url}: {e}") from e
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="loopback-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for q in sorted(self.queues):
            try:
                self._publisher.call("delete", q, wait=True)
            except (RuntimeError, TimeoutError) as e:
                log.warning("could not delete result queue %s: %s", q, e)
        self._publisher.stop()

    def __enter__(self) -> LoopbackComputeService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- routes ----------------------------------------------------------------------------
    def register_function(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        code = body.get("function_code")
        if not isinstance(code, str) or not code:
            return 400, _error("BAD_REQUEST", "function_code is required")
        if body.get("serialized") is False:  # raw source: as PureSourceTextInspect packs it
            from globus_compute_sdk.serialize.utils import pack_buffers

            name = str(body.get("function_name") or "f")
            code = pack_buffers([f"st\n{name}:{code}"])
        fid = str(uuid.uuid4())
        with self._lock:
            self.functions[fid] = {**body, "function_code": code}
        return 200, {"function_uuid": fid}

    def submit(self, endpoint_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task

        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            return 404, _error("ENDPOINT_NOT_FOUND", f"endpoint {endpoint_id} not found")
        tasks = body.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            return 400, _error("BAD_REQUEST", "tasks is required")
        for fid in tasks:
            if fid not in self.functions:
                return 404, _error("FUNCTION_NOT_FOUND", f"function {fid} not found")
            if ep.allowed_functions is not None and fid not in ep.allowed_functions:
                return 403, _error(
                    "FUNCTION_NOT_PERMITTED",
                    f"function {fid} is not allowed on endpoint {endpoint_id}",
                )
        group = str(body.get("task_group_id") or uuid.uuid4())
        qname = f"{self.queue_prefix}{group}"
        if body.get("create_queue", True):
            self._publisher.call("declare", qname, wait=True)  # before the reply
            self.queues.add(qname)
        serializers = list(body.get("result_serializers") or [])
        spec = body.get("resource_specification") or {}
        out: dict[str, list[str]] = {}
        for fid, payloads in tasks.items():
            code = self.functions[fid]["function_code"]
            for payload in payloads:
                tid = str(uuid.uuid4())
                out.setdefault(fid, []).append(tid)
                record = _TaskRecord(tid, fid, endpoint_id, time.time())
                with self._lock:
                    self.tasks[tid] = record
                packed = messagepack.pack(Task(task_id=uuid.UUID(tid), task_buffer=code + payload))
                fut = ep.endpoint.submit_packed(
                    packed,
                    task_id=tid,
                    function_id=fid,
                    resource_specification=spec,
                    result_serializers=serializers,
                )
                fut.add_done_callback(
                    lambda f, q=qname, r=record: self._deliver(q, r, f)  # type: ignore[misc]
                )
        reply = {
            "request_id": str(uuid.uuid4()),
            "task_group_id": group,
            "endpoint_id": endpoint_id,
            "tasks": out,
        }
        return 200, reply

    def _deliver(self, qname: str, record: _TaskRecord, fut: Future[bytes]) -> None:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails

        try:
            packed = fut.result()
        except BaseException as e:  # the engine could not run it at all
            packed = messagepack.pack(
                Result(
                    task_id=uuid.UUID(record.task_id),
                    data=f"{type(e).__name__}: {e}",
                    error_details=ResultErrorDetails(
                        code="UNKNOWN_TASK_FAILURE", user_message=str(e)
                    ),
                )
            )
        res: Any = messagepack.unpack(packed)
        with self._lock:
            record.completed = time.time()
            if res.is_error:
                record.status, record.exception = "failed", str(res.data)
            else:
                record.status, record.result = "success", str(res.data)
        self._publisher.call("publish", qname, packed)

    def task_status(self, tid: str) -> dict[str, Any] | None:
        r = self.tasks.get(tid)
        if r is None:
            return None
        out: dict[str, Any] = {"task_id": tid, "status": r.status, "task_group_id": None}
        if r.completed is not None:
            out["completion_t"] = str(r.completed)
            if r.result is not None:
                out["result"] = r.result
            if r.exception is not None:
                out["exception"] = r.exception
        return out


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "error": message, "message": message}


class _Handler(BaseHTTPRequestHandler):
    svc: LoopbackComputeService

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("loopback compute: " + fmt, *args)

    def _send(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            return None

    def do_GET(self) -> None:
        svc = self.svc
        path = self.path.split("?", 1)[0]
        svc.requests.append(("GET", path))
        if path == "/v2/version":
            self._send(200, {"api": "1.2.0", "min_sdk_version": "1.0.0", "min_ep_version": "1.0.0"})
        elif path == "/v2/get_amqp_result_connection_url":
            self._send(200, {"connection_url": svc.amqp_url, "queue_prefix": svc.queue_prefix})
        elif path.startswith("/v2/tasks/"):
            status = svc.task_status(path.rsplit("/", 1)[1])
            if status is None:
                self._send(404, _error("TASK_NOT_FOUND", "unknown task"))
            else:
                self._send(200, status)
        else:
            self._send(404, _error("NOT_FOUND", f"no route GET {path}"))

    def do_POST(self) -> None:
        svc = self.svc
        path = self.path.split("?", 1)[0]
        svc.requests.append(("POST", path))
        body = self._body()
        if not isinstance(body, dict):
            self._send(400, _error("BAD_REQUEST", "the body must be a JSON object"))
            return
        parts = path.strip("/").split("/")
        try:
            if path == "/v3/functions":
                self._send(*svc.register_function(body))
            elif len(parts) == 4 and parts[:2] == ["v3", "endpoints"] and parts[3] == "submit":
                self._send(*svc.submit(parts[2], body))
            elif path == "/v2/batch_status":
                ids = [str(t) for t in body.get("task_ids") or []]
                found = {t: s for t in ids if (s := svc.task_status(t)) is not None}
                self._send(200, {"results": found})
            else:
                self._send(404, _error("NOT_FOUND", f"no route POST {path}"))
        except Exception as e:  # never leave the SDK without an answer
            log.exception("loopback compute: %s failed", path)
            self._send(500, _error("INTERNAL", f"{type(e).__name__}: {e}"))
