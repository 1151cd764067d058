"""What the ServerApp shows: the devices it waits for, one line per round, a failure as one line; bad run configs
refused with the key's name."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("flwr")

from flwr.common.logger import FLOWER_LOGGER, log  # noqa: E402

import aggregator.server_app  # noqa: E402, F401 - installs the ServerApp's logging setup
from aggregator.server_app import check_run_files, round_logger  # noqa: E402
from aggregator.strategy import SeededClientManager  # noqa: E402
from aggregator.workflow import RunFailed, describe_round  # noqa: E402
from federation.config import ConfigError, FederationConfig  # noqa: E402


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def flower_log():
    handler = _Records()
    FLOWER_LOGGER.addHandler(handler)
    yield handler.records
    FLOWER_LOGGER.removeHandler(handler)


def test_flower_lines_are_not_handed_to_the_root_logger_as_well():
    # Opacus' logging.basicConfig gives the root logger a handler: propagating would print every line twice.
    assert FLOWER_LOGGER.propagate is False


def test_a_failed_run_is_logged_as_one_line_without_a_traceback(flower_log):
    try:
        raise RunFailed("round 1: 0 usable update(s), min-fit-clients is 3 (failed: vocab_mismatch 3)")
    except RunFailed as err:
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=err)  # as Flower's runner does
    (record,) = flower_log
    assert record.exc_info is None and record.getMessage() == (
        "run failed: round 1: 0 usable update(s), min-fit-clients is 3 (failed: vocab_mismatch 3)"
    )
    try:
        raise ValueError("a bug")  # anything else keeps its traceback
    except ValueError as err:
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=err)
    assert flower_log[-1].exc_info is not None


def test_the_server_says_how_many_devices_it_waits_for(flower_log):
    assert SeededClientManager(0).wait_for(2, timeout=0) is False
    assert [r.getMessage() for r in flower_log] == ["waiting for 2 devices (have 0)"]


def test_one_line_per_round(flower_log):
    row = {
        "round": 2,
        "sampled": 5,
        "participants": 4,
        "failure_reasons": {"no_data": 1},
        "recall@20": 0.31234,
        "mrr@20": 0.1,
        "epsilon": 2.5,
        "seconds": 3.21,
    }
    round_logger(10)(row)
    assert flower_log[-1].getMessage() == (
        "round 2/10: 4/5 devices trained, failed: no_data 1, recall@20 0.3123 mrr@20 0.1000, epsilon 2.5, 3.2 s"
    )
    failed = {**row, "participants": 1, "failed": "1 usable update(s), min-fit-clients is 2"}
    assert describe_round(failed).endswith("-> NOT TRAINED: 1 usable update(s), min-fit-clients is 2")


def test_files_the_run_config_names_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="eval-split: .*nope.npz not found"):
        check_run_files(FederationConfig(eval_split=str(tmp_path / "nope.npz")))
    with pytest.raises(ConfigError, match="population-dir"):
        check_run_files(FederationConfig(population_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="no eval split"):
        check_run_files(FederationConfig())
    split = tmp_path / "split.npz"
    split.write_bytes(b"")
    with pytest.raises(ConfigError, match="initial-checkpoint: .*missing.pt not found"):
        check_run_files(
            FederationConfig(eval_split=str(split), initial_checkpoint=str(tmp_path / "missing.pt"))
        )
    with pytest.raises(ConfigError, match="release-dir needs signing-key"):
        check_run_files(FederationConfig(eval_split=str(split), release_dir=str(tmp_path / "rel")))
