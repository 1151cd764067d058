"""Device heterogeneity for simulations: availability, dropout, stragglers, deadlines, data volume skew.

Every decision is a pure function of ``(seed, stream, device, round)``: a counter-based hash (SplitMix64
finaliser applied to each key in turn, the construction SplittableRandom uses) turned into a uniform in
[0, 1). No global RNG state, no call-order dependence: asking whether device 7 drops out of round 12 gives
the same answer in any process, in any order, on a Ray worker or in the driver. Scalar methods
(``is_online`` ...) and vectorised ones (``online`` ...) use the same hash, so they always agree.

Knobs:
- ``dropout``: probability that a sampled (online) device drops out of a round (crash, network loss).
- ``availability``: ``None`` / ``"always"`` (every device always reachable) or ``"diurnal"``: a simulated
  day of ``rounds_per_day`` rounds; each device is online ``online_hours`` of its 24 h, starting at a
  device-specific phase (uniform over the day: devices spread over time zones and habits).
- ``straggler_fraction`` / ``straggler_delay_s``: a fixed share of devices is slow hardware; each round a
  straggler adds ``straggler_delay_s * (0.5 + U)`` seconds (mean ``straggler_delay_s``), others add 0.
- ``deadline_s``: a device whose round time (compute + delay) exceeds it is late and not aggregated.
- ``volume_skew``: Zipf exponent ``s`` of data volume: device weight ``w = U ** -s`` (rank-size law
  ``w_(k) ~ k ** -s``), min 1. Synthetic populations draw ``round(volume_base_sessions * w)`` sessions per
  device; real populations keep at most that many (most recent) training sessions; both are capped at
  ``volume_max_sessions``. ``0`` leaves volumes as the source has them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

AVAILABILITY_TRACES = ("always", "diurnal")

# Independent streams: one hash domain per kind of decision, so knobs never share randomness.
_STREAM_ONLINE_PHASE = 1
_STREAM_DROPOUT = 2
_STREAM_STRAGGLER = 3
_STREAM_DELAY = 4
_STREAM_VOLUME = 5
_STREAM_SAMPLE = 6

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MUL1 = _U64(0xBF58476D1CE4E5B9)
_MUL2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = _U64(30), _U64(27), _U64(31), _U64(11)
_TO_UNIT = 2.0**-53


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 step on a uint64 array (array arithmetic wraps silently, as the algorithm needs)."""
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _MUL1
    x = (x ^ (x >> _S27)) * _MUL2
    return x ^ (x >> _S31)


def _as_u64(values: object, name: str) -> np.ndarray:
    array = np.atleast_1d(np.asarray(values, dtype=np.int64))
    if array.size and int(array.min()) < 0:
        raise ValueError(f"{name} must be >= 0")
    return array.astype(np.uint64)


def hash_uniform(seed: int, stream: int, devices: object, round_: int = 0) -> np.ndarray:
    """Uniforms in [0, 1) keyed by (seed, stream, device, round); vectorised over ``devices``."""
    if seed < 0 or round_ < 0:
        raise ValueError("seed and round must be >= 0")
    base = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    base = _mix(base ^ np.uint64(stream))
    x = _mix(base ^ _as_u64(devices, "device index"))
    x = _mix(x ^ np.uint64(round_))
    return (x >> _S11).astype(np.float64) * _TO_UNIT


@dataclass(frozen=True)
class RoundPlan:
    """What happens to the devices sampled for one round, by reason (disjoint, sorted index arrays)."""

    round: int
    sampled: np.ndarray
    participants: np.ndarray  # trained and reported in time
    offline: np.ndarray  # not reachable in this round (availability trace)
    dropped: np.ndarray  # online but dropped out (dropout)
    late: np.ndarray  # reported after the deadline
    delays_s: np.ndarray  # extra seconds per sampled device (stragglers), aligned with ``sampled``

    def to_dict(self) -> dict[str, object]:
        """Counts for a metrics line."""
        return {
            "round": self.round,
            "sampled": int(self.sampled.size),
            "participants": int(self.participants.size),
            "offline": int(self.offline.size),
            "dropouts": int(self.dropped.size),
            "late": int(self.late.size),
        }


@dataclass(frozen=True)
class Heterogeneity:
    """Heterogeneity knobs of a simulated population; all draws are deterministic under ``seed``."""

    dropout: float = 0.0
    availability: str | None = None
    straggler_fraction: float = 0.0
    straggler_delay_s: float = 0.0
    deadline_s: float | None = None
    volume_skew: float = 0.0
    seed: int = 0
    online_hours: float = 8.0  # diurnal: hours per simulated day a device is online
    rounds_per_day: int = 24  # diurnal: rounds in one simulated day
    volume_base_sessions: int = 2  # volume skew: sessions of the smallest device
    volume_max_sessions: int = 200  # volume skew: no device gets more (the Pareto tail is unbounded)

    def __post_init__(self) -> None:
        if self.availability == "always":
            object.__setattr__(self, "availability", None)
        if self.availability is not None and self.availability not in AVAILABILITY_TRACES:
            raise ValueError(
                f"availability {self.availability!r} is not one of {AVAILABILITY_TRACES} (or None)"
            )
        for name in ("dropout", "straggler_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not (math.isfinite(self.straggler_delay_s) and self.straggler_delay_s >= 0):
            raise ValueError("straggler_delay_s must be a finite number >= 0")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError("deadline_s must be > 0 (or None for no deadline)")
        if not (math.isfinite(self.volume_skew) and self.volume_skew >= 0):
            raise ValueError("volume_skew must be a finite number >= 0")
        if not 0 < self.online_hours <= 24:
            raise ValueError("online_hours must be in (0, 24]")
        if self.rounds_per_day < 1:
            raise ValueError("rounds_per_day must be >= 1")
        if not 1 <= self.volume_base_sessions <= self.volume_max_sessions:
            raise ValueError("need 1 <= volume_base_sessions <= volume_max_sessions")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError("seed must be an integer >= 0")

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Mapping[str, object]) -> Heterogeneity:
        """Pick this class's knobs out of a settings dict (e.g. a preset); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names})

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)

    # ---- availability -------------------------------------------------------------------------------
    def online(self, devices: object, round_: int) -> np.ndarray:
        """Whether each device is online in ``round_`` (vectorised)."""
        count = np.atleast_1d(np.asarray(devices)).shape[0]
        if self.availability is None:
            _as_u64(devices, "device index")
            return np.ones(count, dtype=bool)
        hour = (round_ % self.rounds_per_day) * 24.0 / self.rounds_per_day
        phase = 24.0 * hash_uniform(self.seed, _STREAM_ONLINE_PHASE, devices)
        return np.mod(hour - phase, 24.0) < self.online_hours

    def is_online(self, device_index: int, round_: int) -> bool:
        """Whether one device is online in ``round_``."""
        return bool(self.online([device_index], round_)[0])

    # ---- dropout ------------------------------------------------------------------------------------
    def dropouts(self, devices: object, round_: int) -> np.ndarray:
        """Whether each device drops out of ``round_`` once sampled (vectorised)."""
        return hash_uniform(self.seed, _STREAM_DROPOUT, devices, round_) < self.dropout

    def drops_out(self, device_index: int, round_: int) -> bool:
        """Whether one sampled device drops out of ``round_``."""
        return bool(self.dropouts([device_index], round_)[0])

    # ---- stragglers and deadlines -------------------------------------------------------------------
    def stragglers(self, devices: object) -> np.ndarray:
        """Whether each device is a straggler (a property of the device, not of the round)."""
        return hash_uniform(self.seed, _STREAM_STRAGGLER, devices) < self.straggler_fraction

    def delays_s(self, devices: object, round_: int) -> np.ndarray:
        """Extra seconds each device takes in ``round_``: 0, or ``straggler_delay_s * (0.5 + U)``."""
        jitter = 0.5 + hash_uniform(self.seed, _STREAM_DELAY, devices, round_)
        return np.where(self.stragglers(devices), self.straggler_delay_s * jitter, 0.0)

    def delay_s(self, device_index: int, round_: int) -> float:
        """Extra seconds one device takes in ``round_``."""
        return float(self.delays_s([device_index], round_)[0])

    def late(self, devices: object, round_: int, compute_s: object = 0.0) -> np.ndarray:
        """Whether each device's ``compute_s + delay`` exceeds the deadline (never without one)."""
        count = np.atleast_1d(np.asarray(devices)).shape[0]
        if self.deadline_s is None:
            _as_u64(devices, "device index")
            return np.zeros(count, dtype=bool)
        return np.asarray(compute_s, dtype=np.float64) + self.delays_s(devices, round_) > self.deadline_s

    def misses_deadline(self, device_index: int, round_: int, compute_s: float = 0.0) -> bool:
        """Whether one device reports after the deadline, given its own compute time."""
        return bool(self.late([device_index], round_, compute_s)[0])

    # ---- data volume --------------------------------------------------------------------------------
    def volume_weights(self, devices: object) -> np.ndarray:
        """Zipf-like volume weight ``U ** -volume_skew`` (>= 1) of each device; all 1 without skew."""
        if self.volume_skew == 0:
            return np.ones(np.atleast_1d(np.asarray(devices)).shape[0])
        u = 1.0 - hash_uniform(self.seed, _STREAM_VOLUME, devices)  # in (0, 1]: never divides by zero
        return u ** (-self.volume_skew)

    def session_budget(self, device_index: int) -> int | None:
        """Sessions device ``device_index`` has (synthetic) or keeps (real); None without volume skew."""
        if self.volume_skew == 0:
            return None
        weight = float(self.volume_weights([device_index])[0])
        return int(min(self.volume_max_sessions, max(1, round(self.volume_base_sessions * weight))))

    # ---- rounds -------------------------------------------------------------------------------------
    def sample(self, n_devices: int, fraction: float, round_: int, min_devices: int = 1) -> np.ndarray:
        """Devices (sorted indices) the server picks for ``round_``: ``fraction`` of those online, at least
        ``min_devices`` when that many are online, drawn without replacement (deterministic)."""
        if n_devices < 0 or not 0.0 < fraction <= 1.0:
            raise ValueError("need n_devices >= 0 and fraction in (0, 1]")
        candidates = np.flatnonzero(self.online(np.arange(n_devices), round_))
        want = min(len(candidates), max(int(min_devices), int(math.ceil(fraction * len(candidates)))))
        if want == 0:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.Generator(np.random.Philox(key=[self.seed, _STREAM_SAMPLE * 2**32 + round_]))
        return np.sort(rng.choice(candidates, size=want, replace=False)).astype(np.int64)

    def plan_round(self, sampled: object, round_: int, compute_s: object = 0.0) -> RoundPlan:
        """Split sampled devices into participants / offline / dropped / late (in that precedence)."""
        devices = np.atleast_1d(np.asarray(sampled, dtype=np.int64))
        online = self.online(devices, round_)
        dropped = online & self.dropouts(devices, round_)
        delays = self.delays_s(devices, round_)
        late = online & ~dropped & self.late(devices, round_, compute_s)
        ok = online & ~dropped & ~late
        return RoundPlan(
            round_, devices, devices[ok], devices[~online], devices[dropped], devices[late], delays
        )
