"""Rate limits: token buckets per identity and per group, shared by every worker of a site.

A bucket of capacity ``C`` per minute refills continuously at ``C / 60`` per second. Admission
takes one request from the caller's request buckets and reserves ``input + max_new_tokens``
from the token buckets; when the request ends, the unused part of the reservation is given
back. A refusal names the limit it hit (``RateLimited.limit``: the policy field, e.g.
``requests_per_min``) and, when waiting can lift it, how long until the bucket holds enough
(``RateLimited.retry_after_s``). Buckets live in a table of the ledger's database and each
take is one conditional ``UPDATE`` (refill, check and debit in one statement), so every
endpoint worker process sees the same buckets and two workers cannot both take the last
token. The clock is injectable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from tpm_faas.errors import RateLimited
from tpm_faas.policy import Limits

metadata = sa.MetaData()
buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("level", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
_k = buckets.c


def _refilled(capacity: float, per_s: float) -> sa.ColumnElement[float]:
    """The bucket's level now: its stored level plus the refill since, at most ``capacity``."""
    elapsed: sa.ColumnElement[float] = sa.bindparam("now") - _k.updated_at
    # A take that waited for a lock may see a later update: never refill backwards.
    grown = _k.level + sa.case((elapsed < 0, 0.0), else_=elapsed) * per_s
    return sa.case((grown > capacity, capacity), else_=grown)


@dataclass(frozen=True)
class Bucket:
    key: str
    per_min: int
    #: The policy limit this bucket enforces (a field of :class:`~tpm_faas.policy.Limits`).
    limit: str = ""

    @property
    def per_s(self) -> float:
        return self.per_min / 60.0


@dataclass(frozen=True)
class Reservation:
    """What one admitted request took: refund the unused tokens with :meth:`RateLimiter.settle`."""

    token_buckets: tuple[Bucket, ...]
    reserved_tokens: int
    request_buckets: tuple[Bucket, ...] = ()


class RateLimiter:
    """Token buckets in the table ``rate_buckets`` of ``engine``'s database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._clock = clock
        metadata.create_all(engine)

    def admit(self, group: str, identity: str, limits: Limits, tokens: int) -> Reservation:
        """Take one request and ``tokens`` tokens, or raise :class:`RateLimited` naming the
        limit and when to retry (nothing is taken then)."""
        req = [
            b
            for b in (
                Bucket(
                    f"req:id:{group}:{identity}", limits.requests_per_min or 0, "requests_per_min"
                ),
                Bucket(
                    f"req:group:{group}",
                    limits.group_requests_per_min or 0,
                    "group_requests_per_min",
                ),
            )
            if b.per_min
        ]
        tok = [
            b
            for b in (
                Bucket(f"tok:id:{group}:{identity}", limits.tokens_per_min or 0, "tokens_per_min"),
                Bucket(
                    f"tok:group:{group}", limits.group_tokens_per_min or 0, "group_tokens_per_min"
                ),
            )
            if b.per_min
        ]
        if not req and not tok:
            return Reservation((), 0)
        now = self._clock()
        takes = [(b, 1, "requests") for b in req] + [(b, tokens, "tokens") for b in tok]
        # Rows are always locked in key order (here and in settle): no deadlocks.
        takes.sort(key=lambda t: t[0].key)
        with self.engine.begin() as c:  # all or nothing
            for b, cost, what in takes:
                if cost > b.per_min:  # never passes: no retry_after_s
                    raise RateLimited(
                        f"this request needs {cost} {what}; the limit is {b.per_min} per minute "
                        f"({'your group' if ':group:' in b.key else 'you'})",
                        limit=b.limit,
                    )
                if not self._take(c, b, cost, now):
                    wait = self._wait_s(c, b, cost, now)
                    raise RateLimited(
                        f"over {b.per_min} {what} per minute "
                        f"({'for your group' if ':group:' in b.key else 'for you'}); "
                        f"retry in {wait:.1f} s",
                        # Rounded up to the millisecond: a retry then never comes too early.
                        retry_after_s=math.ceil(wait * 1000) / 1000,
                        limit=b.limit,
                    )
        return Reservation(tuple(tok), tokens, tuple(req))

    def settle(self, reservation: Reservation, used_tokens: int, *, refused: bool = False) -> None:
        """Give back the reserved tokens a finished (or failed) request did not use, and its
        request too if a later layer ``refused`` it (a refusal takes nothing)."""
        refund = reservation.reserved_tokens - max(0, used_tokens)
        gives = [(b, refund) for b in reservation.token_buckets if refund > 0]
        if refused:
            gives += [(b, 1) for b in reservation.request_buckets]
        if not gives:
            return
        gives.sort(key=lambda g: g[0].key)
        with self.engine.begin() as c:
            for b, amount in gives:
                level = _k.level + amount
                c.execute(
                    buckets.update()
                    .where(_k.key == b.key)
                    .values(level=sa.case((level > b.per_min, b.per_min), else_=level))
                )

    def _take(self, c: Connection, b: Bucket, cost: int, now: float) -> bool:
        level = _refilled(b.per_min, b.per_s)
        done = c.execute(
            buckets.update()
            .where(_k.key == b.key, level >= cost)
            .values(level=level - cost, updated_at=sa.bindparam("now")),
            {"now": now},
        )
        if done.rowcount == 1:
            return True
        exists = c.execute(sa.select(_k.key).where(_k.key == b.key)).first()
        if exists is not None:
            return False
        try:  # a new bucket starts full
            with c.begin_nested():
                c.execute(
                    buckets.insert().values(key=b.key, level=b.per_min - cost, updated_at=now)
                )
        except IntegrityError:  # another worker made it first
            return self._take(c, b, cost, now)
        return True

    def _wait_s(self, c: Connection, b: Bucket, cost: int, now: float) -> float:
        level = c.execute(
            sa.select(_refilled(b.per_min, b.per_s)).where(_k.key == b.key), {"now": now}
        ).scalar_one()
        return max(0.0, (cost - float(level)) / b.per_s)
