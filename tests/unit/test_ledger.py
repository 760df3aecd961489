"""The SU ledger on a real SQLite database: holds, posts, voids, expiry, idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpm_faas.errors import DuplicateRequest, InsufficientFunds
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
