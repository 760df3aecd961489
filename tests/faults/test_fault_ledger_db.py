"""The ledger's PostgreSQL database unreachable for a few seconds, under the embedded site.

The cut is this suite's own database only (``ALLOW_CONNECTIONS false`` and every open
connection terminated): the server, and whoever else uses it, keeps serving. While it is cut
every request is refused with ``ledger_unavailable`` (layer ``ledger``) and charged nothing;
the request in flight when it was cut is either charged once or voided (its failed void is
retried until the database answers); afterwards requests are served and the books balance.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from faults._faults import (
    FAULTS_DB,
    assert_books_clean,
    cut_database,
    hold_row,
    restore_database,
    wait_for,
)
from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite

PROMPTS = [f"And Noah begat {k}" for k in range(8)]


def test_requests_are_refused_cleanly_while_the_ledger_is_cut_off(
    pg_site: EmbeddedSite, pg_admin: Any
) -> None:
    site = pg_site
    client = site.client("dev", retries=0)  # what one request sees, not the retries
    client.generate("In the beginning", max_new_tokens=4)  # warm: gateways built
    ledger = site.ledger()
    before = ledger.balance("demo")

    inflight: dict[str, Any] = {}

    def call() -> None:
        try:
            inflight["result"] = client.generate(PROMPTS, max_new_tokens=256)
        except BaseException as e:
            inflight["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    held = wait_for("the in-flight request's hold", lambda: ledger.open_holds("demo"), 60, 0.02)
    inflight_id = held[0]["request_id"]
    cut_database(pg_admin, FAULTS_DB)
    refused: list[RemoteError] = []
    try:
        t_cut = time.monotonic()
        while time.monotonic() - t_cut < 4 or not refused:
            t0 = time.monotonic()
            try:
                client.generate("And it was so", max_new_tokens=4)
            except RemoteError as e:
                refused.append(e)
                assert e.code == "ledger_unavailable" and e.remote_layer == "ledger", e
                assert time.monotonic() - t0 < 15  # refused, not hung on the database
            else:
                raise AssertionError("a request was served while the ledger was cut off")
        caller.join(120)
        assert not caller.is_alive()
    finally:
        restore_database(pg_admin, FAULTS_DB)
    print(f"\n[faults] ledger cut off: {len(refused)} requests refused, e.g. {refused[0]}")

    served = client.generate("And it was so", max_new_tokens=4)  # served again
    charged = [served]
    if "result" in inflight:  # it was posted before the cut reached it
        charged.append(inflight["result"])
        assert hold_row(ledger, inflight_id)["state"] == "posted"
    else:
        err = inflight["error"]
        assert isinstance(err, RemoteError) and err.code == "ledger_unavailable", err
        # Its void failed while the database was away; the worker retries it.
        wait_for(
            "the in-flight request's hold to be voided",
            lambda: hold_row(ledger, inflight_id)["state"] == "voided",
            30,
        )
    for e in refused:  # refused before any hold: nothing recorded, nothing charged
        assert e.request_id and hold_row(ledger, e.request_id) is None
    assert_books_clean(ledger)
    after = ledger.balance("demo")
    assert after.charged - before.charged == sum(round(r.usage["su"] * 1e6) for r in charged)
    ledger.close()
