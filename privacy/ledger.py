"""Per-device privacy budget ledger: every DP training run is charged before its update leaves the device.

A device keeps one ledger of record-level DP-SGD runs (``privacy/dp_sgd.py``). ``charge`` composes the new
run with every recorded one by Renyi DP (``privacy.accountant.epsilon_of``: RDP summed per order, then one
(epsilon, delta) conversion; never a naive sum of epsilons), refuses it with ``BudgetExhausted`` when the
total would exceed the budget, and otherwise persists the entry *before* returning. So the order on a
device is: charge -> train -> release; a crash between charge and release wastes budget, it never
under-counts it. Once the budget is spent every further run is refused.

A run without noise (noise_multiplier 0) has infinite epsilon: refused under any finite budget.

Storage is pluggable (``LedgerStorage``: ``load`` / ``save`` of opaque bytes), so the device can keep the
ledger encrypted in its store; ``FileLedgerStorage`` writes a file atomically (temp file, fsync, rename).
Bytes that do not parse as a ledger raise ``PrivacyError``: a corrupt ledger is never silently treated as
zero spend.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from privacy.accountant import check_delta, check_sgm, epsilon_of

LEDGER_FORMAT = 1


class PrivacyError(Exception):
    """A privacy guarantee cannot be kept (corrupt ledger, refused run, ...)."""


class BudgetExhausted(PrivacyError):
    """The run would take the device past its privacy budget."""


@runtime_checkable
class LedgerStorage(Protocol):
    """Where a ledger's bytes live."""

    def load(self) -> bytes | None:
        """The stored bytes, or None when nothing was ever saved."""
        ...

    def save(self, data: bytes) -> None:
        """Replace the stored bytes durably (all or nothing)."""
        ...


class FileLedgerStorage:
    """A ledger file, replaced atomically: temp file in the same directory, fsync, os.replace, fsync dir."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        """Write ``data`` to the file so a crash leaves either the old or the new content."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)


def _entry(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, at_ms: int, round: int | None
) -> dict:
    entry: dict[str, object] = {
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "steps": int(steps),
        "delta": float(delta),
        "at_ms": int(at_ms),
    }
    if round is not None:
        entry["round"] = int(round)
    return entry


def _parse(data: bytes) -> list[dict]:
    """Entries from stored bytes; PrivacyError on anything that is not a well-formed ledger."""
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrivacyError(f"privacy ledger is corrupt (not JSON): {err}") from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != LEDGER_FORMAT
        or not isinstance(payload.get("entries"), list)
    ):
        raise PrivacyError(
            f"privacy ledger is corrupt or of an unknown format (expected format {LEDGER_FORMAT})"
        )
    entries = []
    for i, raw in enumerate(payload["entries"]):
        try:
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            round_ = raw.get("round")
            if round_ is not None and (isinstance(round_, bool) or not isinstance(round_, int)):
                raise ValueError(f"bad round {round_!r}")
            steps, at_ms = raw["steps"], raw["at_ms"]
            if isinstance(at_ms, bool) or not isinstance(at_ms, int):
                raise ValueError(f"bad at_ms {at_ms!r}")
            check_sgm(raw["noise_multiplier"], raw["sample_rate"], steps)
            check_delta(raw["delta"])
            entries.append(
                _entry(raw["noise_multiplier"], raw["sample_rate"], steps, raw["delta"], at_ms, round_)
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PrivacyError(f"privacy ledger entry {i} is corrupt: {err!r}") from None
    return entries


class PrivacyLedger:
    """Record-level DP runs of one device, composed by RDP against a budget (budget_epsilon, delta)."""

    def __init__(self, storage: LedgerStorage, budget_epsilon: float, delta: float) -> None:
        if not isinstance(budget_epsilon, (int, float)) or not budget_epsilon >= 0:  # NaN fails >= too
            raise ValueError(f"budget_epsilon must be >= 0 (math.inf for no limit), got {budget_epsilon!r}")
        check_delta(delta)
        self.storage = storage
        self.budget_epsilon = float(budget_epsilon)
        self.delta = float(delta)
        self._lock = threading.Lock()
        data = storage.load()
        self._entries: list[dict] = [] if data is None else _parse(data)

    @property
    def entries(self) -> list[dict]:
        """Copies of the recorded runs, oldest first."""
        return [dict(e) for e in self._entries]

    @staticmethod
    def _runs(entries: list[dict]) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]

    def spent(self) -> float:
        """Epsilon (at the ledger's delta) of the composition of every recorded run."""
        return epsilon_of(self._runs(self._entries), self.delta)

    def remaining(self) -> float:
        """Budget left (never negative)."""
        return max(0.0, self.budget_epsilon - self.spent())

    def would_spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Total epsilon if a run (noise_multiplier, sample_rate, steps) were added now."""
        check_sgm(noise_multiplier, sample_rate, steps)
        return epsilon_of([*self._runs(self._entries), (noise_multiplier, sample_rate, steps)], self.delta)

    def charge(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        round: int | None = None,
        at_ms: int | None = None,
    ) -> float:
        """Record a run and persist it, or raise BudgetExhausted; returns the new total epsilon.

        Call it BEFORE training (and so before the update is released). Nothing is recorded when refused.
        """
        with self._lock:
            total = self.would_spend(noise_multiplier, sample_rate, steps)
            if total > self.budget_epsilon:
                spent = self.spent()
                raise BudgetExhausted(
                    f"privacy budget exhausted: spent epsilon={spent:.4g} of {self.budget_epsilon:.4g} "
                    f"(delta={self.delta:g}); this run (noise_multiplier={noise_multiplier}, "
                    f"sample_rate={sample_rate:.4g}, steps={steps}) would make it {total:.4g}"
                )
            at_ms = int(time.time() * 1000) if at_ms is None else at_ms
            entries = [*self._entries, _entry(noise_multiplier, sample_rate, steps, self.delta, at_ms, round)]
            self.storage.save(self._serialize(entries))  # persisted first: a failed save records nothing
            self._entries = entries
            return total

    def _serialize(self, entries: list[dict]) -> bytes:
        payload = {
            "format": LEDGER_FORMAT,
            # Informational: the policy in force at the last charge (the constructor's values always apply).
            "budget_epsilon": None if math.isinf(self.budget_epsilon) else self.budget_epsilon,
            "delta": self.delta,
            "entries": entries,
        }
        return json.dumps(payload, sort_keys=True, allow_nan=False).encode("utf-8")

    def __repr__(self) -> str:
        return f"PrivacyLedger(spent={self.spent():.4g}, budget={self.budget_epsilon:g}, delta={self.delta:g}, runs={len(self._entries)})"
