"""Federation: several endpoints (at one or more RCCs) serving the same ``model@version``.

:class:`FederatedTransport` is a :class:`tpm_faas.client.Transport` over named transports
(e.g. one :class:`~tpm_faas.compute.sdk.ExecutorTransport` per endpoint of a manifest). Each
call goes to the healthy endpoint with the lowest observed latency (an exponentially weighted
mean; endpoints not yet measured are tried first), and fails over to the next when the
endpoint fails: the task itself fails (endpoint down, function refused, result lost) or the
gateway answers that its shard group is unavailable. The retry sends **the same request**
(same ``request_id``), so a ledger shared by the endpoints never charges twice: a request
that was charged is refused as a duplicate, one that was voided is held again. (Endpoints at
different sites keep different ledgers; a request lost after being charged at one site can be
charged again at another.) A failed endpoint sits out for
``cooldown_s`` seconds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

#: Gateway error codes that mean "this endpoint cannot serve it now": try another one.
FAILOVER_CODES = frozenset({"shard_unavailable", "shard_timeout", "unknown_model"})


class _Transport(Protocol):
    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]: ...


@dataclass
class EndpointStats:
    latency_s: float | None = None
    failures: int = 0
    successes: int = 0
    down_until: float = 0.0
    last_error: str = ""


class FederatedTransport:
    """Pick by health and latency; fail over with the same request.

    :param transports: endpoint name (or id) -> transport
    :param cooldown_s: how long a failed endpoint is skipped
    :param alpha: weight of the newest latency in the moving average
    """

    def __init__(
        self,
        transports: Mapping[str, _Transport],
        *,
        cooldown_s: float = 30.0,
        alpha: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not transports:
            raise ValueError("a federation needs at least one endpoint")
        self.transports = dict(transports)
        self.stats = {name: EndpointStats() for name in self.transports}
        self.cooldown_s = cooldown_s
        self.alpha = alpha
        self._clock = clock
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """Endpoints in the order the next call tries them."""
        now = self._clock()
        with self._lock:
            names = list(self.transports)

            def key(n: str) -> tuple[int, float]:
                s = self.stats[n]
                down = 1 if s.down_until > now else 0
                return (down, -1.0 if s.latency_s is None else s.latency_s)

            return sorted(names, key=key)

    def submit(self, mode: str, request_json: str, token: str | None) -> Future[str]:
        out: Future[str] = Future()
        out.set_running_or_notify_cancel()
        self._attempt(mode, request_json, token, self.order(), [], out)
        return out

    # -- internals ----------------------------------------------------------------------
    def _attempt(
        self,
        mode: str,
        request_json: str,
        token: str | None,
        todo: list[str],
        errors: list[str],
        out: Future[str],
    ) -> None:
        if not todo:
            out.set_exception(
                RuntimeError("every endpoint of the federation failed: " + "; ".join(errors))
            )
            return
        name, rest = todo[0], todo[1:]
        started = self._clock()
        try:
            fut = self.transports[name].submit(mode, request_json, token)
        except Exception as e:
            self._failed(name, f"{type(e).__name__}: {e}")
            errors.append(f"{name}: {type(e).__name__}: {e}")
            self._attempt(mode, request_json, token, rest, errors, out)
            return

        def done(f: Future[str]) -> None:
            try:
                why: str | None
                try:
                    reply = f.result()
                except Exception as e:
                    why = f"{type(e).__name__}: {e}"
                else:
                    why = _failover_reason(reply)
                    if why is None:
                        self._succeeded(name, self._clock() - started)
                        out.set_result(reply)
                        return
                self._failed(name, why)
                errors.append(f"{name}: {why}")
                self._attempt(mode, request_json, token, rest, errors, out)
            except BaseException as e:  # never leave the caller waiting
                if not out.done():
                    out.set_exception(e)

        fut.add_done_callback(done)

    def _succeeded(self, name: str, seconds: float) -> None:
        with self._lock:
            s = self.stats[name]
            s.successes += 1
            s.down_until = 0.0
            s.latency_s = (
                seconds
                if s.latency_s is None
                else (1 - self.alpha) * s.latency_s + self.alpha * seconds
            )

    def _failed(self, name: str, why: str) -> None:
        with self._lock:
            s = self.stats[name]
            s.failures += 1
            s.last_error = why
            s.down_until = self._clock() + self.cooldown_s


def _failover_reason(reply: str) -> str | None:
    """Why a reply means "try another endpoint", or ``None`` to keep it."""
    try:
        data: Any = json.loads(reply)
    except (TypeError, ValueError):
        return None  # not ours to judge: the client will say it is malformed
    if not isinstance(data, dict) or data.get("ok", True):
        return None
    err = data.get("error")
    if not isinstance(err, dict):
        return None
    code = str(err.get("code", ""))
    if code in FAILOVER_CODES:
        return f"{code}: {err.get('message', '')}"
    return None
