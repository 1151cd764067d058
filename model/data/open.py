"""One entry point for every command's ``--dataset``: the synthetic population, a shared dataset name,
a generic interactions file, or an SR-GNN-format directory.

``DataOptions`` is what every such command may change about the data (``--mapping``,
``--min-item-support``, ``--test-fraction`` / ``--test-days``): one set of settings, applied the same
way whether the split is loaded here, or built into a population of virtual devices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from edge_client.schema import RIB_ACTIVITY_VOCAB, SchemaError, SkipReport
from model.data.dataset import SplitData
from model.data.events import events_to_frame
from model.data.protocol import ProtocolConfig, build_split
from model.data.synthetic import SyntheticConfig, generate_population

SYNTHETIC = "synthetic"
# The SR-GNN benchmark splits under the names the literature uses.
ALIASES = {name: f"srgnn_{name}" for name in ("diginetica", "tmall", "nowplaying", "yoochoose1_64")}
# The synthetic population spans two weeks: its last fifth is the test period.
SYNTHETIC_PROTOCOL = ProtocolConfig(test_fraction=0.2)
DAY_S = 86400.0


@dataclass(frozen=True)
class DataOptions:
    """Changes to a dataset's defaults: activity mapping, item-support filter, where the test period starts.

    ``None`` keeps the dataset's own default. ``test_fraction`` (the last fraction of the time span) and
    ``test_days`` (the last this-many days) are alternatives. SR-GNN splits are used as published, so
    none of these applies to them; the synthetic population and device event logs name their activities
    themselves, so no mapping applies to them.
    """

    mapping: Path | None = None
    min_item_support: int | None = None
    test_fraction: float | None = None
    test_days: float | None = None

    def __post_init__(self) -> None:
        if self.min_item_support is not None and self.min_item_support < 1:
            raise SchemaError("bad_argument", f"min-item-support must be >= 1, got {self.min_item_support}")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise SchemaError("bad_argument", f"test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.test_days is not None and not (math.isfinite(self.test_days) and self.test_days > 0):
            raise SchemaError("bad_argument", f"test-days must be > 0, got {self.test_days}")
        if self.test_fraction is not None and self.test_days is not None:
            raise SchemaError("bad_argument", "give test-fraction or test-days, not both")
        if self.mapping is not None:
            object.__setattr__(self, "mapping", Path(self.mapping))

    @property
    def changes_protocol(self) -> bool:
        """Whether any protocol setting differs from the dataset's default."""
        return any(v is not None for v in (self.min_item_support, self.test_fraction, self.test_days))

    def protocol(self, base: ProtocolConfig) -> ProtocolConfig:
        """``base`` with the settings given here."""
        changes: dict[str, object] = {}
        if self.min_item_support is not None:
            changes["min_item_support"] = self.min_item_support
        if self.test_fraction is not None:
            changes.update(test_fraction=self.test_fraction, test_seconds=None)
        if self.test_days is not None:
            changes.update(test_seconds=self.test_days * DAY_S)
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (only what is set)."""
        return {
            k: str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(self).items()
            if v is not None
        }


def default_protocol(name_or_path: str) -> ProtocolConfig | None:
    """The protocol a dataset uses by default (None for an SR-GNN split, which is used as published)."""
    from model.data.loaders import DATASETS, SRGNN_DATASETS

    name = ALIASES.get(name_or_path, name_or_path)
    if name == SYNTHETIC:
        return SYNTHETIC_PROTOCOL
    if name in DATASETS:
        return DATASETS[name].config
    if name in SRGNN_DATASETS:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        from model.data.srgnn import find_srgnn_files

        return None if find_srgnn_files(path) is not None else ProtocolConfig()
    return ProtocolConfig()  # a generic interactions file


def protocol_for(name_or_path: str, options: DataOptions) -> ProtocolConfig | None:
    """The protocol ``options`` ask for on this dataset (None: its default); SchemaError where none applies."""
    base = default_protocol(name_or_path)
    if base is None:
        if options.changes_protocol or options.mapping is not None:
            raise SchemaError(
                "bad_argument",
                f"{name_or_path} is an SR-GNN split, used as published: mapping, min-item-support and the "
                "test split settings do not apply to it",
            )
        return None
    return options.protocol(base) if options.changes_protocol else None


def synthetic_split(
    config: SyntheticConfig | None = None, seed: int = 0, protocol: ProtocolConfig | None = None
) -> SplitData:
    """The built-in synthetic population, through the device extractor and the standard protocol."""
    config = config or SyntheticConfig()
    report = SkipReport()
    frame = events_to_frame(generate_population(config, seed), report=report)
    split = build_split(frame, SYNTHETIC, RIB_ACTIVITY_VOCAB, protocol or SYNTHETIC_PROTOCOL)
    split.info.update(source=SYNTHETIC, seed=seed, n_devices=config.n_devices, skips=report.to_dict())
    return split


def open_dataset(
    name_or_path: str,
    mapping: Path | None = None,
    refresh: bool = False,
    data_dir: Path | None = None,
    min_item_support: int | None = None,
    *,
    test_fraction: float | None = None,
    test_days: float | None = None,
) -> SplitData:
    """Resolve ``--dataset`` to a SplitData (cached where the source is a file)."""
    options = DataOptions(mapping, min_item_support, test_fraction, test_days)
    if name_or_path == SYNTHETIC:
        if options.mapping is not None:
            raise SchemaError(
                "bad_argument", "the synthetic population names its activities itself: no mapping applies"
            )
        return synthetic_split(protocol=protocol_for(SYNTHETIC, options))
    from model.data.loaders import load_dataset  # pandas-heavy readers, only for real sources

    name_or_path = ALIASES.get(name_or_path, name_or_path)
    config = protocol_for(name_or_path, options)
    return load_dataset(
        name_or_path, data_dir=data_dir, mapping=options.mapping, config=config, refresh=refresh
    )
