"""Presets: tables of the run config's keys plus the simulation's own; bad names and settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import FederationConfig
from simulations.engine import federation_from, heterogeneity_from
from simulations.presets import SIMULATION_DEFAULTS, PresetError, load_preset, preset_names, run_config_of


def test_shipped_presets_are_run_configs_plus_simulation_keys():
    names = preset_names()
    assert {"smoke", "realistic-jd", "flaky-mobile", "scale-10k", "recipe-dp-catalog"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert set(SIMULATION_DEFAULTS) <= set(preset) and preset["name"] == name and preset["description"]
        heterogeneity_from(preset)  # the fault knobs are valid
        fed = federation_from(preset, Path("/pop"), Path("/out"), 1000)
        for key, value in run_config_of(preset).items():  # every other key is the run config's, as given
            assert getattr(fed, key.replace("-", "_")) == value, (name, key)
    scale = load_preset("scale-10k")
    assert scale["devices"] == 10_000 and scale["num-server-rounds"] == 50 and scale["dataset"] == "synthetic"
    assert federation_from(load_preset("realistic-jd"), Path("/p"), Path("/o"), 10).dp == "user"
    assert "dp-epsilon" not in load_preset("smoke")  # omitted: the run config's default, no DP


def test_the_recommended_dp_recipe_is_a_preset():
    """docs/federation.md's DP recipe, key for key."""
    recipe = run_config_of(load_preset("recipe-dp-catalog"))
    expected = {
        "tie-output": True, "freeze-item-embeddings": True, "dp": "user", "dp-epsilon": 8.0,
        "dp-clipping-norm": 1.0, "num-server-rounds": 150, "fraction-fit": 0.1, "local-steps": 1,
        "local-optimizer": "sgd", "local-lr": 1.0, "strategy": "fedadam", "server-lr": 0.005, "server-tau": 1e-8,
    }  # fmt: skip
    assert expected.items() <= recipe.items()
    import re

    from rib_edge.cli_fl import parse_run_config  # how fl run reads each -c key=value

    docs = (Path(__file__).resolve().parents[2] / "docs" / "federation.md").read_text()
    block = docs[docs.index("Under user-level DP, start from the shop's catalog") :].split("```")[1]
    shown = parse_run_config(re.findall(r"-c ([a-z-]+=[\w.+-]+)", block))
    assert {k: shown.get(k) for k in expected} == expected


def test_a_run_config_key_a_simulation_sets_itself_is_refused(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[a]\ncheckpoint-dir = "x"\n')
    with pytest.raises(PresetError, match="set by the simulation"):
        load_preset("a", path)
    assert FederationConfig().num_server_rounds  # the defaults a preset's omitted keys take


def test_unknown_preset_lists_the_names():
    with pytest.raises(PresetError, match="unknown preset 'nope'.*smoke"):
        load_preset("nope")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[a]\nnum-server-rounds = 3\ndevcies = 5\n", "unknown run-config key 'devcies'"),
        ('[a]\nnum-server-rounds = "many"\n', "'num-server-rounds'.*not a valid int"),
        ("[a]\nfraction-fit = 0.0\n", "fraction-fit must be in"),
        ("[a]\ndevices = 0\n", "out of range"),
        ('[a]\navailability = "weekends"\n', "availability"),
        ("[a]\ndropout = true\n", "dropout must be"),
        ("[a\n", "not valid TOML"),
        ("a = 1\n", "must be tables"),
    ],
)
def test_bad_presets_files(tmp_path, body, match):
    path = tmp_path / "presets.toml"
    path.write_text(body)
    with pytest.raises(PresetError, match=match):
        load_preset("a", path)


def test_preset_file_override(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[quick]\ndescription = "x"\nnum-server-rounds = 1\ndropout = 0.5\n')
    preset = load_preset("quick", path)
    assert preset["num-server-rounds"] == 1 and preset["dropout"] == 0.5 and "fraction-fit" not in preset
    with pytest.raises(PresetError, match="cannot read"):
        load_preset("quick", tmp_path / "missing.toml")
