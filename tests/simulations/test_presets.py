"""Presets: every shipped scenario loads with all keys filled; bad names and settings are refused clearly."""

from __future__ import annotations

import pytest

from simulations.heterogeneity import Heterogeneity
from simulations.presets import DEFAULTS, PresetError, load_preset, preset_names


def test_shipped_presets_load():
    names = preset_names()
    assert {"smoke", "realistic-jd", "flaky-mobile", "scale-10k"} <= set(names)
    for name in names:
        preset = load_preset(name)
        assert set(DEFAULTS) <= set(preset) and preset["name"] == name
        assert preset["description"]
        Heterogeneity.from_settings(preset)  # the heterogeneity knobs are valid
    scale = load_preset("scale-10k")
    assert scale["devices"] == 10_000 and scale["rounds"] == 50 and scale["dataset"] == "synthetic"
    assert load_preset("realistic-jd")["dp_epsilon"] == 8.0
    assert load_preset("smoke")["dp_epsilon"] is None  # omitted: no DP


def test_unknown_preset_lists_the_names():
    with pytest.raises(PresetError, match="unknown preset 'nope'.*smoke"):
        load_preset("nope")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[a]\nrounds = 3\ndevcies = 5\n", "unknown setting"),
        ('[a]\nrounds = "many"\n', "rounds must be int"),
        ("[a]\nfraction = 0.0\n", "out of range"),
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
    path.write_text('[quick]\ndescription = "x"\nrounds = 1\ndropout = 0.5\n')
    preset = load_preset("quick", path)
    assert preset["rounds"] == 1 and preset["dropout"] == 0.5 and preset["fraction"] == DEFAULTS["fraction"]
    with pytest.raises(PresetError, match="cannot read"):
        load_preset("quick", tmp_path / "missing.toml")
