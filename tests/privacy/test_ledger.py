"""Per-device privacy ledger: persisted composition, refusal past the budget, corrupt storage."""

from __future__ import annotations

import json
import math

import pytest

from privacy.accountant import epsilon_for, epsilon_of
from privacy.ledger import BudgetExhausted, FileLedgerStorage, LedgerStorage, PrivacyError, PrivacyLedger

DELTA = 1e-5
RUN = (1.0, 0.05, 100)  # (noise_multiplier, sample_rate, steps)
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order")


class MemoryStorage:
    def __init__(self, data: bytes | None = None, fail: bool = False) -> None:
        self.data, self.fail, self.saves = data, fail, 0

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        if self.fail:
            raise OSError("disk full")
        self.data, self.saves = data, self.saves + 1


def test_storages_satisfy_the_protocol(tmp_path):
    assert isinstance(MemoryStorage(), LedgerStorage)
    assert isinstance(FileLedgerStorage(tmp_path / "l.json"), LedgerStorage)


def test_charges_persist_and_reload(tmp_path):
    storage = FileLedgerStorage(tmp_path / "device" / "privacy.json")
    assert storage.load() is None
    ledger = PrivacyLedger(storage, budget_epsilon=50.0, delta=DELTA)
    assert ledger.spent() == 0.0
    first = ledger.charge(*RUN, round=3, at_ms=1_700_000_000_000)
    ledger.charge(2.0, 0.1, 40)
    reloaded = PrivacyLedger(
        FileLedgerStorage(tmp_path / "device" / "privacy.json"), budget_epsilon=50.0, delta=DELTA
    )
    assert reloaded.entries == ledger.entries and reloaded.spent() == ledger.spent()
    entry = reloaded.entries[0]
    assert entry == {
        "noise_multiplier": 1.0,
        "sample_rate": 0.05,
        "steps": 100,
        "delta": DELTA,
        "at_ms": 1_700_000_000_000,
        "round": 3,
    }
    assert "round" not in reloaded.entries[1] and reloaded.entries[1]["at_ms"] > 0
    assert first == pytest.approx(epsilon_for(*RUN, DELTA))
    assert [p.name for p in (tmp_path / "device").iterdir()] == ["privacy.json"]  # no temp files left behind


def test_spent_is_the_rdp_composition():
    ledger = PrivacyLedger(MemoryStorage(), budget_epsilon=100.0, delta=DELTA)
    other = (2.0, 0.1, 40)
    predicted = ledger.would_spend(*RUN)  # records nothing
    assert ledger.entries == [] and predicted == pytest.approx(epsilon_for(*RUN, DELTA))
    ledger.charge(*RUN)
    total = ledger.charge(*other)
    single = (epsilon_for(*RUN, DELTA), epsilon_for(*other, DELTA))
    assert max(single) < ledger.spent() < sum(single)
    assert ledger.spent() == pytest.approx(total) == pytest.approx(epsilon_of([RUN, other], DELTA))
    assert ledger.remaining() == pytest.approx(100.0 - total)


def test_runs_past_the_budget_are_refused_and_not_recorded():
    storage = MemoryStorage()
    one_run, two_runs = epsilon_for(*RUN, DELTA), epsilon_of([RUN, RUN], DELTA)
    ledger = PrivacyLedger(storage, budget_epsilon=(one_run + two_runs) / 2, delta=DELTA)
    ledger.charge(*RUN)
    saved, entries = storage.data, ledger.entries
    with pytest.raises(BudgetExhausted, match="exhausted") as info:
        ledger.charge(*RUN)
    assert isinstance(info.value, PrivacyError)
    assert storage.data == saved and ledger.entries == entries
    ledger.charge(8.0, 0.01, 1)  # a much cheaper run still fits ...
    assert ledger.spent() <= ledger.budget_epsilon
    tight = PrivacyLedger(storage, budget_epsilon=ledger.spent(), delta=DELTA)
    with pytest.raises(BudgetExhausted):  # ... and once nothing is left, everything is refused
        tight.charge(50.0, 0.001, 1)


def test_non_private_runs_are_infinite_spend():
    with pytest.raises(BudgetExhausted):
        PrivacyLedger(MemoryStorage(), budget_epsilon=1e9, delta=DELTA).charge(0.0, 0.1, 1)
    unlimited = PrivacyLedger(MemoryStorage(), budget_epsilon=math.inf, delta=DELTA)
    unlimited.charge(0.0, 0.1, 1)
    assert unlimited.spent() == math.inf


def test_failed_save_records_nothing():
    storage = MemoryStorage(fail=True)
    ledger = PrivacyLedger(storage, budget_epsilon=10.0, delta=DELTA)
    with pytest.raises(OSError):
        ledger.charge(*RUN)
    assert ledger.entries == [] and ledger.spent() == 0.0


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\xffnot json",
        b"[]",
        json.dumps({"format": 2, "entries": []}).encode(),
        json.dumps({"format": 1}).encode(),
        json.dumps(
            {
                "format": 1,
                "entries": [
                    {"noise_multiplier": -1.0, "sample_rate": 0.1, "steps": 1, "delta": 1e-5, "at_ms": 0}
                ],
            }
        ).encode(),
        json.dumps(
            {"format": 1, "entries": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "at_ms": 0}]}
        ).encode(),
        json.dumps(
            {
                "format": 1,
                "entries": [
                    {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": "1", "delta": 1e-5, "at_ms": 0}
                ],
            }
        ).encode(),
    ],
)
def test_corrupt_ledgers_raise_instead_of_resetting(tmp_path, data):
    path = tmp_path / "privacy.json"
    path.write_bytes(data)
    with pytest.raises(PrivacyError, match="corrupt"):
        PrivacyLedger(FileLedgerStorage(path), budget_epsilon=10.0, delta=DELTA)
    assert path.read_bytes() == data  # left for inspection, never overwritten


def test_constructor_validation():
    for budget, delta in ((-1.0, DELTA), (math.nan, DELTA), (1.0, 0.0), (1.0, 1.0)):
        with pytest.raises(ValueError):
            PrivacyLedger(MemoryStorage(), budget_epsilon=budget, delta=delta)
    ledger = PrivacyLedger(MemoryStorage(), budget_epsilon=1.0, delta=DELTA)
    with pytest.raises(ValueError):
        ledger.charge(1.0, 0.0, 1)
