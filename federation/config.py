"""One federation's settings, read from Flower's run config (``[tool.flwr.app.config]`` in pyproject.toml).

Both sides read the same keys: the ServerApp (``aggregator.server_app``) and the ClientApp
(``federation.client_app``). Keys are kebab-case as Flower writes them; ``FederationConfig.from_run_config``
is the one place they are parsed and checked, so a typo or a bad value fails at start-up with the key's name.
Standard library only: the device side imports it without torch or flwr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STRATEGIES = ("fedavg", "fedadam")
# What a run trains: RIB itself, or the item vectors RIB starts from (skip-gram Word2vec, model/skipgram.py).
TASKS = ("rib", "word2vec")
DP_MODES = ("none", "user")


class ConfigError(ValueError):
    """A run-config value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class FederationConfig:
    """Every knob of a federated RIB run (defaults suit a laptop-sized simulation)."""

    # Data: the population directory (simulations) and/or the server's held-out split.
    population_dir: str = ""
    eval_split: str = ""  # default: <population-dir>/server/split.npz
    # What the devices train: "rib", or "word2vec" (a federated skip-gram whose item vectors become a RIB
    # run's initial-checkpoint; its "release" is <release-dir>/rib-init.pt, unsigned: it never reaches a device).
    task: str = "rib"
    w2v_window: int = 5
    w2v_negatives: int = 5
    # Rounds and sampling.
    num_server_rounds: int = 5
    fraction_fit: float = 0.5
    min_fit_clients: int = 2
    min_available_clients: int = 2
    seed: int = 0
    # Server optimiser.
    strategy: str = "fedavg"
    server_lr: float = 0.01  # FedAdam eta
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # Model (sizes; vocabulary sizes come from the split).
    data_type: str = "SKU+Micro"
    item_dim: int = 64
    hidden_dim: int = 100
    max_len: int = 50
    initial_checkpoint: str = ""  # a rib.pt to start from instead of a seeded random init
    # A catalog CSV (item_id + attribute columns such as category, brand): the server starts the item
    # embeddings from catalog vectors (model/catalog.py). Public product facts, so no privacy cost.
    item_catalog: str = ""
    # Score items against the item embeddings (RIBConfig.tie_output) and keep that table fixed (freeze_items):
    # with item-catalog the item table is public, and under DP neither clip budget nor noise goes to it.
    tie_output: bool = False
    freeze_item_embeddings: bool = False
    # Local training on each device.
    local_steps: int = 20
    local_batch_size: int = 32
    local_lr: float = 1e-3
    local_optimizer: str = "adam"
    # User-level DP for the federation (Flower's client-side fixed clipping + server Gaussian noise).
    dp: str = "none"
    dp_noise_multiplier: float = 0.0  # used when dp-epsilon is 0
    dp_epsilon: float = 0.0  # target epsilon over all rounds; sets the noise multiplier
    dp_clipping_norm: float = 1.0
    dp_delta: float = 0.0  # 0: 1 / population
    # Server-side checks of every reply (aggregator/validation.py). An update farther than max-update-norm
    # (L2) from the global model is dropped as too_large (0: no bound; unchecked under SecAgg+, where the server
    # sees only the sum). Honest updates measured 0.05-44 across the local settings this project uses
    # (benchmarks/results/fl_validation/update_norms.md); Adam moves each trained weight by about local-lr per
    # step, so catalogues far beyond 10^5 items with many local steps may need more. Under DP the server also
    # clips to dp-clipping-norm.
    max_update_norm: float = 100.0
    max_device_examples: int = 10_000  # a device's averaging weight is clamped to this (1 under DP)
    # Record-level DP-SGD on devices (Opacus) and each device's lifetime budget.
    record_dp_noise_multiplier: float = 0.0  # 0: no DP-SGD on the device
    record_dp_max_grad_norm: float = 1.0
    device_budget_epsilon: float = 0.0  # 0: no ledger limit
    device_delta: float = 1e-5
    # Secure aggregation (Flower's SecAgg+).
    secagg: bool = False
    secagg_num_shares: float = 3.0  # int >= 3, or a fraction of the sampled clients
    secagg_reconstruction_threshold: float = 2.0
    secagg_clipping_range: float = 16.0  # weights are quantised within +-this
    secagg_timeout: float = 0.0  # seconds; 0 = wait
    # Evaluation, checkpoints and releases.
    eval_max_examples: int = 5000
    eval_every: int = 1
    checkpoint_dir: str = ""
    release_dir: str = ""
    release_every: int = 0  # 0: one release at the end of the run
    signing_key: str = ""  # Ed25519 private key (PEM) for releases
    metrics_path: str = ""  # JSON lines, one object per round
    device: str = ""  # "", "cpu", "cuda": see model.device.pick_device

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederationConfig:
        """Parse Flower's run config (kebab-case keys); unknown keys are an error, not silently ignored."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, raw in run_config.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"unknown run-config key {key!r} (known: {', '.join(sorted(k.replace('_', '-') for k in known))})"
                )
            values[name] = _coerce(str(key), raw, type(getattr(cls(), name)))
        config = cls(**values)
        config.validate()
        return config

    def to_run_config(self) -> dict[str, object]:
        """The kebab-case mapping ``from_run_config`` reads (only non-default values)."""
        default = FederationConfig()
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v != getattr(default, k)}

    def validate(self) -> None:
        """Raise ConfigError on values no run could use."""
        checks = [
            (self.num_server_rounds >= 1, "num-server-rounds must be >= 1"),
            (0.0 < self.fraction_fit <= 1.0, "fraction-fit must be in (0, 1]"),
            (self.min_fit_clients >= 1, "min-fit-clients must be >= 1"),
            (
                self.min_available_clients >= self.min_fit_clients,
                "min-available-clients must be >= min-fit-clients",
            ),
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.task in TASKS, f"task must be one of {TASKS}"),
            (self.w2v_window >= 1 and self.w2v_negatives >= 1, "w2v-window and w2v-negatives must be >= 1"),
            (self.dp in DP_MODES, f"dp must be one of {DP_MODES}"),
            (
                self.local_steps >= 1 and self.local_batch_size >= 1,
                "local-steps and local-batch-size must be >= 1",
            ),
            (self.local_lr > 0 and self.server_lr > 0, "learning rates must be > 0"),
            (self.local_optimizer in ("adam", "sgd"), "local-optimizer must be adam or sgd"),
            (self.dp_clipping_norm > 0, "dp-clipping-norm must be > 0"),
            (self.dp_noise_multiplier >= 0 and self.dp_epsilon >= 0, "dp noise and epsilon must be >= 0"),
            (0.0 <= self.dp_delta < 1.0, "dp-delta must be in [0, 1)"),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0"),
            (self.max_device_examples >= 1, "max-device-examples must be >= 1"),
            (
                self.record_dp_noise_multiplier >= 0 and self.record_dp_max_grad_norm > 0,
                "record DP settings out of range",
            ),
            (
                self.device_budget_epsilon >= 0 and 0 < self.device_delta < 1,
                "device budget settings out of range",
            ),
            (self.secagg_clipping_range > 0, "secagg-clipping-range must be > 0"),
            (self.eval_max_examples >= 0 and self.eval_every >= 1, "eval settings out of range"),
            (self.release_every >= 0, "release-every must be >= 0"),
            (self.item_dim >= 1 and self.hidden_dim >= 1 and self.max_len >= 2, "model sizes out of range"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.secagg_num_shares >= 1 and (
            not float(self.secagg_num_shares).is_integer()
            or int(self.secagg_num_shares) % 2 == 0
            or self.secagg_num_shares < 3
        ):
            # SecAgg+ links each device to num_shares // 2 neighbours on each side plus itself: an even count
            # leaves one share unassigned (secaggplus_mod fails in its share-keys stage).
            raise ConfigError("secagg-num-shares must be an odd integer >= 3, or a fraction in (0, 1)")
        if self.task == "word2vec" and (self.record_dp_noise_multiplier > 0 or self.initial_checkpoint):
            # DP-SGD on the device (Opacus) and RIB checkpoints concern RIB; the skip-gram stage has neither.
            raise ConfigError(
                "task = 'word2vec' takes no record-dp-noise-multiplier and no initial-checkpoint"
            )
        if self.item_catalog and (self.initial_checkpoint or self.task != "rib"):
            raise ConfigError(
                "item-catalog initialises a RIB run; it excludes initial-checkpoint and task = 'word2vec'"
            )
        if self.freeze_item_embeddings and not (self.item_catalog or self.initial_checkpoint):
            raise ConfigError(
                "freeze-item-embeddings keeps the starting item table: give item-catalog or initial-checkpoint"
            )
        if self.dp == "user" and self.dp_noise_multiplier == 0 and self.dp_epsilon == 0:
            raise ConfigError("dp = 'user' needs dp-noise-multiplier or dp-epsilon")

    # ---------------------------------------------------------------------------------------------
    def eval_split_path(self) -> Path | None:
        """Where the server's held-out split is (None when neither key is set)."""
        if self.eval_split:
            return Path(self.eval_split)
        if self.population_dir:
            return Path(self.population_dir) / "server" / "split.npz"
        return None

    def device_dir_for(self, partition_id: int) -> Path:
        """A simulated device's directory inside the population."""
        if not self.population_dir:
            raise ConfigError("population-dir is needed to map a partition id to a device")
        return Path(self.population_dir) / "devices" / f"{int(partition_id):06d}"


def _coerce(key: str, raw: object, kind: type) -> object:
    """Run-config values arrive as TOML scalars (or strings from --run-config); coerce to the field's type."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
                return raw.lower() in ("true", "1")
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)  # type: ignore[arg-type]
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)  # type: ignore[arg-type]
            if not math.isfinite(value):
                raise ValueError
            return value
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"run-config key {key!r}: {raw!r} is not a valid {kind.__name__}") from None
