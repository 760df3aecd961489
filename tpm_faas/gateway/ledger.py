"""The service-unit ledger: projects, immutable transfers and two-phase holds.

Amounts are integer micro-SU. A request is charged in two phases:

* **hold** the worst case on admission; refused if it would overdraw the project;
* **post** the actual cost (at most the hold; the rest is released), or **void** on failure.

Holds expire and are voided automatically. Every transfer's id is derived from the request id
and the phase and is unique in the database, so a retried request cannot be charged twice.

``transfers`` is the record (append-only); ``balances`` keeps each project's running sums so
that admission reads one row. Every change is one transaction that appends its transfers and
updates the balance row with a *conditional* update (``... WHERE credited - charged - held >=
amount``): on PostgreSQL the row lock and the re-checked condition make the balance guard
race-free under the default READ COMMITTED isolation; SQLite runs one writer at a time (WAL,
``BEGIN IMMEDIATE``), and the writers of a SQLite ledger queue on an ``flock`` beside the
database file rather than in SQLite's sleep-and-retry busy handler. Locks: a hold locks its
project's balance row and inserts a new hold row; a post or void locks the hold row, then the
balance row; so no two transactions wait on each other in a cycle. :meth:`Ledger.reconcile`
checks that the running sums equal the sums of the transfers.

**Orphaned holds.** Each hold records its owner: the process that made it (its pid and start
time) and the host that process runs on (hostname, kernel boot id and PID namespace, so that
two machines or two containers never share a key). A worker killed between hold and post
cannot void its hold; any other process of the same host does, without an operator: every
ledger looks for holds of its host whose owner process is gone (no such pid, a zombie, or a
pid since reused: another start time) before its first hold and then at most every
:data:`ORPHAN_SWEEP_S` seconds (:meth:`Ledger.void_orphans`, one indexed query when there is
nothing to void). A host never judges another host's holds: those (and holds made where
``/proc`` is missing) are voided at their expiry. A void that fails because the database is
unreachable is kept and retried by the same sweep (:meth:`Ledger.void_orphans`), only while
the hold is still this process's.

A database that does not answer (connection refused, dropped or timed out) is a
:class:`~tpm_faas.errors.LedgerError` with code ``ledger_unavailable`` from every charging
call (:func:`unavailable`); nothing is charged by a call that raised it before its commit.

A ledger that cannot be opened is one error naming it: :class:`~tpm_faas.errors.ConfigError`
for a SQLite file in a directory that does not exist or a URL that names no database
SQLAlchemy knows, :class:`~tpm_faas.errors.LedgerError` for a server that does not answer
(PostgreSQL is given :data:`CONNECT_TIMEOUT_S` to accept a connection). Either names the URL
without its password (:func:`safe_url`).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from tpm_faas.errors import (
    ConfigError,
    DuplicateRequest,
    InsufficientFunds,
    LedgerError,
    RateLimited,
)

log = logging.getLogger(__name__)

_NS = uuid.UUID("6f1c1f8e-3c1d-4a8e-9a51-6d2f9e0b7a10")

#: Seconds between two looks of a ledger for orphaned holds of its host (and failed voids to
#: retry); the first look is before its first hold.
ORPHAN_SWEEP_S = 5.0
#: The ``retry_after_s`` of a refusal for too many requests in flight (``max_concurrent``):
#: when one of them ends is not known here, so this is a hint to look again, not a promise.
CONCURRENCY_RETRY_S = 1.0

#: What SQLAlchemy raises when the database does not answer (see :func:`unavailable`).
UNAVAILABLE: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError)

#: Seconds a PostgreSQL server has to accept a connection (``connect_timeout`` in the URL's
#: query overrides it): an unreachable ledger fails in seconds, not after the OS gives up.
CONNECT_TIMEOUT_S = 5

metadata = sa.MetaData()

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

balances = sa.Table(
    "balances",
    metadata,
    sa.Column("project", sa.String(128), sa.ForeignKey("projects.name"), primary_key=True),
    sa.Column("credited", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("charged", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("held", sa.BigInteger, nullable=False, server_default="0"),
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
    # Why an allocation changed (``tpm-faas ledger credit --note``); empty for charges.
    sa.Column("note", sa.String(512), nullable=False, server_default=""),
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
    sa.Column("finished_at", sa.Float, nullable=True),
    # A voided request may be held again (a client failing over to another endpoint with the
    # same request id); each attempt has its own hold/release transfers.
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    # The process that made the hold (see "Orphaned holds" above); "" where unknown.
    sa.Column("owner_host", sa.String(256), nullable=False, server_default=""),
    sa.Column("owner_pid", sa.Integer, nullable=False, server_default="0"),
    sa.Column("owner_start", sa.BigInteger, nullable=False, server_default="0"),
    # The model version the request ran on (NAME@VERSION; "" where not recorded): version-store
    # gc keeps every version a posted charge names (:meth:`Ledger.charged_models`).
    sa.Column("model", sa.String(200), nullable=False, server_default=""),
    sa.Index("ix_holds_state", "state", "expires_at"),
)


# The statements of the hot path, built once (bound parameters only).
_b, _h = balances.c, holds.c
_RESERVE = (
    balances.update()
    .where(_b.project == sa.bindparam("p"), _b.credited - _b.charged - _b.held >= sa.bindparam("a"))
    .values(held=_b.held + sa.bindparam("a"))
)
_INSERT_HOLD = holds.insert().values(
    {
        c.name: sa.bindparam(c.name)
        for c in holds.c
        if c.name not in ("charged", "finished_at", "attempt")
    }
)
_INSERT_TRANSFERS = transfers.insert().values({c.name: sa.bindparam(c.name) for c in transfers.c})
_POST = (
    holds.update()
    .where(_h.request_id == sa.bindparam("r"), _h.state == "held")
    .values(
        state="posted",
        charged=sa.case((_h.amount < sa.bindparam("a"), _h.amount), else_=sa.bindparam("a")),
        finished_at=sa.bindparam("now"),
    )
    .returning(_h.project, _h.amount, _h.charged, _h.mode, _h.identity, _h.attempt)
)
_VOID = (
    holds.update()
    .where(
        _h.request_id == sa.bindparam("r"),
        _h.state == "held",
        _h.expires_at <= sa.bindparam("until"),  # +inf for a void; now for an expiry
    )
    .values(state="voided", finished_at=sa.bindparam("now"))
    .returning(_h.project, _h.amount, _h.mode, _h.identity, _h.attempt)
)
_SETTLE = (
    balances.update()
    .where(_b.project == sa.bindparam("p"))
    .values(held=_b.held - sa.bindparam("released"), charged=_b.charged + sa.bindparam("charge"))
)
_VOID_ORPHAN = (
    holds.update()
    .where(
        _h.request_id == sa.bindparam("r"),
        _h.state == "held",
        _h.owner_host == sa.bindparam("host"),
        _h.owner_pid == sa.bindparam("pid"),
        _h.owner_start == sa.bindparam("start"),
    )
    .values(state="voided", finished_at=sa.bindparam("now"))
    .returning(_h.project, _h.amount, _h.mode, _h.identity, _h.attempt)
)
_IDENTITY_LOCK = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))")
_STATE = sa.select(_h.state).where(_h.request_id == sa.bindparam("r"))


class _Sql:
    """A statement of the hot path compiled once for the engine's dialect, run through the
    DB-API driver directly (the same SQL SQLAlchemy would send, without its per-call
    compilation-cache lookup and result processing)."""

    def __init__(self, stmt: Any, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = str(compiled)
        self.positional = bool(compiled.positional)
        self.order = list(compiled.positiontup or [])
        self.fixed = {k: b.value for k, b in compiled.binds.items() if not b.required}

    def params(self, values: dict[str, Any]) -> Any:
        p = {**self.fixed, **values}
        return tuple(p[k] for k in self.order) if self.positional else p

    def run(self, c: Connection, values: dict[str, Any]) -> Any:
        return c.exec_driver_sql(self.sql, self.params(values))

    def run_many(self, c: Connection, rows: list[dict[str, Any]]) -> None:
        c.exec_driver_sql(self.sql, [self.params(r) for r in rows])


def transfer_id(request_id: str, phase: str) -> str:
    """The deterministic id of a request's transfer for ``phase``."""
    return str(uuid.uuid5(_NS, f"{request_id}\x00{phase}"))


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<not a database URL>"


def unavailable(e: BaseException, url: str = "") -> LedgerError:
    """The error a caller gets when the ledger's database does not answer."""
    where = f" {safe_url(url)}" if url else ""
    reason = _reason(e) if isinstance(e, sa.exc.DBAPIError) else str(e)
    return LedgerError(
        f"the ledger database{where} is unavailable ({reason}); try again shortly",
        code="ledger_unavailable",
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _available(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` with a database that does not answer raised as :func:`unavailable`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except UNAVAILABLE as e:
            ledger = args[0]
            raise unavailable(e, getattr(ledger, "url", "")) from e

    return wrapper


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of ``pid``; ``None`` if none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _host_key() -> str:
    """This host as the ledger names it: hostname, kernel boot id and PID namespace ("" where
    ``/proc`` does not say, and then no hold of this host is judged an orphan)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{pidns}"[:256]


@functools.lru_cache(maxsize=4)
def _owner_of(pid: int) -> tuple[str, int, int]:
    host = _host_key()
    stat = _proc_stat(pid) if host else None
    if stat is None:
        return "", pid, 0
    return host, pid, stat[1]


def process_owner() -> tuple[str, int, int]:
    """``(host, pid, start time)`` of this process, as recorded on the holds it makes."""
    return _owner_of(os.getpid())


def owner_alive(host: str, pid: int, start: int) -> bool | None:
    """Whether the owner of a hold still runs: ``None`` if it is not on this host (or the
    owner is unknown), so that only its own host judges it."""
    if not host or host != process_owner()[0]:
        return None
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZX" and stat[1] == start


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


@dataclass
class Reconciliation:
    """What :meth:`Ledger.reconcile` found; ``ok`` when every list is empty."""

    projects: int = 0
    transfers: int = 0
    expired_open_holds: list[str] = field(default_factory=list)
    balance_mismatches: list[str] = field(default_factory=list)
    charge_mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.expired_open_holds or self.balance_mismatches or self.charge_mismatches)


class Ledger:
    """A ledger on the database at ``url`` (tables are created if missing)."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        orphan_sweep_s: float = ORPHAN_SWEEP_S,
    ) -> None:
        self.url = url
        self._clock = clock
        self.orphan_sweep_s = orphan_sweep_s
        self._swept_at = float("-inf")  # monotonic time of the last orphan sweep
        self._unvoided: set[str] = set()  # voids that failed: retried by the sweep
        self._sweep_lock = threading.Lock()
        self._retrier: threading.Thread | None = None
        self.engine: Engine = _make_engine(url)
        self._writer = _WriterLock(url)
        try:
            with self._writer:  # several workers may open a new ledger at once
                try:
                    metadata.create_all(self.engine)
                except sa.exc.OperationalError:
                    raise
                except sa.exc.SQLAlchemyError:  # another process created it first (PostgreSQL)
                    metadata.create_all(self.engine)
            self._migrate()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
            self.engine.dispose()
            self._writer.close()
            raise LedgerError(f"cannot open the ledger {safe_url(url)}: {_reason(e)}") from e
        d = self.engine.dialect
        self._reserve_sql, self._insert_hold_sql = _Sql(_RESERVE, d), _Sql(_INSERT_HOLD, d)
        self._transfers_sql, self._settle_sql = _Sql(_INSERT_TRANSFERS, d), _Sql(_SETTLE, d)
        self._post_sql, self._void_sql = _Sql(_POST, d), _Sql(_VOID, d)
        self._void_orphan_sql = _Sql(_VOID_ORPHAN, d)

    def _migrate(self) -> None:
        """Bring a ledger made by an earlier tpm_faas up to this schema."""
        cols = {c["name"] for c in sa.inspect(self.engine).get_columns("holds")}
        transfer_cols = {c["name"] for c in sa.inspect(self.engine).get_columns("transfers")}
        with self._tx() as c:
            if "note" not in transfer_cols:
                c.exec_driver_sql(
                    "ALTER TABLE transfers ADD COLUMN note VARCHAR(512) NOT NULL DEFAULT ''"
                )
            if "finished_at" not in cols:
                c.exec_driver_sql("ALTER TABLE holds ADD COLUMN finished_at FLOAT")
                c.execute(holds.update().values(finished_at=holds.c.created_at))
            if "attempt" not in cols:
                c.exec_driver_sql("ALTER TABLE holds ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1")
            if "owner_host" not in cols:  # holds made before: left to their expiry
                c.exec_driver_sql(
                    "ALTER TABLE holds ADD COLUMN owner_host VARCHAR(256) NOT NULL DEFAULT ''"
                )
            if "owner_pid" not in cols:
                c.exec_driver_sql(
                    "ALTER TABLE holds ADD COLUMN owner_pid INTEGER NOT NULL DEFAULT 0"
                )
            if "owner_start" not in cols:
                c.exec_driver_sql(
                    "ALTER TABLE holds ADD COLUMN owner_start BIGINT NOT NULL DEFAULT 0"
                )
            if "model" not in cols:  # holds made before: no model recorded
                c.exec_driver_sql(
                    "ALTER TABLE holds ADD COLUMN model VARCHAR(200) NOT NULL DEFAULT ''"
                )
            known = {r.project for r in c.execute(sa.select(balances.c.project))}
            for (name,) in c.execute(sa.select(projects.c.name)).all():
                if name not in known:  # running sums from the transfers
                    s = dict(
                        c.execute(
                            sa.select(transfers.c.kind, sa.func.sum(transfers.c.amount))
                            .where(transfers.c.project == name)
                            .group_by(transfers.c.kind)
                        ).all()
                    )
                    c.execute(
                        balances.insert().values(
                            project=name,
                            credited=int(s.get("credit") or 0),
                            charged=int(s.get("post") or 0),
                            held=int(s.get("hold") or 0) - int(s.get("release") or 0),
                        )
                    )

    def close(self) -> None:
        self.engine.dispose()
        self._writer.close()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One write transaction."""
        with (
            self._writer,
            self.engine.connect().execution_options(tpm_write=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read; ``snapshot``: all its statements see one state of the database."""
        with self.engine.connect() as conn:
            if snapshot and self.engine.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            yield conn

    # -- allocations --------------------------------------------------------------------
    @_available
    def credit(
        self,
        project: str,
        amount_micro: int,
        *,
        reference: str | None = None,
        note: str = "",
        identity: str = "",
    ) -> bool:
        """Add ``amount_micro`` to ``project``'s allocation (creating the project).

        ``reference`` makes the credit idempotent: the same reference credits once (the
        transfer's id is :func:`transfer_id` of it and ``"credit"``). ``note`` says why and
        ``identity`` who; both are kept on the transfer. Returns whether this call credited.
        """
        if amount_micro <= 0:
            raise LedgerError("a credit must be positive")
        if len(note) > 512:
            raise LedgerError("a credit's note is at most 512 characters")
        ref = reference or f"credit:{uuid.uuid4()}"
        now = self._clock()
        with self._tx() as c:
            self._ensure_project(c, project, now)
            try:
                with c.begin_nested():
                    self._transfers(
                        c, ref, project, [("credit", amount_micro)], "", identity, now, note=note
                    )
            except IntegrityError:
                return False  # already credited under this reference
            c.execute(
                balances.update()
                .where(balances.c.project == project)
                .values(credited=balances.c.credited + amount_micro)
            )
        return True

    def balance(self, project: str) -> Balance:
        with self._read() as c:
            row = c.execute(sa.select(balances).where(balances.c.project == project)).first()
        if row is None:
            return Balance(project, 0, 0, 0)
        return Balance(project, int(row.credited), int(row.charged), int(row.held))

    def balances(self, project: str | None = None) -> list[Balance]:
        """Every project's balance (or ``project``'s, if it exists), by project name."""
        q = sa.select(balances).order_by(balances.c.project)
        if project is not None:
            q = q.where(balances.c.project == project)
        with self._read() as c:
            return [
                Balance(r.project, int(r.credited), int(r.charged), int(r.held))
                for r in c.execute(q)
            ]

    def credits(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every credit transfer (id, project, amount, note, identity, time), oldest first."""
        t = transfers.c
        q = (
            sa.select(t.id, t.project, t.request_id, t.amount, t.note, t.identity, t.created_at)
            .where(t.kind == "credit")
            .order_by(t.created_at)
        )
        if project is not None:
            q = q.where(t.project == project)
        with self._read() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    # -- two-phase charging -------------------------------------------------------------
    @_available
    def hold(
        self,
        request_id: str,
        project: str,
        amount_micro: int,
        *,
        ttl_s: float,
        mode: str = "",
        identity: str = "",
        max_open: int | None = None,
        model: str = "",
    ) -> Hold:
        """Reserve the worst case of a request; refuses an overdraw, a reused request id, or
        (``max_open``) an identity that already has that many requests held, all checked in
        the transaction that makes the hold. ``model`` is the version the request runs on
        (``NAME@VERSION``), kept on the hold (:meth:`charged_models`)."""
        if len(model) > 200:
            raise LedgerError("a hold's model is at most 200 characters")
        if amount_micro < 0:
            raise LedgerError("a hold cannot be negative")
        self._maybe_sweep()
        host, pid, start = process_owner()
        for attempt in (1, 2):
            now = self._clock()
            h = Hold(request_id, project, amount_micro, now + ttl_s)
            try:
                with self._tx() as c:
                    if self._reserve_sql.run(c, {"p": project, "a": amount_micro}).rowcount == 1:
                        self._check_open(c, identity, max_open)
                        self._insert_hold_sql.run(
                            c,
                            {
                                "request_id": request_id,
                                "project": project,
                                "amount": amount_micro,
                                "state": "held",
                                "mode": mode,
                                "identity": identity,
                                "created_at": now,
                                "expires_at": h.expires_at,
                                "owner_host": host,
                                "owner_pid": pid,
                                "owner_start": start,
                                "model": model,
                            },
                        )
                        self._transfers(
                            c, request_id, project, [("hold", amount_micro)], mode, identity, now
                        )
                        return h
            except IntegrityError:  # the whole transaction, reservation included, is undone
                return self._rehold(h, mode, identity, now, max_open, model)
            # Refused: expired holds may be what is in the way; void them and try once more.
            if attempt == 1 and not self._expire(project):
                break
        with self._read() as c:
            state = c.execute(_STATE, {"r": request_id}).scalar()
        if state in ("held", "posted"):  # a retry of an admitted request, whatever the funds
            raise DuplicateRequest(f"request {request_id} was already admitted once")
        bal = self.balance(project)
        if not self._exists(project):
            raise InsufficientFunds(f"project {project!r} has no allocation in the ledger")
        raise InsufficientFunds(
            f"project {project!r} has {to_su(bal.available):.6f} SU available; this "
            f"request may cost up to {to_su(amount_micro):.6f} SU"
        )

    def _rehold(
        self,
        h: Hold,
        mode: str,
        identity: str,
        now: float,
        max_open: int | None,
        model: str = "",
    ) -> Hold:
        """Hold a request id again whose earlier attempt was voided; refuse any other reuse."""
        host, pid, start = process_owner()
        with self._tx() as c:
            state = c.execute(_STATE, {"r": h.request_id}).scalar()
            if state != "voided":
                raise DuplicateRequest(f"request {h.request_id} was already admitted once")
            if self._reserve_sql.run(c, {"p": h.project, "a": h.amount}).rowcount != 1:
                raise InsufficientFunds(
                    f"project {h.project!r} cannot cover {to_su(h.amount):.6f} SU for request "
                    f"{h.request_id}"
                )
            self._check_open(c, identity, max_open)
            row = c.execute(
                holds.update()
                .where(holds.c.request_id == h.request_id, holds.c.state == "voided")
                .values(
                    state="held",
                    amount=h.amount,
                    charged=0,
                    mode=mode,
                    identity=identity,
                    created_at=now,
                    expires_at=h.expires_at,
                    finished_at=None,
                    attempt=holds.c.attempt + 1,
                    owner_host=host,
                    owner_pid=pid,
                    owner_start=start,
                    model=model,
                )
                .returning(holds.c.project, holds.c.attempt)
            ).first()
            if row is None or row.project != h.project:
                raise DuplicateRequest(f"request {h.request_id} was already admitted once")
            self._transfers(
                c,
                h.request_id,
                h.project,
                [("hold", h.amount)],
                mode,
                identity,
                now,
                attempt=int(row.attempt),
            )
        return h

    @_available
    def post(self, request_id: str, actual_micro: int) -> int:
        """Charge the actual cost of a held request (capped at the hold); returns the charge."""
        now = self._clock()
        with self._tx() as c:
            row = self._post_sql.run(
                c, {"r": request_id, "a": max(actual_micro, 0), "now": now}
            ).first()
            if row is None:
                raise self._not_held(c, request_id)
            amount, charged = int(row.amount), int(row.charged)
            self._transfers(
                c,
                request_id,
                row.project,
                [("release", amount), ("post", charged)],
                row.mode,
                row.identity,
                now,
                attempt=int(row.attempt),
            )
            self._settle_sql.run(c, {"p": row.project, "released": amount, "charge": charged})
        return charged

    def void(self, request_id: str) -> bool:
        """Release a held request without charging; ``False`` if it was not held.

        If the database does not answer, :func:`unavailable` is raised and the void is kept:
        a thread of this ledger retries it every second or so (and every sweep,
        :meth:`void_orphans`) until the database answers, as long as the hold is still this
        process's.
        """
        try:
            with self._tx() as c:
                voided = self._void(c, request_id, self._clock())
        except UNAVAILABLE as e:
            with self._sweep_lock:
                self._unvoided.add(request_id)
                if self._retrier is None or not self._retrier.is_alive():
                    self._retrier = threading.Thread(
                        target=self._retry_voids, name="ledger-void-retry", daemon=True
                    )
                    self._retrier.start()
            raise unavailable(e, self.url) from e
        with self._sweep_lock:
            self._unvoided.discard(request_id)
        return voided

    @_available
    def expire_holds(self) -> int:
        """Void every hold past its expiry, and every orphaned hold of this host (see
        :meth:`void_orphans`); returns how many."""
        return self._expire(None) + self.void_orphans()

    @_available
    def void_orphans(self) -> int:
        """Void the open holds of this host whose owner process is gone, and retry the voids
        of this process that failed; returns how many holds were voided.

        An owner is gone when its pid does not exist, is a zombie, or started at another
        time (the pid was reused). Holds made on other hosts are left alone: only their own
        host can tell (they are voided at their expiry if their host is gone too).
        """
        host = process_owner()[0]
        now = self._clock()
        n = self._void_unvoided()
        if not host:
            return n
        q = sa.select(_h.request_id, _h.owner_pid, _h.owner_start).where(
            _h.state == "held", _h.owner_host == host
        )
        with self._read() as c:
            mine = c.execute(q).all()
        for rid, pid, start in mine:
            if owner_alive(host, int(pid), int(start)) is False:
                with self._tx() as c:
                    if self._void(c, rid, now, owner=(host, int(pid), int(start))):
                        log.warning(
                            "voided hold %s: its owner process %s on this host is gone", rid, pid
                        )
                        n += 1
        return n

    def _void_unvoided(self) -> int:
        """Retry this process's failed voids (only while each hold is still ours)."""
        owner = process_owner()
        with self._sweep_lock:
            retry = sorted(self._unvoided)
        n = 0
        for rid in retry:
            with self._tx() as c:
                n += self._void(c, rid, self._clock(), owner=owner)
            with self._sweep_lock:
                self._unvoided.discard(rid)
        return n

    def _retry_voids(self) -> None:
        """The thread behind a failed :meth:`void`: retry until the database answers."""
        wait = 1.0
        while True:
            time.sleep(wait)
            try:
                self._void_unvoided()
            except (sa.exc.OperationalError, sa.exc.InterfaceError, LedgerError):
                wait = min(wait * 1.5, 5.0)
            except Exception:  # not the database's state: leave the hold to its expiry
                log.exception("retrying a failed void failed; the hold will expire")
                with self._sweep_lock:
                    self._unvoided.clear()
            with self._sweep_lock:
                if not self._unvoided:
                    self._retrier = None
                    return

    def _maybe_sweep(self) -> None:
        """:meth:`void_orphans` before the first hold and then every ``orphan_sweep_s``."""
        t = time.monotonic()
        if t - self._swept_at < self.orphan_sweep_s:
            return
        self._swept_at = t
        try:
            self.void_orphans()
        except LedgerError as e:  # the hold that follows reports the database's state
            log.warning("looking for orphaned holds failed: %s", e)

    # -- reading ------------------------------------------------------------------------
    def open_holds(
        self, project: str | None = None, *, identity: str | None = None
    ) -> list[dict[str, Any]]:
        q = sa.select(holds).where(holds.c.state == "held")
        if project is not None:
            q = q.where(holds.c.project == project)
        if identity is not None:
            q = q.where(holds.c.identity == identity)
        with self._read() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def charges(self, project: str | None = None) -> list[dict[str, Any]]:
        """Every posted request (with its charge), oldest first."""
        q = sa.select(holds).where(holds.c.state == "posted").order_by(holds.c.created_at)
        if project is not None:
            q = q.where(holds.c.project == project)
        with self._read() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    @_available
    def charged_models(self) -> set[str]:
        """Every model version (``NAME@VERSION``) a posted charge names, or a hold still open
        (a request in flight, charged when it finishes)."""
        q = (
            sa.select(holds.c.model)
            .where(holds.c.state.in_(("posted", "held")), holds.c.model != "")
            .distinct()
        )
        with self._read() as c:
            return {str(m) for (m,) in c.execute(q)}

    def projects(self) -> list[str]:
        with self._read() as c:
            return [r.name for r in c.execute(sa.select(projects.c.name).order_by(projects.c.name))]

    def reconcile(self) -> Reconciliation:
        """Check the ledger: no open hold past its expiry; every balance equals the sums of
        its transfers; every posted request has exactly its hold, release and post transfers
        with the amounts its hold row records."""
        now = self._clock()
        out = Reconciliation()
        with self._read(snapshot=True) as c:
            out.expired_open_holds = [
                r.request_id
                for r in c.execute(
                    sa.select(holds.c.request_id).where(
                        holds.c.state == "held", holds.c.expires_at <= now
                    )
                )
            ]
            sums: dict[str, dict[str, int]] = {}
            for project, kind, total, n in c.execute(
                sa.select(
                    transfers.c.project,
                    transfers.c.kind,
                    sa.func.sum(transfers.c.amount),
                    sa.func.count(),
                ).group_by(transfers.c.project, transfers.c.kind)
            ):
                sums.setdefault(project, {})[kind] = int(total)
                out.transfers += int(n)
            for b in c.execute(sa.select(balances)):
                out.projects += 1
                s = sums.get(b.project, {})
                want = (
                    s.get("credit", 0),
                    s.get("post", 0),
                    s.get("hold", 0) - s.get("release", 0),
                )
                got = (int(b.credited), int(b.charged), int(b.held))
                if got != want:
                    out.balance_mismatches.append(
                        f"{b.project}: balance (credited, charged, held) = {got}, "
                        f"transfers give {want}"
                    )
            per_request: dict[str, dict[str, int]] = {}
            for rid, kind, amount in c.execute(
                sa.select(transfers.c.request_id, transfers.c.kind, transfers.c.amount).where(
                    transfers.c.kind != "credit"
                )
            ):
                sums_r = per_request.setdefault(rid, {"hold": 0, "release": 0, "post": 0})
                sums_r[kind] = sums_r.get(kind, 0) + int(amount)
            for h in c.execute(sa.select(holds)):
                t = per_request.pop(h.request_id, {})
                held = int(h.amount) if h.state == "held" else 0
                got_t = {"held": t.get("hold", 0) - t.get("release", 0), "post": t.get("post", 0)}
                want_t = {"held": held, "post": int(h.charged) if h.state == "posted" else 0}
                if got_t != want_t or t.get("hold", 0) < int(h.amount):
                    out.charge_mismatches.append(
                        f"request {h.request_id} ({h.state}): transfers {t}, expected {want_t} net"
                    )
            out.charge_mismatches += [
                f"request {rid}: transfers {t} without a hold" for rid, t in per_request.items()
            ]
        return out

    def usage(
        self, project: str | None = None, since: float = 0.0, *, by_model: bool = False
    ) -> list[dict[str, Any]]:
        """Posted charges grouped by project, UTC day and mode (and, with ``by_model``, the
        model version: each row then has a ``model`` key), oldest first."""
        day = sa.cast(holds.c.finished_at, sa.BigInteger) // 86400  # UTC day number
        keys: list[Any] = [holds.c.project, day, holds.c.mode]
        if by_model:
            keys.append(holds.c.model)
        q = (
            sa.select(
                holds.c.project,
                day.label("day"),
                *keys[2:],
                sa.func.count().label("requests"),
                sa.func.sum(holds.c.charged).label("charged"),
            )
            .where(holds.c.state == "posted", holds.c.finished_at >= since)
            .group_by(*keys)
            .order_by(*keys)
        )
        if project is not None:
            q = q.where(holds.c.project == project)
        with self._read() as c:
            rows = []
            for r in c.execute(q):
                row: dict[str, Any] = {
                    "project": r.project,
                    "day": time.strftime("%Y-%m-%d", time.gmtime(float(r.day) * 86400)),
                    "mode": r.mode,
                }
                if by_model:
                    row["model"] = r.model
                row |= {"requests": int(r.requests), "charged_micro": int(r.charged)}
                rows.append(row)
            return rows

    # -- internals ----------------------------------------------------------------------
    def _ensure_project(self, c: Connection, project: str, now: float) -> None:
        if c.execute(sa.select(projects.c.name).where(projects.c.name == project)).first() is None:
            c.execute(projects.insert().values(name=project, created_at=now))
            c.execute(balances.insert().values(project=project))

    def _exists(self, project: str) -> bool:
        with self._read() as c:
            q = sa.select(projects.c.name).where(projects.c.name == project)
            return c.execute(q).first() is not None

    def _check_open(self, c: Connection, identity: str, max_open: int | None) -> None:
        """Refuse an identity's hold past ``max_open`` open holds, counted in ``c``'s transaction.

        On PostgreSQL the identity's holds may charge different projects (different row
        locks), so concurrent holds take a transaction-scoped advisory lock on the identity
        first; each then counts what the one before it committed. SQLite writers are already
        one at a time.
        """
        if max_open is None:
            return
        if self.engine.dialect.name == "postgresql":
            c.execute(_IDENTITY_LOCK, {"k": f"tpm_faas.open_holds:{identity}"})
        q = sa.select(sa.func.count()).where(holds.c.identity == identity, holds.c.state == "held")
        running = int(c.execute(q).scalar_one())
        if running >= max_open:
            raise RateLimited(
                f"you have {running} requests running; your group allows {max_open} at once",
                retry_after_s=CONCURRENCY_RETRY_S,
                limit="max_concurrent",
            )

    def _not_held(self, c: Connection, request_id: str) -> LedgerError:
        state = c.execute(_STATE, {"r": request_id}).scalar()
        if state is None:
            return LedgerError(f"request {request_id} has no hold")
        return DuplicateRequest(f"request {request_id} is already {state}")

    def _void(
        self,
        c: Connection,
        request_id: str,
        now: float,
        *,
        expired_only: bool = False,
        owner: tuple[str, int, int] | None = None,
    ) -> bool:
        if owner is not None:  # only while the hold is still that process's
            host, pid, start = owner
            row = self._void_orphan_sql.run(
                c, {"r": request_id, "now": now, "host": host, "pid": pid, "start": start}
            ).first()
        else:
            until = now if expired_only else float("inf")
            row = self._void_sql.run(c, {"r": request_id, "now": now, "until": until}).first()
        if row is None:
            return False
        amount = int(row.amount)
        self._transfers(
            c,
            request_id,
            row.project,
            [("release", amount)],
            row.mode,
            row.identity,
            now,
            attempt=int(row.attempt),
        )
        self._settle_sql.run(c, {"p": row.project, "released": amount, "charge": 0})
        return True

    def _expire(self, project: str | None) -> int:
        """Void the holds past their expiry (of ``project``, or all); returns how many."""
        now = self._clock()
        q = sa.select(holds.c.request_id, holds.c.project).where(
            holds.c.state == "held", holds.c.expires_at <= now
        )
        if project is not None:
            q = q.where(holds.c.project == project)
        with self._read() as c:
            stale = c.execute(q).all()
        n = 0
        for rid, _project in stale:
            with self._tx() as c:  # still expired? (it may have been voided and held again)
                n += self._void(c, rid, now, expired_only=True)
        return n

    def _transfers(
        self,
        c: Connection,
        request_id: str,
        project: str,
        parts: list[tuple[str, int]],
        mode: str,
        identity: str,
        now: float,
        attempt: int = 1,
        note: str = "",
    ) -> None:
        self._transfers_sql.run_many(
            c,
            [
                {
                    "id": transfer_id(request_id, kind if attempt == 1 else f"{kind}#{attempt}"),
                    "project": project,
                    "request_id": request_id,
                    "kind": kind,
                    "amount": amount,
                    "mode": mode,
                    "identity": identity,
                    "created_at": now,
                    "note": note,
                }
                for kind, amount in parts
            ],
        )


class _WriterLock:
    """Serialises the writers of a SQLite ledger, across threads and processes.

    A blocked ``flock`` wakes as soon as the lock is free; SQLite's own busy handler sleeps
    and retries, which wastes most of the time under contention. PostgreSQL needs nothing:
    for it this lock does nothing.
    """

    def __init__(self, url: str) -> None:
        self._path: Path | None = None
        self._fd: int | None = None
        self._pid = 0
        self._thread = threading.Lock()
        db = sa.engine.make_url(url).database if url.startswith("sqlite") else None
        if db and db != ":memory:":
            self._path = Path(db + ".writer-lock")

    def __enter__(self) -> None:
        if self._path is None:
            return
        if self._pid != os.getpid():  # a forked child: its own thread lock and descriptor
            self._thread = threading.Lock()
            self._fd = None
        self._thread.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
                self._pid = os.getpid()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread.release()
            raise

    def __exit__(self, *exc: object) -> None:
        if self._path is None:
            return
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread.release()

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


def _reason(e: sa.exc.DBAPIError) -> str:
    """The driver's own first line (``connection refused``, ``unable to open database file``)."""
    text = str(e.orig if e.orig is not None else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _make_engine(url: str) -> Engine:
    try:
        u = sa.engine.make_url(url)
    except sa.exc.ArgumentError as e:  # not echoed: it may hold a password
        raise ConfigError("the ledger URL (TPM_FAAS_LEDGER) is not a database URL") from e
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite and u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        parent = Path(u.database).parent
        if not parent.is_dir():
            raise ConfigError(
                f"no ledger at {u.database}: the directory {parent} does not exist "
                "(is TPM_FAAS_HOME or TPM_FAAS_LEDGER right?)"
            )
    try:
        if not sqlite:
            connect_args: dict[str, Any] = {}
            if u.get_backend_name() == "postgresql" and "connect_timeout" not in u.query:
                connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
            return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "isolation_level": None})
    except (sa.exc.ArgumentError, ImportError) as e:
        raise ConfigError(f"cannot use the ledger {safe_url(url)}: {e}") from e

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front so they serialise instead of deadlocking;
        # readers see a snapshot and never wait (WAL).
        write = conn.get_execution_options().get("tpm_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
