"""Holds left open by a gateway process that died, and the rules that void them.

A hold records its owner (host key, pid, start time). A gateway process killed between hold
and post leaves its hold open; the next gateway process on the host voids it before its first
hold, with no operator. Holds of other hosts are never judged here (only their own host can
tell whether their owner lives; they expire), and a reused pid does not keep a hold alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from faults._faults import alive, assert_books_clean, hold_row, wait_for
from tpm_faas.gateway.ledger import Ledger, holds, process_owner
from tpm_faas.testing.embedded import EmbeddedSite

# One request through a gateway built in a process of its own, as an endpoint worker does.
GATEWAY = """
import json, sys
from tpm_faas.config import Settings
from tpm_faas.gateway.pipeline import Gateway, respond
gateway = Gateway.from_settings(Settings.from_env(dict(__import__("os").environ)))
print(respond(gateway, "query", sys.argv[1], sys.argv[2]), flush=True)
"""


def _gateway(site: EmbeddedSite, request: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, **site.settings.to_env()}
    return subprocess.Popen(
        [sys.executable, "-c", GATEWAY, json.dumps(request), site.tokens["dev"]],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_restarted_gateway_voids_the_holds_its_killed_predecessor_left(
    pg_site: EmbeddedSite,
) -> None:
    site = pg_site
    ledger = site.ledger()
    before = ledger.balance("demo")
    rid = f"killed-gateway-{uuid.uuid4()}"
    long = {
        "model": site.model,
        "request_id": rid,
        "prompts": [f"And Enoch walked {k}" for k in range(8)],
        "max_new_tokens": 256,
    }
    first = _gateway(site, long)
    try:
        wait_for("the first gateway's hold", lambda: hold_row(ledger, rid), 120, 0.02)
        row = hold_row(ledger, rid)
        assert row["state"] == "held" and row["owner_pid"] == first.pid
        assert row["owner_host"] == process_owner()[0]
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        assert first.stdout is not None
        first.stdout.close()
    assert hold_row(ledger, rid)["state"] == "held"  # open, and its owner is gone

    t0 = time.monotonic()
    second = _gateway(
        site, {"model": site.model, "prompts": ["And it was so"], "max_new_tokens": 4}
    )
    out, _ = second.communicate(timeout=300)
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["ok"], reply
    print(f"\n[faults] restarted gateway served in {time.monotonic() - t0:.1f} s")
    assert hold_row(ledger, rid)["state"] == "voided"
    assert_books_clean(ledger)
    assert ledger.balance("demo").charged - before.charged == round(reply["usage"]["su"] * 1e6)
    assert not alive([first.pid, second.pid])
    ledger.close()


def test_only_this_hosts_dead_owners_are_voided(tmp_path: Path) -> None:
    """A hold of another host (or of no known owner) is left to its expiry; one whose pid
    was reused (another start time) is voided; a live owner's hold stays."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    ledger.credit("p", 10_000_000)
    host, me, start = process_owner()
    assert host and me == os.getpid() and start > 0
    for rid in ("other-host", "reused-pid", "mine", "unknown"):
        ledger.hold(rid, "p", 1000, ttl_s=3600)
    with ledger.engine.begin() as c:
        for rid, values in {
            "other-host": {"owner_host": "elsewhere/boot/pid:[1]", "owner_pid": 1},
            "reused-pid": {"owner_start": start - 1},
            "unknown": {"owner_host": "", "owner_pid": 0, "owner_start": 0},
        }.items():
            c.execute(holds.update().where(holds.c.request_id == rid).values(**values))
    assert ledger.void_orphans() == 1
    states = {r: hold_row(ledger, r)["state"] for r in ("other-host", "reused-pid", "mine")}
    assert states == {"other-host": "held", "reused-pid": "voided", "mine": "held"}
    assert ledger.reconcile().ok
    ledger.close()


def test_old_ledgers_gain_owners_and_keep_their_holds(tmp_path: Path) -> None:
    """A ledger made before holds had owners is migrated; its open holds are left to expire."""
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    ledger = Ledger(url)
    ledger.credit("p", 10_000_000)
    ledger.hold("old", "p", 1000, ttl_s=3600)
    ledger.close()
    engine = sa.create_engine(url)
    with engine.begin() as c:
        for col in ("owner_host", "owner_pid", "owner_start"):
            c.exec_driver_sql(f"ALTER TABLE holds DROP COLUMN {col}")
    engine.dispose()
    ledger = Ledger(url)
    assert ledger.void_orphans() == 0
    assert hold_row(ledger, "old")["owner_host"] == ""
    ledger.hold("new", "p", 1000, ttl_s=3600)
    assert hold_row(ledger, "new")["owner_pid"] == os.getpid()
    assert ledger.void("old") and ledger.post("new", 500) == 500
    assert ledger.reconcile().ok
    ledger.close()
