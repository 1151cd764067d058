"""SR-GNN-format benchmark splits (``all_train_seq.txt`` + ``test.txt`` pickles) as a SplitData.

These files hold item ids only, so the split has one constant activity ("Click"), unknown dwell and no
time. Training sessions come from ``all_train_seq`` with every click its own visit, so every prefix is an
example and the example count equals the published training-prefix count. The test file is a list of
(prefix, label) pairs, each test session contributing its prefixes longest first; the sessions are
rebuilt from those chains so ``split.test.examples()`` yields exactly the published pairs. Item ids are
kept as published (dense index == id), including yoochoose1_64's test-only ids.

The files are pickles, and ``pickle.load`` on a downloaded file runs whatever code it names; they are
read with an unpickler that refuses every global, which plain lists, tuples and ints never need.
"""

from __future__ import annotations

import io
import itertools
import pickle
import pickletools
import zlib
from pathlib import Path

import numpy as np

from edge_client.schema import ActivityVocabulary, DwellBuckets, SchemaError
from model.data.compressed import maybe_decompress_gzip
from model.data.dataset import SessionDataset, SplitData, Vocabulary

SRGNN_TRAIN_FILES = ("all_train_seq.txt.gz", "all_train_seq.txt")
SRGNN_TEST_FILES = ("test.txt.gz", "test.txt")
SRGNN_ACTIVITY = "Click"
MAX_ITEM_ID = 2**31 - 1  # items are stored as int32
# The catalogue is dense (index == id, 1..max id), so its memory follows the largest id, not the file: beyond
# this many ids, a file must use at least 1 in SPARSE_FACTOR of them (yoochoose1_64 uses 17,745 of 37,483).
MAX_SPARSE_CATALOGUE = 1 << 20
SPARSE_FACTOR = 8


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for plain data: any global (class, function) in the stream is refused."""

    def find_class(self, module: str, name: str) -> object:
        """Refuse every global, so a crafted pickle cannot import or call anything."""
        raise SchemaError(
            "unsafe_pickle",
            f"the pickle references the global {module}.{name}; only lists, tuples, numbers and strings are allowed",
        )


def restricted_load(path: str | Path) -> object:
    """Unpickle a (gzip or plain) file with RestrictedUnpickler; SchemaError on anything unexpected.

    Gzip is decompressed within ``model.data.compressed``'s limits (``SchemaError("too_large")`` past them).
    """
    path = Path(path)
    try:
        raw = maybe_decompress_gzip(path.read_bytes(), str(path))
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; zlib.error a damaged stream
        raise SchemaError("bad_file", f"cannot read {path}: {err}") from None
    try:
        # The C unpickler allocates a counted length (BINBYTES: up to 4 GiB) before it reads the bytes, so a
        # 15-byte file could claim gigabytes; pickletools reads every length without allocating it first and
        # stops at the first one the data cannot hold. (About 1 s per million opcodes; the split is cached.)
        for _ in pickletools.genops(io.BytesIO(raw)):
            pass
        return RestrictedUnpickler(io.BytesIO(raw)).load()
    except SchemaError as err:
        raise SchemaError(err.reason, f"{path}: {str(err).split(': ', 1)[-1]}") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many types; all mean "bad file"
        raise SchemaError(
            "bad_file", f"{path} is not a readable pickle ({type(err).__name__}: {err})"
        ) from None


def find_srgnn_files(directory: str | Path) -> tuple[Path, Path] | None:
    """(all_train_seq, test) paths when ``directory`` is in SR-GNN format, else None."""
    directory = Path(directory)
    train = next((directory / n for n in SRGNN_TRAIN_FILES if (directory / n).is_file()), None)
    test = next((directory / n for n in SRGNN_TEST_FILES if (directory / n).is_file()), None)
    return (train, test) if train is not None and test is not None else None


def _check_sequences(value: object, what: str) -> list[list[int]]:
    if not isinstance(value, list) or not all(isinstance(s, list) for s in value):
        raise SchemaError("bad_benchmark", f"{what} must be a list of lists of item ids")
    for k, seq in enumerate(value):
        if not all(type(x) is int and 0 < x <= MAX_ITEM_ID for x in seq):
            raise SchemaError(
                "bad_benchmark",
                f"{what}[{k}] holds something other than positive integer ids (at most 2**31-1)",
            )
    return value


def rebuild_test_sessions(prefixes: list[list[int]], labels: list[int]) -> list[list[int]]:
    """Sessions whose prefixes (longest first, as SR-GNN writes them) are exactly the given pairs."""
    sessions: list[list[int]] = []
    k, n = 0, len(labels)
    while k < n:
        full = [*prefixes[k], labels[k]]
        length = len(full)
        if length < 2:
            raise SchemaError("bad_benchmark", f"test pair {k} has an empty prefix")
        # The next length-2 pairs must be this session's shorter prefixes, in order.
        for j in range(1, length - 1):
            pos = k + j
            if pos >= n or labels[pos] != full[length - 1 - j] or prefixes[pos] != full[: length - 1 - j]:
                raise SchemaError(
                    "bad_benchmark",
                    f"test pair {pos} does not continue the prefix chain started at pair {k}; "
                    "the file is not SR-GNN's longest-first prefix expansion",
                )
        sessions.append(full)
        k += length - 1
    return sessions


def _dataset(sessions: list[list[int]], name: str, vocab: Vocabulary, id_prefix: str) -> SessionDataset:
    lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
    total = int(lengths.sum())
    items = np.fromiter(itertools.chain.from_iterable(sessions), dtype=np.int64, count=total)
    return SessionDataset(
        name=name,
        items=items.astype(np.int32),
        activities=np.zeros(total, np.int16),
        dwell_buckets=np.full(total, vocab.dwell.unknown, np.int8),
        dwell_seconds=np.full(total, np.nan, np.float32),
        timestamps_ms=np.zeros(total, np.int64),
        visit_starts=np.ones(total, bool),  # every click its own visit: every prefix is an example
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        session_ids=np.array([f"{id_prefix}{i}" for i in range(len(sessions))], dtype=str),
        vocab=vocab,
        has_activity=False,
        has_dwell=False,
        has_time=False,
    )


def load_srgnn_split(directory: str | Path, name: str | None = None) -> SplitData:
    """Read an SR-GNN-format directory into a SplitData whose examples are the published ones."""
    directory = Path(directory)
    found = find_srgnn_files(directory)
    if found is None:
        raise SchemaError(
            "missing_data",
            f"{directory} is not an SR-GNN-format directory (needs all_train_seq.txt[.gz] and test.txt[.gz])",
        )
    train_path, test_path = found
    name = name or directory.name
    train_raw = _check_sequences(restricted_load(train_path), f"{train_path.name}")
    test_raw = restricted_load(test_path)
    if not isinstance(test_raw, (tuple, list)) or len(test_raw) != 2:
        raise SchemaError("bad_benchmark", f"{test_path.name} must hold a pair (prefixes, labels)")
    prefixes = _check_sequences(test_raw[0], f"{test_path.name} prefixes")
    labels = test_raw[1]
    if not isinstance(labels, list) or not all(type(x) is int and 0 < x <= MAX_ITEM_ID for x in labels):
        raise SchemaError(
            "bad_benchmark",
            f"{test_path.name} labels must be a list of positive integer ids (at most 2**31-1)",
        )
    if len(prefixes) != len(labels):
        raise SchemaError(
            "bad_benchmark", f"{test_path.name}: {len(prefixes)} prefixes but {len(labels)} labels"
        )

    # Length-1 sessions yield no example; SR-GNN's files have none, but a user's directory might.
    train_sessions = [s for s in train_raw if len(s) >= 2]
    test_sessions = rebuild_test_sessions(prefixes, labels)
    train_ids = np.unique(np.fromiter(itertools.chain.from_iterable(train_sessions), dtype=np.int64))
    # Every id in the files stays addressable, even one only in a dropped length-1 session.
    n_items = max(
        max((max(s) for s in train_raw if s), default=0),
        max(labels, default=0),
        max((max(p) for p in prefixes if p), default=0),
    )
    if n_items > MAX_SPARSE_CATALOGUE:
        used = len(
            set(
                itertools.chain(
                    itertools.chain.from_iterable(train_raw), labels, itertools.chain.from_iterable(prefixes)
                )
            )
        )
        if n_items > SPARSE_FACTOR * used:
            raise SchemaError(
                "bad_benchmark",
                f"item ids reach {n_items:,} but only {used:,} are used: SR-GNN ids are dense (index == id), "
                "and a catalogue this sparse would be allocated in full",
            )
    vocab = Vocabulary(
        item_ids=np.arange(1, n_items + 1).astype(str),  # dense index == published id
        activities=ActivityVocabulary((SRGNN_ACTIVITY,), frozenset()),
        dwell=DwellBuckets(()),
    )
    split = SplitData(
        train=_dataset(train_sessions, f"{name}/train", vocab, "train:"),
        test=_dataset(test_sessions, f"{name}/test", vocab, "test:"),
    )
    n_examples = len(split.test.examples())
    if n_examples != len(labels):
        raise SchemaError(
            "bad_benchmark", f"rebuilt test sessions give {n_examples} prefixes, the file has {len(labels)}"
        )
    label_array = np.asarray(labels, dtype=np.int64)
    unseen_labels = int((~np.isin(label_array, train_ids)).sum())
    unseen_test_items = int((~np.isin(np.unique(split.test.items), train_ids)).sum())
    split.info = {
        "source": name,
        "format": "srgnn",
        "files": [train_path.name, test_path.name],
        "notes": (
            "SR-GNN-format benchmark: item ids only, one constant activity, unknown dwell, no time. "
            "Train = all_train_seq with every click a visit (examples = published train prefixes); "
            "test = sessions rebuilt from the published (prefix, label) pairs, kept exactly as published "
            "(no re-filtering). Item index == published id; ids never seen in training stay in the catalogue."
        ),
        "train_sessions_dropped_short": len(train_raw) - len(train_sessions),
        "test_labels_unseen_in_train": unseen_labels,
        "test_items_unseen_in_train": unseen_test_items,
        "items_in_train": int(len(train_ids)),
        "train": {"sessions": split.train.n_sessions, "examples": int(len(split.train.examples()))},
        "test": {"sessions": split.test.n_sessions, "examples": n_examples},
    }
    return split
