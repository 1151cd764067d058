"""SR-GNN-format splits: the published examples exactly, and pickles that cannot run code."""

from __future__ import annotations

import gzip
import os
import pickle
from collections import Counter

import numpy as np
import pytest

from edge_client.schema import SchemaError
from model.data.loaders import load_dataset
from model.data.protocol import ProtocolConfig
from model.data.srgnn import load_srgnn_split, rebuild_test_sessions, restricted_load


class _Exploit:
    """Unpickling this calls os.system, the classic pickle attack."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def example_pairs(dataset) -> Counter:
    """(prefix items, target) for every example, as a multiset."""
    ex = dataset.examples()
    return Counter(
        (tuple(dataset.items[s:e].tolist()), int(t))
        for s, e, t in zip(ex.starts, ex.ends, ex.targets, strict=True)
    )


def write_srgnn(directory, train, test, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in (("all_train_seq.txt", train), ("test.txt", test)):
        blob = pickle.dumps(value, protocol=2)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)
    return directory


TRAIN = [[1, 2, 3], [2, 3], [3, 1, 4, 1], [5]]
# Sessions [1, 2, 3, 4] and [2, 2] and [1, 2] (a prefix of the first), expanded longest first.
TEST = ([[1, 2, 3], [1, 2], [1], [2], [1]], [4, 3, 2, 2, 2])


@pytest.mark.parametrize("compress", [True, False])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, compress):
    marker = tmp_path / "pwned"
    blob = pickle.dumps([[1, 2], _Exploit(marker)], protocol=2)
    path = tmp_path / ("evil.txt.gz" if compress else "evil.txt")
    path.write_bytes(gzip.compress(blob) if compress else blob)
    with pytest.raises(SchemaError, match="unsafe_pickle") as err:
        restricted_load(path)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert not marker.exists()


def test_malicious_benchmark_directory_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    directory = write_srgnn(tmp_path / "evil", [[1, 2]], ([[1]], [2]))
    (directory / "test.txt.gz").write_bytes(gzip.compress(pickle.dumps(_Exploit(marker))))
    with pytest.raises(SchemaError, match="unsafe_pickle"):
        load_dataset(str(directory))
    assert not marker.exists()


def test_damaged_pickles_are_schema_errors(tmp_path):
    (tmp_path / "cut.txt").write_bytes(pickle.dumps([[1, 2, 3]] * 10)[:-7])
    with pytest.raises(SchemaError, match="bad_file"):
        restricted_load(tmp_path / "cut.txt")
    bad = write_srgnn(tmp_path / "strings", [["a", "b"]], ([[1]], [2]))
    with pytest.raises(SchemaError, match="positive integer ids"):
        load_srgnn_split(bad)


def test_small_directory_gives_exactly_the_published_pairs(tmp_path):
    split = load_srgnn_split(write_srgnn(tmp_path / "toy", TRAIN, TEST, compress=False))
    assert split.train.n_sessions == 3  # the length-1 session yields no example and is dropped
    assert split.info["train_sessions_dropped_short"] == 1
    assert len(split.train.examples()) == 2 + 1 + 3
    assert example_pairs(split.test) == Counter((tuple(p), t) for p, t in zip(*TEST, strict=True))
    assert split.test.n_sessions == 3
    assert split.vocab.n_items == 5 and list(split.vocab.item_ids[:3]) == ["1", "2", "3"]
    assert split.info["test_labels_unseen_in_train"] == 0
    assert split.train.visit_starts.all() and not split.train.has_time and not split.train.has_activity
    assert (split.train.dwell_buckets == split.vocab.dwell.unknown).all()
    assert not set(split.train.session_ids) & set(split.test.session_ids)


def test_test_only_ids_stay_in_the_catalogue(tmp_path):
    split = load_srgnn_split(write_srgnn(tmp_path / "new", [[1, 2], [2, 1]], ([[1], [7]], [9, 1])))
    assert split.vocab.n_items == 9
    assert split.info["test_labels_unseen_in_train"] == 1
    assert split.info["test_items_unseen_in_train"] == 2


def test_a_broken_prefix_chain_is_an_error():
    with pytest.raises(SchemaError, match="does not continue the prefix chain"):
        rebuild_test_sessions([[1, 2], [3]], [3, 2])


def test_srgnn_directory_is_cached(tmp_path):
    directory = write_srgnn(tmp_path / "toy", TRAIN, TEST)
    first = load_dataset(str(directory), refresh=True)
    second = load_dataset(str(directory))
    assert not first.info["cache"]["hit"] and second.info["cache"]["hit"]
    assert np.array_equal(first.test.items, second.test.items)
    with pytest.raises(SchemaError, match="no mapping or protocol config"):
        load_dataset(str(directory), config=ProtocolConfig(test_seconds=60.0))


def test_diginetica_benchmark_matches_published_counts(shared_data):
    split = load_dataset("srgnn_diginetica", data_dir=shared_data)
    assert split.train.n_sessions == 186_670
    assert len(split.train.examples()) == 719_470
    assert len(split.test.examples()) == 60_858
    assert split.vocab.n_items == 43_097
    assert split.info["test_labels_unseen_in_train"] == 0
    # The rebuilt test sessions yield exactly the file's (prefix, label) pairs.
    prefixes, labels = restricted_load(shared_data / "srgnn_benchmarks" / "diginetica" / "test.txt.gz")
    assert example_pairs(split.test) == Counter((tuple(p), t) for p, t in zip(prefixes, labels, strict=True))
