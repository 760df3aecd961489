"""Token buckets in the ledger database: refill, reserve and refund, shared across workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm_faas.errors import RateLimited
from tpm_faas.gateway.ledger import Ledger
from tpm_faas.gateway.ratelimit import RateLimiter
from tpm_faas.policy import Limits


class Clock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'l.sqlite'}"


def test_requests_per_minute_refill(url: str, clock: Clock) -> None:
    rl = RateLimiter(Ledger(url).engine, clock=clock)
    lim = Limits(requests_per_min=3)
    for _ in range(3):
        rl.admit("g", "alice", lim, tokens=10)
    with pytest.raises(RateLimited, match=r"over 3 requests per minute \(for you\); retry in 20"):
        rl.admit("g", "alice", lim, tokens=10)
    rl.admit("g", "bob", lim, tokens=10)  # buckets are per identity
    clock.t += 20  # one request's worth refills
    rl.admit("g", "alice", lim, tokens=10)
    with pytest.raises(RateLimited):
        rl.admit("g", "alice", lim, tokens=10)


def test_tokens_are_reserved_then_refunded(url: str, clock: Clock) -> None:
    rl = RateLimiter(Ledger(url).engine, clock=clock)
    lim = Limits(tokens_per_min=1000)
    r = rl.admit("g", "alice", lim, tokens=800)  # input + max_new_tokens
    with pytest.raises(RateLimited, match="tokens per minute"):
        rl.admit("g", "alice", lim, tokens=300)
    rl.settle(r, used_tokens=100)  # 700 unused come back
    rl.admit("g", "alice", lim, tokens=800)
    with pytest.raises(RateLimited, match="needs 1200 tokens; the limit is 1000"):
        rl.admit("g", "alice", lim, tokens=1200)


def test_group_bucket_is_shared_and_a_refusal_takes_nothing(url: str, clock: Clock) -> None:
    rl = RateLimiter(Ledger(url).engine, clock=clock)
    lim = Limits(requests_per_min=10, group_requests_per_min=2)
    rl.admit("g", "alice", lim, tokens=1)
    rl.admit("g", "bob", lim, tokens=1)
    with pytest.raises(RateLimited, match="for your group"):
        rl.admit("g", "carol", lim, tokens=1)
    # carol's own bucket was not debited by the refused request (all or nothing)
    clock.t += 30
    for _ in range(1):
        rl.admit("g", "carol", lim, tokens=1)


def test_two_workers_share_the_buckets(url: str, clock: Clock) -> None:
    a = RateLimiter(Ledger(url).engine, clock=clock)
    b = RateLimiter(Ledger(url).engine, clock=clock)
    lim = Limits(requests_per_min=2)
    a.admit("g", "alice", lim, tokens=1)
    b.admit("g", "alice", lim, tokens=1)
    with pytest.raises(RateLimited):
        a.admit("g", "alice", lim, tokens=1)


def test_no_limits_no_buckets(url: str, clock: Clock) -> None:
    rl = RateLimiter(Ledger(url).engine, clock=clock)
    for _ in range(100):
        rl.settle(rl.admit("g", "alice", Limits(), tokens=10**9), 0)


def test_a_request_refused_later_gives_its_request_back(url: str, clock: Clock) -> None:
    rl = RateLimiter(Ledger(url).engine, clock=clock)
    lim = Limits(requests_per_min=1, tokens_per_min=100)
    r = rl.admit("g", "alice", lim, tokens=60)
    rl.settle(r, 0, refused=True)  # e.g. the ledger refused the hold
    rl.settle(rl.admit("g", "alice", lim, tokens=100), 100)  # both buckets were full again
    with pytest.raises(RateLimited):
        rl.admit("g", "alice", lim, tokens=1)
