"""Run-config parsing: one place, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from federation.config import ConfigError, FederationConfig

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_app_config_parses_to_the_defaults_it_documents():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fed = FederationConfig.from_run_config(config)
    assert fed.num_server_rounds == config["num-server-rounds"] and fed.strategy == "fedavg"


def test_strings_from_the_command_line_are_coerced():
    fed = FederationConfig.from_run_config(
        {"num-server-rounds": "7", "secagg": "true", "dp-clipping-norm": "0.5", "task": "word2vec"}
    )
    assert (fed.num_server_rounds, fed.secagg, fed.dp_clipping_norm, fed.task) == (7, True, 0.5, "word2vec")
    assert FederationConfig.from_run_config(fed.to_run_config()) == fed


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"fraction-fit": 1.5}, "fraction-fit"),
        ({"strategy": "fedsgd"}, "strategy"),
        ({"num-server-round": 3}, "unknown run-config key"),
        ({"local-steps": 2.5}, "not a valid int"),
        ({"dp-clipping-norm": "nan"}, "not a valid float"),
        ({"dp": "user"}, "dp-noise-multiplier or dp-epsilon"),
        ({"secagg-num-shares": 4}, "odd"),
        ({"min-fit-clients": 5, "min-available-clients": 2}, "min-available-clients"),
        ({"task": "item2vec"}, "task"),
        ({"task": "word2vec", "w2v-window": 0}, "w2v-window"),
        ({"task": "word2vec", "record-dp-noise-multiplier": 1.0}, "word2vec"),
        ({"task": "word2vec", "initial-checkpoint": "rib.pt"}, "word2vec"),
        ({"item-catalog": "c.csv", "initial-checkpoint": "rib.pt"}, "item-catalog"),
        ({"item-catalog": "c.csv", "task": "word2vec"}, "item-catalog"),
        ({"freeze-item-embeddings": True}, "freeze-item-embeddings"),
    ],
)
def test_bad_values_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        FederationConfig.from_run_config(config)


def test_device_dir_for_a_partition_needs_a_population(tmp_path):
    with pytest.raises(ConfigError):
        FederationConfig().device_dir_for(3)
    assert FederationConfig(population_dir=str(tmp_path)).device_dir_for(3) == tmp_path / "devices" / "000003"
