"""The client's futures, map, timeouts, structured refusals and retries (issue 16, item 1).

Real site components (``fake_site``: dev tokens, policy, SQLite ledger and its rate buckets)
behind :class:`InProcessTransport`; wrappers around the transport or the shard group inject
delays and failures. Waits between retries go to a fake clock, so nothing here sleeps long.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tpm_faas.client import RequestFuture, TPMClient
from tpm_faas.config import POLICIES
from tpm_faas.errors import (
    RateLimited,
    RemoteError,
    ShardGroupError,
    ShardTimeout,
    TaskTimeout,
    TPMError,
)
from tpm_faas.gateway.ledger import CONCURRENCY_RETRY_S, Ledger
from tpm_faas.gateway.pipeline import Gateway, respond
from tpm_faas.gateway.ratelimit import RateLimiter
from tpm_faas.policy import Limits
from tpm_faas.protocol.replies import ErrorRecord, ErrorReply
from tpm_faas.registry import GroupEntry
from tpm_faas.testing import FakeShard, InProcessTransport, fake_site


class Clock:
    """A fake clock for the rate buckets and the client: ``sleep`` moves it on."""

    def __init__(self) -> None:
        self.t = 10_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


class Recording:
    """Wraps a transport: counts submissions and requests in flight, and can delay each
    call, fail it before it runs (``lose``) or after it ran (``lose_after``)."""

    def __init__(self, inner: Any, delay: Any = None) -> None:
        self.inner = inner
        self.delay = delay
        self.sent: list[dict[str, Any]] = []
        self.lose: list[BaseException] = []
        self.lose_after: list[BaseException] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
        request = json.loads(request_json)
        with self._lock:
            self.sent.append(request)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.delay is not None:
                time.sleep(self.delay(request))
            if self.lose:
                return _failed(self.lose.pop(0))
            fut: Future[str] = self.inner.submit(mode, request_json, token)
            if self.lose_after:
                fut.result()  # it ran (and was charged); then the worker is lost
                return _failed(self.lose_after.pop(0))
            return fut
        finally:
            with self._lock:
                self.running -= 1


def _failed(e: BaseException) -> Future[str]:
    fut: Future[str] = Future()
    fut.set_exception(e)
    return fut


class WorkerLost(Exception):
    """What Globus Compute reports for a task whose worker died (its remote traceback)."""

    def __init__(self) -> None:
        self.remote_data = "parsl.executors.high_throughput.errors.WorkerLost: Task failure"
        super().__init__(self.remote_data)


@dataclass
class Flaky:
    """A shard group that fails its first calls with ``failures``, then answers."""

    failures: list[TPMError]
    inner: FakeShard = field(default_factory=FakeShard)
    ids: list[str] = field(default_factory=list)

    def call(
        self, group: GroupEntry, op: str, body: dict[str, Any], *, request_id: str
    ) -> dict[str, Any]:
        self.ids.append(request_id)
        if self.failures:
            raise self.failures.pop(0)
        return self.inner.call(group, op, body, request_id=request_id)


@pytest.fixture
def site(tmp_path: Path) -> tuple[Gateway, dict[str, str]]:
    gw, tokens, _ = fake_site(tmp_path)
    return gw, tokens


def _client(gw: Gateway, tokens: dict[str, str], transport: Any = None, **kw: Any) -> TPMClient:
    kw.setdefault("sleep", lambda s: None)  # backoffs are not waited for here
    return TPMClient(transport or InProcessTransport(gw), token=tokens["dev"], **kw)


def _books(gw: Gateway) -> tuple[int, int]:
    """(SU charged to demo, posted charges) — and the books balance, nothing left held."""
    assert gw.ledger.open_holds() == [] and gw.ledger.reconcile().ok
    return gw.ledger.balance("demo").charged, len(gw.ledger.charges("demo"))


# -- futures and map --------------------------------------------------------------------------


def test_submit_returns_futures_and_the_blocking_calls_stay(site: Any) -> None:
    gw, tokens = site
    with _client(gw, tokens) as client:
        futures = [
            client.submit_generate("And God said", max_new_tokens=3),
            client.submit_embed(prompts=["In the beginning"]),
            client.submit_intervene(
                "And God said", [{"op": "save", "site": "blocks.0.hook_resid_post"}]
            ),
        ]
        assert all(isinstance(f, Future) and isinstance(f, RequestFuture) for f in futures)
        gen, emb, itv = (f.result(timeout=30) for f in futures)
        assert gen.text == "xxx" and gen.request_id == futures[0].request_id
        assert emb.tensor().shape == (1, 256)
        assert itv.saved["blocks.0.hook_resid_post"].shape[0] == 13
        # The blocking methods are the same requests, waited for.
        assert client.generate("And God said", max_new_tokens=2).text == "xx"
        assert client.embed(prompts="x").mode == "embed"
        assert "submit_generate" in (TPMClient.generate.__doc__ or "")
    assert _books(gw)[1] == 5


def test_map_keeps_input_order_and_at_most_max_concurrent_in_flight(site: Any) -> None:
    gw, tokens = site
    # Later inputs answer sooner: the results still come back in input order.
    slow = Recording(
        InProcessTransport(gw), delay=lambda r: 0.02 * max(0, 12 - r["max_new_tokens"])
    )
    with _client(gw, tokens, slow, max_concurrent=3) as client:
        inputs = [{"prompts": f"p{k}", "max_new_tokens": k} for k in range(1, 11)]
        results = client.map("generate", inputs)
        assert not isinstance(results, list)  # an iterator, as Executor.map gives
        assert [r.text for r in results] == ["x" * k for k in range(1, 11)]
        assert slow.most == 3
        # Plain inputs are the first argument; common keywords go to every request.
        again = list(client.map(client.generate, ["a", "b"], max_new_tokens=1))
        assert [r.text for r in again] == ["x", "x"]
        ops = [{"op": "save", "site": "blocks.1.hook_resid_post"}]
        lens = list(client.map("intervene", ["a", "bb"], ops=ops))
        assert [r.saved["blocks.1.hook_resid_post"].shape[0] for r in lens] == [2, 3]
        assert [r.mode for r in client.map("query", ["a"])] == ["query"]
    with pytest.raises(ValueError, match="generate"):
        client.map("replay", ["a"])


def test_map_raises_an_error_where_its_input_comes(site: Any) -> None:
    gw, tokens = site
    with _client(gw, tokens, max_concurrent=1) as client:
        it = client.map("generate", [{"prompts": "a"}, {"prompts": "b", "max_new_tokens": 10**6}])
        assert next(it).text == "x" * 64
        with pytest.raises(RemoteError) as info:
            next(it)
        assert info.value.code == "bad_request"


def test_asyncio_awaits_a_future(site: Any) -> None:
    gw, tokens = site
    with _client(gw, tokens) as client:

        async def both() -> list[str]:
            futures = [client.submit_generate(p, max_new_tokens=2) for p in ("a", "b")]
            done = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            return [r.text for r in done]

        assert asyncio.run(both()) == ["xx", "xx"]


# -- timeouts ---------------------------------------------------------------------------------


class Silent:
    """A transport whose tasks never answer; its futures name a Compute task id."""

    def __init__(self) -> None:
        self.sent = 0

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
        self.sent += 1
        fut: Future[str] = Future()
        fut.task_id = "task-123"  # type: ignore[attr-defined]  # as ComputeFuture has
        return fut


def test_a_timed_out_call_names_its_request_and_task_and_is_not_resent() -> None:
    silent = Silent()
    client = TPMClient(silent, timeout_s=0.05)
    fut = client.submit_generate("x")
    with pytest.raises(TaskTimeout) as info:
        fut.result(timeout=10)
    err = info.value
    assert isinstance(err, TimeoutError) and isinstance(err, RemoteError)
    assert err.code == "client_timeout" and err.exit_code == 8
    assert err.request_id == fut.request_id and err.task_id == "task-123"
    assert fut.request_id in err.message and "task-123" in err.message
    assert silent.sent == 1  # the task may still run: never sent again
    # The deadline cuts the wait short too.
    t0 = time.monotonic()
    with pytest.raises(TaskTimeout, match=r"within 0\.1 s"):
        TPMClient(silent, timeout_s=60).generate("x", deadline_s=0.1)
    assert time.monotonic() - t0 < 5
    client.close()


# -- structured refusals ----------------------------------------------------------------------


def test_rate_limiter_refusals_carry_retry_after_and_the_limit(tmp_path: Path) -> None:
    clock = Clock()
    rl = RateLimiter(Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}").engine, clock=clock)
    lim = Limits(requests_per_min=3, tokens_per_min=1000, group_requests_per_min=100)
    for _ in range(3):
        rl.admit("g", "alice", lim, tokens=10)
    with pytest.raises(RateLimited, match=r"retry in 20\.0 s") as info:
        rl.admit("g", "alice", lim, tokens=10)
    assert (info.value.retry_after_s, info.value.limit) == (20.0, "requests_per_min")
    clock.t += 60
    rl.admit("g", "bob", lim, tokens=900)
    with pytest.raises(RateLimited) as info:
        rl.admit("g", "bob", lim, tokens=300)  # 200 tokens short at 1000/min: 12 s
    assert (info.value.retry_after_s, info.value.limit) == (12.0, "tokens_per_min")
    with pytest.raises(RateLimited, match="the limit is 1000") as info:
        rl.admit("g", "carol", lim, tokens=1200)  # never passes: no retry_after_s
    assert (info.value.retry_after_s, info.value.limit) == (None, "tokens_per_min")
    record = info.value.to_record("r-1")
    assert record["limit"] == "tokens_per_min" and "retry_after_s" not in record


def test_refusal_fields_cross_the_boundary_and_other_records_stay_as_they_were(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    text = (POLICIES / "local-dev.yaml").read_text()
    policy.write_text(text.replace("max_concurrent: 64", "max_concurrent: 1"))
    gw, tokens, _ = fake_site(tmp_path, policy)
    gw.ledger.hold("in-flight", "demo", 10, ttl_s=60, identity="dev@localhost")
    body = json.dumps({"model": "demo-tpm@1", "prompt": "x", "request_id": "r-1"})
    reply = json.loads(respond(gw, "query", body, tokens["dev"]))
    assert reply["error"] == {
        "type": "RateLimited",
        "code": "rate_limited",
        "layer": "rate_limit",
        "message": "you have 1 requests running; your group allows 1 at once",
        "request_id": "r-1",
        "retry_after_s": CONCURRENCY_RETRY_S,
        "limit": "max_concurrent",
    }
    err = RemoteError.from_record(ErrorReply.model_validate(reply).error.model_dump())
    assert (err.retry_after_s, err.limit, err.request_id) == (1.0, "max_concurrent", "r-1")
    # An error without them is the record it always was (no new keys, not even null ones).
    plain = json.loads(respond(gw, "query", "{", tokens["dev"]))["error"]
    assert set(plain) == {"type", "code", "layer", "message", "request_id"}
    assert set(ErrorRecord(code="x").model_dump()) == set(plain)
    assert RemoteError.from_record(plain).retry_after_s is None


# -- retries ----------------------------------------------------------------------------------


def _rate_limited_site(tmp_path: Path, clock: Clock) -> tuple[Gateway, dict[str, str]]:
    policy = tmp_path / "policy.yaml"
    text = (POLICIES / "local-dev.yaml").read_text()
    policy.write_text(text.replace("requests_per_min: 6000", "requests_per_min: 2"))
    gw, tokens, _ = fake_site(tmp_path, policy)
    gw.limiter = RateLimiter(gw.ledger.engine, clock=clock)
    return gw, tokens


def test_rate_limited_is_waited_out_and_sent_again(tmp_path: Path) -> None:
    clock = Clock()
    gw, tokens = _rate_limited_site(tmp_path, clock)
    record = Recording(InProcessTransport(gw))
    client = _client(gw, tokens, record, sleep=clock.sleep, clock=clock)
    texts = [r.text for r in client.map("generate", ["a", "b", "c"], max_new_tokens=1)]
    assert texts == ["x", "x", "x"]
    # 2 per minute: the third waited its retry_after_s (30 s, plus at most 1 s of jitter).
    assert len(clock.sleeps) == 1 and 30.0 <= clock.sleeps[0] <= 31.0
    ids = Counter(r["request_id"] for r in record.sent)  # resent with the same request id
    assert sorted(ids.values()) == [1, 1, 2]
    assert _books(gw)[1] == 3
    client.close()


def test_rate_limited_beyond_the_deadline_or_with_retries_off_is_raised(tmp_path: Path) -> None:
    clock = Clock()
    gw, tokens = _rate_limited_site(tmp_path, clock)
    client = _client(gw, tokens, sleep=clock.sleep, clock=clock)
    client.generate("a", max_new_tokens=1)
    client.generate("b", max_new_tokens=1)
    with pytest.raises(RemoteError) as info:
        client.generate("c", max_new_tokens=1, deadline_s=10)  # the wait is 30 s
    assert info.value.code == "rate_limited" and clock.sleeps == []
    assert info.value.retry_after_s == 30.0 and info.value.limit == "requests_per_min"
    assert "retry in 30.0 s" in info.value.message  # the text is as it was
    with pytest.raises(RemoteError, match="rate_limited"):
        _client(gw, tokens, retries=0, sleep=clock.sleep, clock=clock).generate("c")
    assert clock.sleeps == []


def test_a_shard_failure_is_resent_with_the_same_id_and_charged_once(tmp_path: Path) -> None:
    flaky = Flaky([ShardTimeout("no answer"), ShardGroupError("rank 0 is gone")])
    gw, tokens, _ = fake_site(tmp_path)
    gw.shards = flaky
    sleeps: list[float] = []
    before = _books(gw)
    r = _client(gw, tokens, sleep=sleeps.append).generate("a", max_new_tokens=2)
    assert r.text == "xx" and flaky.ids == [r.request_id] * 3
    # Exponential backoff with jitter: 0.5 s then 1 s, each plus up to 0.5 s.
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 1.5
    charged, posts = _books(gw)
    assert posts == before[1] + 1 and charged - before[0] == round(r.usage.su * 1e6)
    # retries=0: the first failure is the caller's.
    gw.shards = Flaky([ShardTimeout("no answer")])
    with pytest.raises(RemoteError) as info:
        _client(gw, tokens, retries=0).generate("a")
    assert info.value.code == "shard_timeout"
    # Retries run out: the last error is raised.
    gw.shards = Flaky([ShardTimeout("no answer")] * 3)
    with pytest.raises(RemoteError, match="shard_timeout"):
        _client(gw, tokens, retries=2).generate("a")
    assert _books(gw)[1] == posts


def test_a_lost_worker_is_resent_and_a_charged_one_is_never_charged_twice(site: Any) -> None:
    gw, tokens = site
    record = Recording(InProcessTransport(gw))
    client = _client(gw, tokens, record)
    before = _books(gw)[1]
    record.lose.append(WorkerLost())  # lost before it ran: sent again, runs once
    assert client.generate("a", max_new_tokens=1).text == "x"
    assert len(record.sent) == 2 and _books(gw)[1] == before + 1
    record.lose_after.append(WorkerLost())  # lost after its charge: the resend is refused
    with pytest.raises(RemoteError) as info:
        client.generate("b", max_new_tokens=1)
    err = info.value
    assert err.code == "duplicate_request"
    assert isinstance(err.__cause__, RemoteError) and err.__cause__.code == "task_failed"
    assert any("may have been charged" in n for n in getattr(err, "__notes__", []))
    assert _books(gw)[1] == before + 2  # charged once


def test_failures_a_resend_cannot_help_are_raised_at_once(site: Any) -> None:
    gw, tokens = site
    record = Recording(InProcessTransport(gw))
    client = _client(gw, tokens, record)
    cases: list[tuple[Any, str]] = [
        (lambda: client.generate("a", max_new_tokens=10**6), "bad_request"),
        (lambda: client.generate("a", model="nope@1"), "unknown_model"),
        (lambda: TPMClient(record, token=tokens["broke"]).generate("a"), "insufficient_su"),
    ]
    for call, code in cases:
        n = len(record.sent)
        with pytest.raises(RemoteError) as info:
            call()
        assert info.value.code == code and len(record.sent) == n + 1, code
    # A task the endpoint refused (not a lost worker, not a network error): not resent.
    record.lose.append(PermissionError("function not allowed on this endpoint"))
    n = len(record.sent)
    with pytest.raises(RemoteError, match="not allowed") as info:
        client.generate("a")
    assert info.value.code == "task_failed" and len(record.sent) == n + 1
    # A service that cannot be reached is resent.
    record.lose.append(ConnectionError("connection refused"))
    assert client.generate("a", max_new_tokens=1).text == "x"
