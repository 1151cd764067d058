"""One entry point for every command's ``--dataset``: the synthetic population, a shared dataset name,
a generic interactions file, or an SR-GNN-format directory."""

from __future__ import annotations

import dataclasses
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
) -> SplitData:
    """Resolve ``--dataset`` to a SplitData (cached where the source is a file)."""
    if min_item_support is not None and min_item_support < 1:
        raise SchemaError("bad_argument", "min_item_support must be >= 1")
    if name_or_path == SYNTHETIC:
        protocol = SYNTHETIC_PROTOCOL
        if min_item_support is not None:
            protocol = dataclasses.replace(protocol, min_item_support=min_item_support)
        return synthetic_split(protocol=protocol)
    from model.data.loaders import DATASETS, load_dataset  # pandas-heavy readers, only for real sources

    name_or_path = ALIASES.get(name_or_path, name_or_path)
    config = None
    if min_item_support is not None:
        base = DATASETS[name_or_path].config if name_or_path in DATASETS else ProtocolConfig()
        config = dataclasses.replace(base, min_item_support=min_item_support)
    return load_dataset(name_or_path, data_dir=data_dir, mapping=mapping, config=config, refresh=refresh)
