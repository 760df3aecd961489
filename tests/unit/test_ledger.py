"""The SU ledger on a real SQLite database: holds, posts, voids, expiry, idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from tpm_faas.errors import DuplicateRequest, InsufficientFunds, LedgerError
from tpm_faas.gateway.ledger import Ledger, transfer_id


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    lg = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}", clock=Clock())
    lg.credit("p", 1000, reference="seed")
    return lg


def test_credit_is_idempotent_by_reference(ledger: Ledger) -> None:
    ledger.credit("p", 1000, reference="seed")
    assert ledger.balance("p").credited == 1000


def test_hold_post_releases_remainder(ledger: Ledger) -> None:
    ledger.hold("r1", "p", 600, ttl_s=60)
    assert ledger.balance("p").available == 400
    assert ledger.post("r1", 250) == 250
    b = ledger.balance("p")
    assert (b.charged, b.held, b.available) == (250, 0, 750)


def test_post_capped_at_hold(ledger: Ledger) -> None:
    ledger.hold("r1", "p", 100, ttl_s=60)
    assert ledger.post("r1", 5000) == 100


def test_overdraw_refused_and_nothing_recorded(ledger: Ledger) -> None:
    with pytest.raises(InsufficientFunds, match="available"):
        ledger.hold("r1", "p", 1001, ttl_s=60)
    assert ledger.open_holds() == [] and ledger.balance("p").available == 1000


def test_unknown_project_refused(ledger: Ledger) -> None:
    with pytest.raises(InsufficientFunds, match="no allocation"):
        ledger.hold("r1", "nobody", 1, ttl_s=60)


def test_void_charges_nothing(ledger: Ledger) -> None:
    ledger.hold("r1", "p", 500, ttl_s=60)
    assert ledger.void("r1")
    assert not ledger.void("r1")
    assert ledger.balance("p").available == 1000


def test_retried_request_never_charged_twice(ledger: Ledger) -> None:
    ledger.hold("r1", "p", 100, ttl_s=60)
    ledger.post("r1", 100)
    with pytest.raises(DuplicateRequest):
        ledger.hold("r1", "p", 100, ttl_s=60)
    with pytest.raises(DuplicateRequest):
        ledger.post("r1", 100)
    assert ledger.balance("p").charged == 100


def test_holds_expire(ledger: Ledger) -> None:
    clock = ledger._clock
    assert isinstance(clock, Clock)
    ledger.hold("r1", "p", 900, ttl_s=10)
    clock.t += 11
    ledger.hold("r2", "p", 900, ttl_s=10)  # admitted: r1 was voided on expiry
    assert [h["request_id"] for h in ledger.open_holds()] == ["r2"]
    with pytest.raises(DuplicateRequest):
        ledger.post("r1", 1)


def test_transfer_ids_deterministic() -> None:
    assert transfer_id("a", "hold") == transfer_id("a", "hold") != transfer_id("a", "post")


def test_a_voided_request_may_be_held_again_but_charged_once(ledger: Ledger) -> None:
    """A client failing over to another endpoint reuses its request id: the voided attempt
    is held again (its own transfers), and once posted no further attempt is admitted."""
    ledger.hold("r1", "p", 300, ttl_s=60, identity="a")
    assert ledger.void("r1")
    ledger.hold("r1", "p", 400, ttl_s=60, identity="a")  # the failover attempt
    assert ledger.balance("p").held == 400
    with pytest.raises(DuplicateRequest):
        ledger.hold("r1", "p", 400, ttl_s=60)  # while held: refused
    assert ledger.post("r1", 250) == 250
    with pytest.raises(DuplicateRequest):
        ledger.hold("r1", "p", 100, ttl_s=60)  # posted: never again
    bal = ledger.balance("p")
    assert (bal.charged, bal.held) == (250, 0)
    assert ledger.open_holds()[0:] == [] and ledger.charges("p")[0]["attempt"] == 2
    assert ledger.reconcile().ok


def test_a_retry_of_a_charged_request_is_a_duplicate_even_without_funds(ledger: Ledger) -> None:
    ledger.hold("r1", "p", 1000, ttl_s=60)
    ledger.post("r1", 1000)  # the whole allocation is spent
    with pytest.raises(DuplicateRequest):
        ledger.hold("r1", "p", 1000, ttl_s=60)


def test_expiry_never_voids_a_newer_attempt(ledger: Ledger) -> None:
    clock = ledger._clock
    assert isinstance(clock, Clock)
    ledger.hold("r1", "p", 100, ttl_s=10)
    ledger.void("r1")
    clock.t += 5
    ledger.hold("r1", "p", 100, ttl_s=60)  # attempt 2 expires at +65
    clock.t += 20  # past attempt 1's expiry, not attempt 2's
    assert ledger.expire_holds() == 0
    assert ledger.post("r1", 50) == 50


def test_holds_record_their_model_and_charged_models_are_posted_or_in_flight(
    ledger: Ledger,
) -> None:
    ledger.hold("r1", "p", 100, ttl_s=60, model="m@1")
    ledger.post("r1", 10)
    ledger.hold("r2", "p", 100, ttl_s=60, model="m@2")  # held, never posted
    ledger.hold("r3", "p", 100, ttl_s=60, model="m@3")
    ledger.void("r3")
    ledger.hold("r4", "p", 100, ttl_s=60)  # no model recorded
    ledger.post("r4", 10)
    assert ledger.charged_models() == {"m@1", "m@2"}  # r2 is in flight: charged when done
    ledger.void("r2")
    assert ledger.charged_models() == {"m@1"}
    ledger.hold("r3", "p", 100, ttl_s=60, model="m@4")  # a failover attempt on another version
    ledger.post("r3", 10)
    assert ledger.charged_models() == {"m@1", "m@4"}
    assert ledger.charges("p")[0]["model"] == "m@1"
    assert [r["requests"] for r in ledger.usage("p")] == [3]
    assert "model" not in ledger.usage("p")[0]
    rows = ledger.usage("p", by_model=True)
    assert [(r["model"], r["requests"], r["charged_micro"]) for r in rows] == [
        ("", 1, 10), ("m@1", 1, 10), ("m@4", 1, 10)
    ]  # fmt: skip
    with pytest.raises(LedgerError, match="200"):
        ledger.hold("r5", "p", 1, ttl_s=60, model="m@" + "9" * 200)
    assert ledger.reconcile().ok


def test_a_ledger_made_before_models_gains_the_column(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    ledger = Ledger(url)
    ledger.credit("p", 1000)
    ledger.hold("old", "p", 100, ttl_s=3600)
    ledger.post("old", 50)
    ledger.close()
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE holds DROP COLUMN model")
    engine.dispose()
    ledger = Ledger(url)
    assert ledger.charges("p")[0]["model"] == "" and ledger.charged_models() == set()
    ledger.hold("new", "p", 100, ttl_s=3600, model="m@2")
    ledger.post("new", 50)
    assert ledger.charged_models() == {"m@2"}
    assert ledger.reconcile().ok
    ledger.close()
