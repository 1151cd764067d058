"""Named simulation scenarios from ``presets.toml`` (shipped as package data).

A preset is a table of the run config's own keys (``[tool.flwr.app.config]``, parsed by
``federation.config.FederationConfig``: ``num-server-rounds``, ``fraction-fit``, ``local-steps``,
``dp-epsilon`` ...) plus the keys that describe what only a simulation has: the population (``dataset``,
``partition``, ``devices``, ``min-examples``) and its faults (``dropout``, ``availability``, stragglers,
deadlines, ``volume-skew``). The run config's keys a simulation sets itself (where the population, checkpoints
and metrics are) are refused. One ``seed`` seeds the population, the faults and training.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

PRESETS_FILE = "presets.toml"

# The population (its data settings as every --dataset command takes them) and its faults, with defaults;
# None means "not set" (the dataset's own protocol, every user, no deadline).
SIMULATION_DEFAULTS: dict[str, object] = {
    "description": "",
    "dataset": "synthetic",
    "mapping": None,
    "min-item-support": None,
    "test-fraction": None,
    "test-days": None,
    "partition": "auto",
    "devices": None,
    "min-examples": 0,
    "dropout": 0.0,
    "availability": "always",
    "online-hours": 8.0,
    "rounds-per-day": 24,
    "straggler-fraction": 0.0,
    "straggler-delay-s": 0.0,
    "deadline-s": None,
    "volume-skew": 0.0,
}
# The accepted type of each simulation key (ints are accepted where floats are).
_TYPES: dict[str, tuple[type, ...]] = {
    "description": (str,),
    "dataset": (str,),
    "mapping": (str,),
    "min-item-support": (int,),
    "test-fraction": (int, float),
    "test-days": (int, float),
    "partition": (str,),
    "devices": (int,),
    "min-examples": (int,),
    "dropout": (int, float),
    "availability": (str,),
    "online-hours": (int, float),
    "rounds-per-day": (int,),
    "straggler-fraction": (int, float),
    "straggler-delay-s": (int, float),
    "deadline-s": (int, float),
    "volume-skew": (int, float),
}
# Run-config keys a simulation fills in from its own directories and population size.
SET_BY_SIMULATION = (
    "population-dir",
    "eval-split",
    "checkpoint-dir",
    "metrics-path",
    "min-available-clients",
)


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


def run_config_of(settings: dict[str, object]) -> dict[str, object]:
    """The run-config part of a preset's settings (every key that is not a simulation key)."""
    return {k: v for k, v in settings.items() if k not in SIMULATION_DEFAULTS and k != "name"}


def check_settings(name: str, settings: dict[str, object]) -> None:
    """PresetError unless every key is a simulation key of the right type or a run-config key it may set."""
    from federation.config import ConfigError, FederationConfig
    from simulations.heterogeneity import Heterogeneity

    for key, value in settings.items():
        if (
            key in _TYPES
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, _TYPES[key]))
        ):
            wanted = " or ".join(t.__name__ for t in _TYPES[key])
            raise PresetError(f"preset {name!r}: {key} must be {wanted}, got {value!r}")
    run_config = run_config_of(settings)
    fixed = sorted(set(run_config) & set(SET_BY_SIMULATION))
    if fixed:
        raise PresetError(f"preset {name!r}: {', '.join(fixed)} are set by the simulation itself")
    # As simulations.engine.federation_from completes it: every device available, epsilon meaning DP.
    probe = {**run_config, "min-available-clients": run_config.get("min-fit-clients", 2)}
    if probe.get("dp-epsilon") and "dp" not in probe:
        probe["dp"] = "user"
    try:
        FederationConfig.from_run_config(probe)
    except ConfigError as err:
        raise PresetError(
            f"preset {name!r}: {err}; simulation keys: {', '.join(SIMULATION_DEFAULTS)}"
        ) from None
    checks = (
        ("devices", settings["devices"] is None or settings["devices"] >= 1),
        ("min-examples", settings["min-examples"] >= 0),
        ("partition", settings["partition"] in ("auto", "user", "session")),
        ("min-item-support", settings["min-item-support"] is None or settings["min-item-support"] >= 1),
        ("test-fraction", settings["test-fraction"] is None or 0 < settings["test-fraction"] < 1),
        ("test-days", settings["test-days"] is None or settings["test-days"] > 0),
    )
    bad = [key for key, ok in checks if not ok]
    if bad:
        raise PresetError(f"preset {name!r}: out of range: {', '.join(f'{k}={settings[k]!r}' for k in bad)}")
    try:
        Heterogeneity.from_settings(heterogeneity_settings(settings))
    except ValueError as err:
        raise PresetError(f"preset {name!r}: {err}") from None


def heterogeneity_settings(settings: dict[str, object]) -> dict[str, object]:
    """The fault knobs of a preset's settings as ``Heterogeneity`` fields (one seed for everything)."""
    keys = ("dropout", "availability", "online-hours", "rounds-per-day", "straggler-fraction")
    values = {k.replace("-", "_"): settings[k] for k in keys if k in settings}
    values["straggler_delay_s"] = settings.get("straggler-delay-s", 0.0)
    values["deadline_s"] = settings.get("deadline-s")
    values["volume_skew"] = settings.get("volume-skew", 0.0)
    values["seed"] = int(settings.get("seed", 0))  # type: ignore[call-overload]
    return values


def load_preset(name: str, path: str | Path | None = None) -> dict[str, object]:
    """One preset's settings: every simulation key (defaults filled in) and the run-config keys it sets."""
    presets = _read(Path(path) if path is not None else None)
    if name not in presets:
        raise PresetError(f"unknown preset {name!r}; presets: {', '.join(presets)}")
    settings = {**SIMULATION_DEFAULTS, **presets[name], "name": name}
    check_settings(name, settings)
    return settings
