"""Issue 12, defect 6: the endpoint's worker processes SIGKILLed during a request.

Before: no reply (nothing within 60 s), the workers left as zombies and never replaced, the
next request hung too, and the hold stayed open until it expired. Now: the caller gets
``task_failed`` (layer ``compute``) naming the lost worker within seconds, a new block of
workers serves the next request, and the orphaned hold is voided by the next worker that
takes a hold on this host.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from faults._faults import alive, assert_books_clean, pool_of, wait_for
from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite

#: The longest a caller may wait for the error: the pool watch's grace (5 s) + the
#: interchange's heartbeat threshold (10 s) + slack for a loaded 2-core machine.
ERROR_WITHIN_S = 45.0
LONG = {"max_new_tokens": 256}
PROMPTS = [f"And the LORD spake unto Moses, saying {k}" for k in range(8)]


def test_killed_workers_fail_the_request_and_are_replaced(pg_site: EmbeddedSite) -> None:
    site = pg_site
    client = site.client("dev", retries=0)  # what one request sees, not the retries
    assert client.generate("In the beginning", max_new_tokens=4).text  # warm
    ledger = site.ledger()
    before = ledger.balance("demo")
    run_dir = site.endpoint.run_dir
    pool, children = pool_of(run_dir)
    assert len(children) >= 3, children  # two workers and the pool's helpers

    outcome: dict[str, Any] = {}

    def call() -> None:
        t0 = time.monotonic()
        try:
            outcome["result"] = client.generate(PROMPTS, **LONG)
        except BaseException as e:  # what the caller gets
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - t0

    caller = threading.Thread(target=call)
    caller.start()
    held = wait_for("the request's hold", lambda: ledger.open_holds("demo"), 60, every=0.02)
    # Every process of the pool but the pool itself: its workers and its helpers (the queue
    # manager and the resource tracker), as `kill -9` of the workers by name does.
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    caller.join(ERROR_WITHIN_S + 30)
    assert not caller.is_alive(), "the caller got no reply"
    err = outcome.get("error")
    assert isinstance(err, RemoteError), outcome
    assert err.code == "task_failed" and err.remote_layer == "compute"
    assert "ManagerLost" in err.message or "WorkerLost" in err.message, err.message
    waited = time.monotonic() - t_kill
    assert waited < ERROR_WITHIN_S, waited
    print(f"\n[faults] worker kill: the caller's error came {waited:.1f} s after the kill")

    # A new block serves the next request; its first hold voids the orphan.
    t0 = time.monotonic()
    again = client.generate("In the beginning", max_new_tokens=4)
    print(f"[faults] worker kill: next request served {time.monotonic() - t0:.1f} s later")
    assert again.usage["su"] > 0
    orphan = held[0]["request_id"]
    state = {h["request_id"]: h for h in ledger.open_holds()}
    assert orphan not in state
    assert_books_clean(ledger)
    after = ledger.balance("demo")
    assert after.charged - before.charged == round(again.usage["su"] * 1e6)  # the lost one: free

    # Nothing of the old pool is left, zombies included.
    wait_for("the old pool's processes to go", lambda: not alive([pool, *children]), 30)
    new_pool, _ = pool_of(run_dir)
    assert new_pool != pool
    assert site.endpoint._watch.replaced >= 1
    ledger.close()


@pytest.fixture(autouse=True)
def _log_to_stdout() -> None:
    import logging

    logging.getLogger("tpm_faas").setLevel(logging.INFO)
