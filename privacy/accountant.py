"""Privacy accounting for the sampled Gaussian mechanism, through Opacus' RDP accountant.

Both levels of this project release sums of clipped contributions plus Gaussian noise on Poisson-sampled
batches, so both are the sampled Gaussian mechanism (SGM) with (noise multiplier sigma, sample rate q),
composed over steps:

- record level (``privacy/dp_sgd.py``): one DP-SGD step on a device, a record = one session window,
  q = batch_size / n_windows;
- user level (``FederatedAccountant``): one federated round of DP-FedAvg, a record = one device's whole
  update, q = sampled devices / population.

Epsilon comes from Renyi DP (Mironov et al.): the RDP of every (sigma, q, steps) run is summed over the
orders and converted to (epsilon, delta) once (Opacus' ``RDPAccountant`` / ``analysis.rdp``, with the
Balle et al. 2020 conversion). Composition is therefore never a naive sum of epsilons. sigma = 0 means no
privacy: epsilon is infinite. Opacus warns when the best order is at the edge of its grid (the bound is
then valid but loose); those warnings are passed on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)  # RDP orders alpha the conversion searches


def check_sgm(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """ValueError unless sigma >= 0 (finite), 0 < q <= 1 and steps is an integer >= 0."""
    if not (
        isinstance(noise_multiplier, (int, float))
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def check_delta(delta: float) -> None:
    """ValueError unless 0 < delta < 1."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def rdp_of(runs: Iterable[tuple[float, float, int]]) -> np.ndarray:
    """Summed RDP at every order in ORDERS of SGM runs (sigma, q, steps); inf where some run has sigma = 0."""
    total = np.zeros(len(ORDERS))
    for noise_multiplier, sample_rate, steps in runs:
        check_sgm(noise_multiplier, sample_rate, steps)
        if steps == 0:
            continue
        if noise_multiplier == 0:
            return np.full(len(ORDERS), np.inf)
        total = total + np.asarray(
            rdp_analysis.compute_rdp(
                q=sample_rate, noise_multiplier=noise_multiplier, steps=int(steps), orders=list(ORDERS)
            )
        )
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta)-DP epsilon of an RDP curve over ORDERS (0 for no release, inf for no privacy)."""
    check_delta(delta)
    if not np.any(rdp):
        return 0.0
    if np.all(np.isinf(rdp)):
        return math.inf
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


def epsilon_of(runs: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of the composition of SGM runs (sigma, q, steps), by RDP (what a ledger spends)."""
    return epsilon_from_rdp(rdp_of(runs), delta)


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after ``steps`` steps of the SGM (Opacus' RDPAccountant); inf when noise_multiplier is 0."""
    check_sgm(noise_multiplier, sample_rate, steps)
    check_delta(delta)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(accountant.get_epsilon(delta=delta))


def noise_for_epsilon(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """Smallest noise multiplier (to Opacus' 0.01 epsilon tolerance) with epsilon_for(...) <= target_epsilon."""
    if not (isinstance(target_epsilon, (int, float)) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    check_sgm(1.0, sample_rate, steps)
    check_delta(delta)
    if steps < 1:
        raise ValueError("noise_for_epsilon needs steps >= 1")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=int(steps),
            accountant="rdp",
        )
    )


class FederatedAccountant:
    """User-level DP across federated rounds (DP-FedAvg): each round is one SGM step over devices.

    ``noise_multiplier``: server noise std / per-device update clip norm. ``sample_rate``: probability a
    device takes part in a round (sampled devices / population, Poisson sampling). ``delta`` defaults to
    1 / ``population``. ``state()`` / ``from_state()`` round-trip through JSON (server checkpoints).
    """

    STATE_FORMAT = 1

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float | None = None,
        population: int | None = None,
        rounds: int = 0,
    ) -> None:
        check_sgm(noise_multiplier, sample_rate, rounds)
        if population is not None and (
            isinstance(population, bool) or not isinstance(population, int) or population < 2
        ):
            raise ValueError(f"population must be an integer >= 2, got {population!r}")
        if delta is None:
            if population is None:
                raise ValueError("give delta, or population (delta = 1 / population)")
            delta = 1.0 / population
        check_delta(delta)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.population = population
        self.rounds = int(rounds)
        # RDP is linear in the number of rounds: one round's curve serves every count.
        self._rdp_one_round = rdp_of([(self.noise_multiplier, self.sample_rate, 1)])

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` more completed rounds."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        self.rounds += rounds

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent after the recorded rounds, at ``delta`` (default: the accountant's)."""
        return self._epsilon_after(self.rounds, self.delta if delta is None else delta)

    def _epsilon_after(self, rounds: int, delta: float) -> float:
        if rounds == 0:
            check_delta(delta)
            return 0.0
        return epsilon_from_rdp(self._rdp_one_round * rounds, delta)

    def per_round(self, delta: float | None = None) -> list[tuple[int, float]]:
        """(round, cumulative epsilon) for rounds 1..rounds."""
        delta = self.delta if delta is None else delta
        return [(r, self._epsilon_after(r, delta)) for r in range(1, self.rounds + 1)]

    def state(self) -> dict[str, object]:
        """JSON-ready state (what a server checkpoint stores)."""
        return {
            "format": self.STATE_FORMAT,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "population": self.population,
            "rounds": self.rounds,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> FederatedAccountant:
        """Inverse of state(); ValueError on anything malformed."""
        if not isinstance(state, dict) or state.get("format") != cls.STATE_FORMAT:
            raise ValueError(f"not a FederatedAccountant state (format {cls.STATE_FORMAT}): {state!r}")
        try:
            return cls(
                noise_multiplier=state["noise_multiplier"],  # type: ignore[arg-type]
                sample_rate=state["sample_rate"],  # type: ignore[arg-type]
                delta=state["delta"],  # type: ignore[arg-type]
                population=state.get("population"),  # type: ignore[arg-type]
                rounds=state["rounds"],  # type: ignore[arg-type]
            )
        except KeyError as err:
            raise ValueError(f"FederatedAccountant state misses {err}") from None

    def __repr__(self) -> str:
        return (
            f"FederatedAccountant(noise_multiplier={self.noise_multiplier}, sample_rate={self.sample_rate}, "
            f"delta={self.delta}, rounds={self.rounds})"
        )
