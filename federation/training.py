"""Device-side training for federated rounds (the optional ``train`` side of the device: needs torch).

A recommending device needs numpy + onnxruntime + cryptography only; a device that also takes part in
federated training additionally imports torch, ``model`` and ``privacy`` — here, and nowhere else on the
device side. What one round does on the device:

1. read the device's own records from its encrypted ``TupleStore`` and encode them with the federation's
   shared vocabulary (``model.data.local.records_to_dataset``: unknown items are dropped, never reported);
2. refuse (``TrainingRefused``) when there is nothing to learn from, or when record-level DP-SGD is on and
   the run would overspend the device's privacy budget; the budget is charged in the device's ledger
   (an encrypted blob in the same store) BEFORE training, so a crash cannot release an uncharged update;
3. load the global weights, train ``local_steps`` steps (Opacus DP-SGD when configured), and return only
   the new weights and a few scalar metrics (``LocalUpdate``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_client.keys import KeyProvider, default_key_provider
from edge_client.store import TupleStore
from federation.task import METRIC_KEYS  # noqa: F401 - the device's metric list, re-exported for callers
from model.data.dataset import SessionDataset, Vocabulary
from model.data.local import records_to_dataset
from model.local import LocalTrainConfig, WindowDataset, get_weights, set_weights, train_local
from model.rib import RIB, RIBConfig
from model.skipgram import SkipGramConfig, train_local_skipgram

LEDGER_BLOB = "privacy-ledger"


class TrainingRefused(RuntimeError):
    """The device declines this round; ``reason`` is ``no_data``, ``budget_exhausted`` or ``diverged``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreLedgerStorage:
    """``privacy.ledger.LedgerStorage`` kept as an encrypted, name-bound blob in the device's store."""

    def __init__(self, store: TupleStore) -> None:
        self.store = store

    def load(self) -> bytes | None:
        """The ledger's bytes, or None before the first charge."""
        return self.store.read_blob(LEDGER_BLOB)

    def save(self, data: bytes) -> None:
        """Durably replace the ledger."""
        self.store.write_blob(LEDGER_BLOB, data)


@dataclass(frozen=True)
class DeviceTrainingConfig:
    """What one round of local training does (sent by the server each round)."""

    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    record_dp_noise_multiplier: float = 0.0  # 0: plain local training
    record_dp_max_grad_norm: float = 1.0
    budget_epsilon: float = 0.0  # the device's lifetime record-level budget; 0 = unlimited
    delta: float = 1e-5
    uniform_weight: bool = False  # report num_examples = 1 (user-level DP needs an unweighted average)
    task: str = "rib"  # "rib" | "word2vec" (the federated skip-gram stage: ``skipgram`` settings apply)
    skipgram: SkipGramConfig = field(default_factory=SkipGramConfig)


@dataclass
class LocalUpdate:
    """What leaves the device after a round: weights, a weight for averaging, scalar metrics."""

    weights: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]


def _require_finite(weights: list[np.ndarray]) -> None:
    """Withhold an update with non-finite values (it would poison the average)."""
    if not all(np.isfinite(w).all() for w in weights):
        raise TrainingRefused("diverged", "local training produced non-finite weights; update withheld")


class DeviceTrainer:
    """Trains the global RIB on one device's encrypted store."""

    def __init__(
        self,
        device_dir: str | Path,
        vocab: Vocabulary,
        rib_config: RIBConfig,
        key_provider: KeyProvider | None = None,
    ) -> None:
        self.device_dir = Path(device_dir)
        if not (self.device_dir / "MANIFEST").exists():
            raise FileNotFoundError(f"{self.device_dir} holds no device store")
        self.vocab = vocab
        self.rib_config = rib_config
        provider = key_provider if key_provider is not None else default_key_provider(self.device_dir)
        self.store = TupleStore(self.device_dir, key_provider=provider)
        self._data: SessionDataset | None = None

    def dataset(self) -> SessionDataset:
        """The device's sessions under the shared vocabulary (read once per trainer)."""
        if self._data is None:
            self._data = records_to_dataset(
                self.store.read(), self.vocab, name=f"device:{self.device_dir.name}"
            )
        return self._data

    def ledger(self, config: DeviceTrainingConfig):
        """The device's privacy ledger (kept in its store)."""
        from privacy.ledger import PrivacyLedger

        budget = config.budget_epsilon if config.budget_epsilon > 0 else float("inf")
        return PrivacyLedger(StoreLedgerStorage(self.store), budget_epsilon=budget, delta=config.delta)

    def train(self, global_weights: list[np.ndarray], config: DeviceTrainingConfig) -> LocalUpdate:
        """One round: load the global weights, train locally, return the update (or raise TrainingRefused)."""
        started = time.perf_counter()
        data = self.dataset()
        n_examples = len(data.examples())
        if n_examples == 0:
            raise TrainingRefused(
                "no_data", "no session on this device has a next visit in the shared vocabulary"
            )
        if config.task == "word2vec":
            return self._train_skipgram(global_weights, config, data, started)
        if config.task != "rib":
            raise ValueError(f"unknown task {config.task!r}")
        model = RIB(self.rib_config)
        set_weights(model, global_weights)
        metrics: dict[str, float] = {"record_dp": 0.0}
        if config.record_dp_noise_multiplier > 0:
            # Opacus is imported only by devices that run DP-SGD.
            from privacy.dp_sgd import DPSGDConfig, train_local_private
            from privacy.ledger import BudgetExhausted

            n_windows = len(WindowDataset(data, config.local.max_len))
            sample_rate = min(1.0, config.local.batch_size / max(1, n_windows))
            ledger = self.ledger(config)
            try:
                # Charged before training: a crash after this point over-counts, never under-counts.
                ledger.charge(config.record_dp_noise_multiplier, sample_rate, config.local.steps)
            except BudgetExhausted as err:
                raise TrainingRefused("budget_exhausted", str(err)) from err
            dp = DPSGDConfig(
                noise_multiplier=config.record_dp_noise_multiplier,
                max_grad_norm=config.record_dp_max_grad_norm,
                delta=config.delta,
            )
            result = train_local_private(model, data, config.local, dp)
            metrics["record_dp"] = 1.0
            metrics["device_epsilon"] = float(ledger.spent())
        else:
            result = train_local(model, data, config.local)
        weights = get_weights(model)
        _require_finite(weights)
        metrics.update(
            {
                "train_loss": float(result["loss"]),
                "examples": float(n_examples),
                "steps": float(result["steps"]),
                "seconds": time.perf_counter() - started,
            }
        )
        return LocalUpdate(
            weights=weights, num_examples=1 if config.uniform_weight else n_examples, metrics=metrics
        )

    def _train_skipgram(
        self,
        global_weights: list[np.ndarray],
        config: DeviceTrainingConfig,
        data: SessionDataset,
        started: float,
    ) -> LocalUpdate:
        """One round of the federated skip-gram on this device's visit sequences."""
        if config.record_dp_noise_multiplier > 0:
            raise ValueError("record-level DP-SGD applies to RIB rounds, not to the skip-gram stage")
        sequences = [seq for seq in data.session_visit_sequences() if len(seq) > 1]
        if not sequences:
            raise TrainingRefused(
                "no_data", "no session on this device has two visits in the shared vocabulary"
            )
        weights, stats = train_local_skipgram(global_weights, sequences, config.skipgram)
        _require_finite(weights)
        metrics = {
            "record_dp": 0.0,
            "train_loss": float(stats["loss"]),
            "examples": float(stats["pairs"]),
            "steps": float(stats["steps"]),
            "seconds": time.perf_counter() - started,
        }
        weight = 1 if config.uniform_weight else int(stats["pairs"])
        return LocalUpdate(weights=weights, num_examples=weight, metrics=metrics)

    def close(self) -> None:
        """Release the store."""
        self.store.close()


def set_torch_threads(n: int = 1) -> None:
    """Devices train with few threads (and simulations run many devices per core)."""
    torch.set_num_threads(max(1, int(n)))
