"""--dataset's shared settings: mapping, item support and the test split, applied the same way everywhere."""

from __future__ import annotations

import pytest

from edge_client.schema import SchemaError
from model.data.open import DAY_S, DataOptions, default_protocol, open_dataset, protocol_for
from model.data.protocol import ProtocolConfig
from tests.app_logs import write_hotel_log


def test_data_options_validate_and_change_only_what_is_given():
    base = ProtocolConfig(test_seconds=3600.0, min_item_support=5)
    assert DataOptions().protocol(base) == base and not DataOptions().changes_protocol
    days = DataOptions(test_days=2).protocol(base)
    assert days.test_seconds == 2 * DAY_S and days.min_item_support == 5
    fraction = DataOptions(test_fraction=0.25, min_item_support=2).protocol(base)
    # A fraction replaces a dataset's fixed test window (which would otherwise win).
    assert fraction.test_seconds is None and fraction.test_fraction == 0.25 and fraction.min_item_support == 2
    for bad in (
        {"min_item_support": 0},
        {"test_fraction": 1.0},
        {"test_fraction": 0.0},
        {"test_days": -1.0},
        {"test_days": float("nan")},
        {"test_fraction": 0.2, "test_days": 1.0},
    ):
        with pytest.raises(SchemaError):
            DataOptions(**bad)


def test_split_settings_move_the_test_period(tmp_path):
    log, mapping = write_hotel_log(tmp_path)
    default = open_dataset(str(log), mapping=mapping)
    wider = open_dataset(str(log), mapping=mapping, test_fraction=0.4)
    assert wider.info["protocol"]["test_fraction"] == 0.4
    assert (
        wider.test.n_sessions > default.test.n_sessions and wider.train.n_sessions < default.train.n_sessions
    )
    by_days = open_dataset(str(log), mapping=mapping, test_days=1.0)
    assert by_days.info["protocol"]["test_seconds"] == DAY_S
    span = (
        default.train.timestamps_ms.min(),
        max(default.test.timestamps_ms.max(), default.train.timestamps_ms.max()),
    )
    assert by_days.info["split_time_ms"] == span[1] - DAY_S * 1000
    looser = open_dataset(str(log), mapping=mapping, min_item_support=1)
    assert looser.info["protocol"]["min_item_support"] == 1


def test_synthetic_takes_split_settings_but_no_mapping(tmp_path):
    split = open_dataset("synthetic", test_fraction=0.3)
    assert split.info["protocol"]["test_fraction"] == 0.3
    _, mapping = write_hotel_log(tmp_path)
    with pytest.raises(SchemaError, match="no mapping applies"):
        open_dataset("synthetic", mapping=mapping)


def test_srgnn_splits_take_none_of_the_settings(tmp_path):
    import pickle

    directory = tmp_path / "mini"
    directory.mkdir()
    (directory / "all_train_seq.txt").write_bytes(pickle.dumps([[1, 2, 3], [2, 3, 4]]))
    (directory / "test.txt").write_bytes(pickle.dumps(([[1, 2], [2]], [3, 3])))
    assert default_protocol(str(directory)) is None
    assert protocol_for(str(directory), DataOptions()) is None
    with pytest.raises(SchemaError, match="SR-GNN split, used as published"):
        protocol_for(str(directory), DataOptions(min_item_support=2))
    assert default_protocol("jdata2016_sample").test_seconds == 3600.0  # a registered dataset's own
