"""The service-unit ledger: projects, immutable transfers and two-phase holds.

Amounts are integer micro-SU. A request is charged in two phases:

* **hold** the worst case on admission; refused if it would overdraw the project;
* **post** the actual cost (at most the hold; the rest is released), or **void** on failure.

Holds expire and are voided automatically. Every transfer's id is derived from the request id
and the phase and is unique in the database, so a retried request cannot be charged twice.
One code path (SQLAlchemy Core) for SQLite (the default, WAL, ``BEGIN IMMEDIATE``) and
PostgreSQL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from tpm_faas.errors import DuplicateRequest, InsufficientFunds, LedgerError

_NS = uuid.UUID("6f1c1f8e-3c1d-4a8e-9a51-6d2f9e0b7a10")

metadata = sa.MetaData()

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

transfers = sa.Table(
    "transfers",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("project", sa.String(128), sa.ForeignKey("projects.name"), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    # credit: allocation added; hold/release bracket a reservation; post: the charge.
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("mode", sa.String(16), nullable=False, server_default=""),
    sa.Column("identity", sa.String(256), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_transfers_project", "project"),
)

holds = sa.Table(
    "holds",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("project", sa.String(128), sa.ForeignKey("projects.name"), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(8), nullable=False),  # held | posted | voided
    sa.Column("charged", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("mode", sa.String(16), nullable=False, server_default=""),
    sa.Column("identity", sa.String(256), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_holds_state", "state", "expires_at"),
)


def transfer_id(request_id: str, phase: str) -> str:
    """The deterministic id of a request's transfer for ``phase``."""
    return str(uuid.uuid5(_NS, f"{request_id}\x00{phase}"))


def to_su(micro: int) -> float:
    """Micro-SU as SU, for display only."""
    return micro / 1_000_000


@dataclass(frozen=True)
class Balance:
    project: str
    credited: int
    charged: int
    held: int

    @property
    def available(self) -> int:
        return self.credited - self.charged - self.held


@dataclass(frozen=True)
class Hold:
    request_id: str
    project: str
    amount: int
    expires_at: float


class Ledger:
    """A ledger on the database at ``url`` (tables are created if missing)."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self._clock = clock
        self.engine: Engine = _make_engine(url)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- allocations --------------------------------------------------------------------
    def credit(self, project: str, amount_micro: int, *, reference: str | None = None) -> None:
        """Add ``amount_micro`` to ``project``'s allocation (creating the project).

        ``reference`` makes the credit idempotent: the same reference credits once.
        """
        if amount_micro <= 0:
            raise LedgerError("a credit must be positive")
        ref = reference or f"credit:{uuid.uuid4()}"
        now = self._clock()
        with self._tx() as c:
            self._ensure_project(c, project, now)
            try:
                with c.begin_nested():
                    c.execute(
                        transfers.insert().values(
                            id=transfer_id(ref, "credit"),
                            project=project,
                            request_id=ref,
                            kind="credit",
                            amount=amount_micro,
                            created_at=now,
                        )
                    )
            except IntegrityError:
                pass  # already credited under this reference

    def balance(self, project: str) -> Balance:
        with self._tx() as c:
            return self._balance(c, project)

    # -- two-phase charging -------------------------------------------------------------
    def hold(
        self,
        request_id: str,
        project: str,
        amount_micro: int,
        *,
        ttl_s: float,
        mode: str = "",
        identity: str = "",
    ) -> Hold:
        """Reserve the worst case of a request; refuses an overdraw or a reused request id."""
        now = self._clock()
        with self._tx() as c:
            self._expire(c, now)
            if (
                c.execute(sa.select(projects.c.name).where(projects.c.name == project)).first()
                is None
            ):
                raise InsufficientFunds(f"project {project!r} has no allocation in the ledger")
            if c.execute(sa.select(holds.c.state).where(holds.c.request_id == request_id)).first():
                raise DuplicateRequest(f"request {request_id} was already admitted once")
            bal = self._balance(c, project)
            if amount_micro > bal.available:
                raise InsufficientFunds(
                    f"project {project!r} has {to_su(bal.available):.6f} SU available; this "
                    f"request may cost up to {to_su(amount_micro):.6f} SU"
                )
            h = Hold(request_id, project, amount_micro, now + ttl_s)
            try:
                c.execute(
                    holds.insert().values(
                        request_id=request_id,
                        project=project,
                        amount=amount_micro,
                        state="held",
                        mode=mode,
                        identity=identity,
                        created_at=now,
                        expires_at=h.expires_at,
                    )
                )
                self._transfer(c, request_id, project, "hold", amount_micro, mode, identity, now)
            except IntegrityError as e:
                raise DuplicateRequest(f"request {request_id} was already admitted once") from e
        return h

    def post(self, request_id: str, actual_micro: int) -> int:
        """Charge the actual cost of a held request (capped at the hold); returns the charge."""
        now = self._clock()
        with self._tx() as c:
            row = self._open_hold(c, request_id)
            charge = min(max(actual_micro, 0), int(row.amount))
            c.execute(
                holds.update()
                .where(holds.c.request_id == request_id, holds.c.state == "held")
                .values(state="posted", charged=charge)
            )
            self._transfer(
                c, request_id, row.project, "release", row.amount, row.mode, row.identity, now
            )
            self._transfer(c, request_id, row.project, "post", charge, row.mode, row.identity, now)
        return charge

    def void(self, request_id: str) -> bool:
        """Release a held request without charging; ``False`` if it was not held."""
        now = self._clock()
        with self._tx() as c:
            row = c.execute(
                sa.select(holds).where(holds.c.request_id == request_id, holds.c.state == "held")
            ).first()
            if row is None:
                return False
            self._void(c, row, now)
        return True

    def expire_holds(self) -> int:
        """Void every hold past its expiry; returns how many."""
        with self._tx() as c:
            return self._expire(c, self._clock())

    def open_holds(self, project: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(holds).where(holds.c.state == "held")
        if project is not None:
            q = q.where(holds.c.project == project)
        with self._tx() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def charges(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every posted request (with its charge), oldest first."""
        q = sa.select(holds).where(holds.c.state == "posted").order_by(holds.c.created_at)
        if project is not None:
            q = q.where(holds.c.project == project)
        with self._tx() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def projects(self) -> list[str]:
        with self._tx() as c:
            return [r.name for r in c.execute(sa.select(projects.c.name).order_by(projects.c.name))]

    # -- internals ----------------------------------------------------------------------
    def _ensure_project(self, c: Connection, project: str, now: float) -> None:
        if c.execute(sa.select(projects.c.name).where(projects.c.name == project)).first() is None:
            c.execute(projects.insert().values(name=project, created_at=now))

    def _balance(self, c: Connection, project: str) -> Balance:
        sums = dict(
            c.execute(
                sa.select(transfers.c.kind, sa.func.coalesce(sa.func.sum(transfers.c.amount), 0))
                .where(transfers.c.project == project)
                .group_by(transfers.c.kind)
            ).all()
        )
        held = int(sums.get("hold", 0)) - int(sums.get("release", 0))
        return Balance(project, int(sums.get("credit", 0)), int(sums.get("post", 0)), held)

    def _open_hold(self, c: Connection, request_id: str) -> Any:
        row = c.execute(sa.select(holds).where(holds.c.request_id == request_id)).first()
        if row is None:
            raise LedgerError(f"request {request_id} has no hold")
        if row.state != "held":
            raise DuplicateRequest(f"request {request_id} is already {row.state}")
        return row

    def _void(self, c: Connection, row: Any, now: float) -> None:
        c.execute(
            holds.update()
            .where(holds.c.request_id == row.request_id, holds.c.state == "held")
            .values(state="voided")
        )
        self._transfer(
            c, row.request_id, row.project, "release", row.amount, row.mode, row.identity, now
        )

    def _expire(self, c: Connection, now: float) -> int:
        stale = c.execute(
            sa.select(holds).where(holds.c.state == "held", holds.c.expires_at <= now)
        ).all()
        for row in stale:
            self._void(c, row, now)
        return len(stale)

    def _transfer(
        self,
        c: Connection,
        request_id: str,
        project: str,
        kind: str,
        amount: int,
        mode: str,
        identity: str,
        now: float,
    ) -> None:
        c.execute(
            transfers.insert().values(
                id=transfer_id(request_id, kind),
                project=project,
                request_id=request_id,
                kind=kind,
                amount=amount,
                mode=mode,
                identity=identity,
                created_at=now,
            )
        )


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front so concurrent holds serialise instead of deadlocking.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
