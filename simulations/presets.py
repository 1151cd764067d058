"""Named simulation scenarios from ``presets.toml`` (shipped as package data)."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

PRESETS_FILE = "presets.toml"

# Every setting a preset may hold, with its default; None means "not set" (no DP, no deadline, all devices).
DEFAULTS: dict[str, object] = {
    "description": "",
    "dataset": "synthetic",
    "mapping": None,
    "min_item_support": None,
    "test_fraction": None,
    "test_days": None,
    "partition": "auto",
    "devices": None,
    "min_examples": 0,
    "rounds": 10,
    "fraction": 0.1,
    "min_devices": 2,
    "local_steps": 5,
    "batch_size": 32,
    "learning_rate": 1e-3,
    "strategy": "fedavg",
    "dp_epsilon": None,
    "dp_delta": None,
    "dropout": 0.0,
    "availability": "always",
    "online_hours": 8.0,
    "rounds_per_day": 24,
    "straggler_fraction": 0.0,
    "straggler_delay_s": 0.0,
    "deadline_s": None,
    "volume_skew": 0.0,
    "seed": 0,
}
# The accepted type of each key (ints are accepted where floats are).
_TYPES: dict[str, tuple[type, ...]] = {
    "description": (str,),
    "dataset": (str,),
    "mapping": (str,),
    "min_item_support": (int,),
    "test_fraction": (int, float),
    "test_days": (int, float),
    "partition": (str,),
    "devices": (int,),
    "min_examples": (int,),
    "rounds": (int,),
    "fraction": (int, float),
    "min_devices": (int,),
    "local_steps": (int,),
    "batch_size": (int,),
    "learning_rate": (int, float),
    "strategy": (str,),
    "dp_epsilon": (int, float),
    "dp_delta": (int, float),
    "dropout": (int, float),
    "availability": (str,),
    "online_hours": (int, float),
    "rounds_per_day": (int,),
    "straggler_fraction": (int, float),
    "straggler_delay_s": (int, float),
    "deadline_s": (int, float),
    "volume_skew": (int, float),
    "seed": (int,),
}


class PresetError(ValueError):
    """An unknown preset name, or a presets file that does not parse or holds bad settings."""


def _read(path: Path | None) -> dict[str, dict]:
    try:
        raw = (
            path.read_bytes()
            if path is not None
            else resources.files("simulations").joinpath(PRESETS_FILE).read_bytes()
        )
    except OSError as err:
        raise PresetError(f"cannot read presets file {path or PRESETS_FILE}: {err}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PresetError(f"presets file {path or PRESETS_FILE} is not valid TOML: {err}") from None
    bad = [name for name, table in data.items() if not isinstance(table, dict)]
    if bad:
        raise PresetError(f"presets file entries must be tables ([name]); not tables: {bad}")
    return data


def preset_names(path: Path | None = None) -> list[str]:
    """The preset names, in file order."""
    return list(_read(path))


def load_preset(name: str, path: str | Path | None = None) -> dict[str, object]:
    """One preset's settings with every key present (defaults filled in); PresetError for unknown names."""
    presets = _read(Path(path) if path is not None else None)
    if name not in presets:
        raise PresetError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
    table = presets[name]
    unknown = sorted(set(table) - set(DEFAULTS))
    if unknown:
        raise PresetError(f"preset {name!r}: unknown setting(s) {unknown}; known: {', '.join(DEFAULTS)}")
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            wanted = " or ".join(t.__name__ for t in _TYPES[key])
            raise PresetError(f"preset {name!r}: {key} must be {wanted}, got {value!r}")
    settings = {**DEFAULTS, **table}
    settings["name"] = name
    _check_values(name, settings)
    return settings


def _check_values(name: str, settings: dict[str, object]) -> None:
    """Ranges a run needs; the heterogeneity knobs are checked by Heterogeneity itself."""
    from simulations.heterogeneity import Heterogeneity

    checks = (
        ("rounds", settings["rounds"] >= 1),
        ("fraction", 0 < settings["fraction"] <= 1),
        ("min_devices", settings["min_devices"] >= 1),
        ("local_steps", settings["local_steps"] >= 1),
        ("batch_size", settings["batch_size"] >= 1),
        ("learning_rate", settings["learning_rate"] > 0),
        ("devices", settings["devices"] is None or settings["devices"] >= 1),
        ("min_examples", settings["min_examples"] >= 0),
        ("partition", settings["partition"] in ("auto", "user", "session")),
        ("strategy", settings["strategy"] in ("fedavg", "fedadam")),
        ("dp_epsilon", settings["dp_epsilon"] is None or settings["dp_epsilon"] > 0),
        ("dp_delta", settings["dp_delta"] is None or 0 < settings["dp_delta"] < 1),
        ("min_item_support", settings["min_item_support"] is None or settings["min_item_support"] >= 1),
        ("test_fraction", settings["test_fraction"] is None or 0 < settings["test_fraction"] < 1),
        ("test_days", settings["test_days"] is None or settings["test_days"] > 0),
    )
    bad = [key for key, ok in checks if not ok]
    if bad:
        raise PresetError(f"preset {name!r}: out of range: {', '.join(f'{k}={settings[k]!r}' for k in bad)}")
    try:
        Heterogeneity.from_settings(settings)
    except ValueError as err:
        raise PresetError(f"preset {name!r}: {err}") from None
