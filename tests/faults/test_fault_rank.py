"""A rank of a tp=2 shard group SIGKILLed while rank 0 serves a generation.

The caller gets ``shard_unavailable`` (layer ``shard``) promptly, its hold is voided, the
group is found unhealthy and restarted (as :meth:`tpm_faas.launcher.ReplicaSet.supervise`
does), the next request is served, and nothing of the old group is left.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from faults._faults import alive, assert_books_clean, hold_row, wait_for
from tpm_faas.errors import RemoteError
from tpm_faas.testing.embedded import EmbeddedSite


@pytest.fixture(scope="module")
def tp2_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSite]:
    site = EmbeddedSite(tmp_path_factory.mktemp("faults-tp2"), tp_size=2)
    site.start()
    try:
        yield site
    finally:
        site.stop()


def test_a_killed_rank_fails_the_request_and_the_group_restarts(tp2_site: EmbeddedSite) -> None:
    site = tp2_site
    client = site.client("dev", retries=0)  # what one request sees, not the retries
    want = client.generate("In the beginning", max_new_tokens=8).raw["output"]["completions"]
    ledger = site.ledger()
    before = ledger.balance("demo")
    ranks = site.group.client().ping()["memory"]
    old = [int(r["pid"]) for r in ranks]
    assert len(old) == 2

    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["result"] = client.generate(
                [f"And Jacob said {k}" for k in range(8)], max_new_tokens=256
            )
        except BaseException as e:
            outcome["error"] = e

    caller = threading.Thread(target=call)
    caller.start()
    held = wait_for("the request's hold", lambda: ledger.open_holds("demo"), 60, 0.02)
    os.kill(old[1], signal.SIGKILL)
    t_kill = time.monotonic()
    caller.join(90)
    assert not caller.is_alive(), "the caller got no reply"
    waited = time.monotonic() - t_kill
    err = outcome.get("error")
    assert isinstance(err, RemoteError), outcome
    assert err.code == "shard_unavailable" and err.remote_layer == "shard", err
    assert waited < 30, waited
    print(f"\n[faults] rank kill: shard_unavailable {waited:.1f} s after the kill")
    assert hold_row(ledger, held[0]["request_id"])["state"] == "voided"

    # The supervisor's step: an unhealthy group is restarted.
    wait_for("the group to be found unhealthy", lambda: not site.group.healthy(), 60, 0.5)
    t0 = time.monotonic()
    site.group.restart()
    print(f"[faults] rank kill: group restarted in {time.monotonic() - t0:.1f} s")
    assert site.group.healthy()
    again = client.generate("In the beginning", max_new_tokens=8)
    got = again.raw["output"]["completions"]
    assert [c["token_ids"] for c in got] == [c["token_ids"] for c in want]  # greedy: the same
    assert_books_clean(ledger)
    assert ledger.balance("demo").charged - before.charged == round(again.usage["su"] * 1e6)
    wait_for("the old ranks to go", lambda: not alive(old), 30)
    ledger.close()
