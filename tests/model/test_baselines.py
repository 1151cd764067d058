"""Baselines: planted structure they must find, hand-computed formulas, reference re-implementations."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from edge_client.schema import ActivityVocabulary
from model.baselines import BASELINES, make_baseline
from model.data.dataset import SessionDataset, SplitData
from model.data.protocol import ProtocolConfig, build_split
from model.evaluate import evaluate, top_k
from model.recommender import PrefixBatch, SessionRecommender

CLICK = ActivityVocabulary(("click",), frozenset())
FAST = {"BPR-MF": {"factors": 16}}  # keep BPR quick on toys


def make_split(
    train: Sequence[Sequence[object]],
    test: Sequence[Sequence[object]],
    session_gap_ms: int = 100_000,
    constant_time: bool = False,
) -> SplitData:
    """A split whose sessions are exactly ``train`` and ``test`` (visit item sequences), in time order."""
    rows = []
    for k, items in enumerate([*train, *test]):
        for p, item in enumerate(items):
            t = 0 if constant_time else k * session_gap_ms + p * 1000
            rows.append((f"s{k:06d}", t, str(item), "click"))
    frame = pd.DataFrame(rows, columns=["session_id", "timestamp_ms", "item_id", "activity"])
    test_ids = {f"s{k:06d}" for k in range(len(train), len(train) + len(test))}
    return build_split(frame, "toy", CLICK, ProtocolConfig(min_item_support=1), test_sessions=test_ids)


def batch_of(data: SessionDataset, prefixes: Sequence[Sequence[object]] | None = None) -> PrefixBatch:
    """Every example prefix of ``data``, or only those whose visit items equal one of ``prefixes``."""
    ex = data.examples()
    index = np.arange(len(ex))
    if prefixes is not None:
        ids = data.vocab.item_ids
        wanted = {tuple(str(x) for x in p) for p in prefixes}
        index = np.array(
            [k for k in index if tuple(ids[data.visit_items(ex.starts[k], ex.ends[k]) - 1]) in wanted]
        )
    return PrefixBatch(data, ex.starts[index], ex.ends[index])


def build(name: str, **overrides: object) -> SessionRecommender:
    """A baseline with test-friendly settings."""
    return make_baseline(name, **{**FAST.get(name, {}), **overrides})


def chain_split(n_chains: int = 30, length: int = 4, copies: int = 6, seed: int = 0) -> SplitData:
    """Disjoint item chains c_k0 -> c_k1 -> ..., repeated in training, plus a few hot noise items."""
    rng = np.random.default_rng(seed)
    chains = [[f"c{k}_{j}" for j in range(length)] for k in range(n_chains)]
    hot = [f"hot{h}" for h in range(5)]
    train = [c for c in chains for _ in range(copies)]
    train += [
        list(rng.choice(hot, size=3, replace=False)) for _ in range(n_chains * copies)
    ]  # POP's favourites
    rng.shuffle(train)
    return make_split(train, chains)


class RandomScorer:
    """Uniform random scores: the floor every learned baseline must clear."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def fit(self, train: SessionDataset) -> RandomScorer:
        """Nothing to learn."""
        return self

    def score(self, batch: PrefixBatch) -> np.ndarray:
        """Fresh uniform noise."""
        return self.rng.random((len(batch), batch.dataset.n_items + 1)).astype(np.float32)


# ---- registry and interface ---------------------------------------------------------------------


def test_registry_names_and_overrides():
    assert list(BASELINES) == ["POP", "Item-KNN", "BPR-MF", "SR", "S-KNN", "V-SKNN", "STAN"]
    assert make_baseline("S-KNN", k=7).config.k == 7
    assert make_baseline("STAN").config.lambda1 == pytest.approx(1.02)
    with pytest.raises(KeyError, match="known"):
        make_baseline("GRU4Rec")
    with pytest.raises(TypeError):
        make_baseline("SR", no_such_field=1)
    with pytest.raises(ValueError):
        make_baseline("SR", weighting="cubic")


@pytest.mark.parametrize("name", list(BASELINES))
def test_scores_shape_dtype_and_protocol(name):
    split = chain_split()
    model = build(name).fit(split.train)
    assert isinstance(model, SessionRecommender) and model.name == name
    batch = batch_of(split.test)
    scores = model.score(batch)
    assert scores.shape == (len(batch), split.test.n_items + 1)
    assert scores.dtype == np.float32
    assert np.isfinite(scores[:, 1:]).all()


@pytest.mark.parametrize("name", list(BASELINES))
def test_scoring_never_reads_past_the_prefix(name):
    """Scores depend only on tuples [start, end): scrambling everything after a prefix changes nothing."""
    split = chain_split()
    model = build(name).fit(split.train)
    test = split.test
    ex = test.examples()
    first = np.r_[True, ex.session_index[1:] != ex.session_index[:-1]]  # one prefix per session
    batch = PrefixBatch(test, ex.starts[first], ex.ends[first])
    inside = np.zeros(test.n_tuples, bool)
    for s, e in zip(batch.starts, batch.ends, strict=True):
        inside[s:e] = True
    rng = np.random.default_rng(1)
    items = test.items.copy()
    items[~inside] = rng.integers(1, test.n_items + 1, (~inside).sum())
    times = test.timestamps_ms.copy()
    times[~inside] += rng.integers(-(10**9), 10**9, (~inside).sum())
    scrambled = dataclasses.replace(test, items=items, timestamps_ms=times)
    before = model.score(batch)
    after = model.score(PrefixBatch(scrambled, batch.starts, batch.ends))
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("name", ["Item-KNN", "SR", "S-KNN", "V-SKNN", "STAN"])
def test_fit_learns_nothing_from_test_sessions(name):
    """p and q are both known from training but only ever co-occur in test: q must get no credit after p."""
    train = [["p", "x", "y"], ["q", "z", "w"], ["x", "p", "y"], ["z", "q", "w"]] * 5
    split = make_split(train, [["p", "q", "x"], ["y", "p", "q"]])
    model = build(name).fit(split.train)
    q = split.vocab.item_index()["q"]
    scores = model.score(batch_of(split.test, [["p"], ["y", "p"]]))
    assert scores.shape[0] == 2
    np.testing.assert_array_equal(scores[:, q], 0.0)


# ---- POP ----------------------------------------------------------------------------------------


def test_pop_ranks_the_most_visited_item_first():
    train = [["a", "b"], ["a", "c"], ["a", "b", "a"], ["c", "d"], ["b", "c", "a"]]
    split = make_split(train, [["d", "b", "c"]])
    index = split.vocab.item_index()
    scores = build("POP").fit(split.train).score(batch_of(split.test))
    assert (top_k(scores, 1)[:, 0] == index["a"]).all()
    # Visit counts: a 5 (a b a is three visits), b 3, c 3, d 1.
    expected = {"a": 5, "b": 3, "c": 3, "d": 1}
    for item, count in expected.items():
        assert (scores[:, index[item]] == count).all()


# ---- Item-KNN -----------------------------------------------------------------------------------


ITEM_KNN_TRAIN = [["a", "b", "c"], ["a", "b", "a"], ["a", "d"], ["b", "c"], ["c", "d"]]
# Sessions containing each item: Freq(a)=3, Freq(b)=3, Freq(c)=3, Freq(d)=2 (a b a counts once).
# Pairs: Freq(ab)=2, Freq(ac)=1, Freq(ad)=1, Freq(bc)=2, Freq(bd)=0, Freq(cd)=1.


@pytest.mark.parametrize(
    "similarity, expected",
    [
        ("paper", {"a": 0.0, "b": 2 / 9, "c": 1 / 9, "d": 1 / 6}),
        ("cosine", {"a": 0.0, "b": 2 / 3, "c": 1 / 3, "d": 1 / math.sqrt(6)}),
    ],
)
def test_item_knn_matches_the_hand_computed_formula(similarity, expected):
    split = make_split(ITEM_KNN_TRAIN, [["c", "a", "b"]])
    index = split.vocab.item_index()
    model = build("Item-KNN", similarity=similarity).fit(split.train)
    scores = model.score(batch_of(split.test, [["c", "a"]]))  # only the last item (a) matters
    assert scores.shape[0] == 1
    for item, value in expected.items():
        assert scores[0, index[item]] == pytest.approx(value, rel=1e-6)


# ---- SR -----------------------------------------------------------------------------------------


def test_sr_weights_rules_by_one_over_the_gap():
    # a->b: 1 (gap 1); a->c: 1/2 (gap 2 in "a b c") + 1 (gap 1 in "a c") = 1.5; b->c: 1.
    split = make_split([["a", "b", "c"], ["a", "c"]], [["b", "a", "c"]])
    index = split.vocab.item_index()
    batch = batch_of(split.test, [["b", "a"]])
    full = build("SR").fit(split.train).score(batch)[0]
    assert full[index["b"]] == pytest.approx(1.0)
    assert full[index["c"]] == pytest.approx(1.5)
    one_step = build("SR", steps=1).fit(split.train).score(batch)[0]
    assert one_step[index["c"]] == pytest.approx(1.0)
    pruned = build("SR", pruning=1).fit(split.train).score(batch)[0]
    assert pruned[index["c"]] == pytest.approx(1.5) and pruned[index["b"]] == 0.0


def test_sr_recommends_the_planted_successor_first():
    rng = np.random.default_rng(3)
    filler = [f"f{i}" for i in range(20)]
    train = []
    for _ in range(60):
        head = list(rng.choice(filler, size=2, replace=False))
        train.append([*head, "x", "y", *rng.choice(filler, size=1)])  # x is always followed by y
    train += [list(rng.choice(filler, size=4, replace=False)) for _ in range(200)]
    split = make_split(train, [["f1", "x", "y"], ["f2", "f3", "x", "y"]])
    scores = build("SR").fit(split.train).score(batch_of(split.test, [["f1", "x"], ["f2", "f3", "x"]]))
    assert len(scores) == 2
    assert (top_k(scores, 1)[:, 0] == split.vocab.item_index()["y"]).all()


# ---- session KNN family -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["S-KNN", "V-SKNN", "STAN"])
def test_session_knn_finds_planted_chains_and_beats_pop(name):
    split = chain_split()
    pop = evaluate(build("POP").fit(split.train), split.test, ks=(5,)).metrics["recall@5"]
    knn = evaluate(build(name).fit(split.train), split.test, ks=(5,)).metrics["recall@5"]
    assert knn >= 0.95
    assert knn > pop + 0.5


def _reference_knn(variant: str, train: SessionDataset, prefix: list[int], now_s: float, cfg) -> np.ndarray:
    """Straight loop-and-set port of session-rec's predict_next for one prefix (slow, obviously right)."""
    seqs = [list(map(int, s)) for s in train.session_visit_sequences()]
    last_s = train.timestamps_ms[train.offsets[1:] - 1] / 1000.0
    rank = np.argsort(np.lexsort((np.arange(len(seqs)), last_s)))  # recency rank, ties by index
    current = set(prefix)
    candidates = sorted((s for s, seq in enumerate(seqs) if current & set(seq)), key=lambda s: -rank[s])
    if cfg.sample_size:
        candidates = candidates[: cfg.sample_size]
    length = len(prefix)
    weight = {}
    for pos, item in enumerate(prefix, 1):  # later occurrences overwrite, as in session-rec's pos_map
        weight[item] = {"sknn": 1.0, "vsknn": pos / length, "stan": math.exp((pos - length) / 1.02)}[variant]
    visits = np.bincount([i for s in seqs for i in s], minlength=train.n_items + 1)
    neighbours = []
    for s in candidates:
        items = set(seqs[s])
        shared = current & items
        if variant == "sknn":
            sim = len(shared) / math.sqrt(len(current) * len(items))
        elif variant == "vsknn":
            sim = sum(weight[i] for i in shared) / len(weight)
        else:
            norm = math.sqrt(sum(w * w for w in weight.values())) * math.sqrt(len(items))
            sim = sum(weight[i] for i in shared) / norm * math.exp(-abs(now_s - last_s[s]) / (5 * 86400))
        neighbours.append((s, sim))
    neighbours.sort(key=lambda sv: (-np.float32(sv[1]), -rank[sv[0]]))
    out = np.zeros(train.n_items + 1)
    for s, sim in neighbours[: cfg.k]:
        seq = seqs[s]
        if variant == "sknn":
            for i in set(seq):
                out[i] += sim
        elif variant == "vsknn":
            step = next(n for n, i in enumerate(reversed(prefix), 1) if i in seq)
            for i in set(seq):
                out[i] += sim / step * (1 + cfg.idf_weighting * math.log(len(seqs) / visits[i]))
        else:
            anchor = max(p for p, i in enumerate(seq, 1) if i in current)
            last_pos = {i: p for p, i in enumerate(seq, 1)}
            for i in set(seq):
                out[i] += sim * math.exp(-abs(last_pos[i] - anchor) / 2.05)
    return out


@pytest.mark.parametrize(
    "name, variant, overrides",
    [
        ("S-KNN", "sknn", {"k": 5, "sample_size": 12}),
        ("S-KNN", "sknn", {"k": 100, "sample_size": 0}),
        ("V-SKNN", "vsknn", {"k": 5, "sample_size": 12}),
        ("V-SKNN", "vsknn", {"k": 8, "sample_size": 30, "idf_weighting": 2.0}),
        ("STAN", "stan", {"k": 5, "sample_size": 12}),
        ("STAN", "stan", {"k": 100, "sample_size": 0}),
    ],
)
def test_session_knn_equals_a_loop_reference(name, variant, overrides):
    rng = np.random.default_rng(7)
    items = [f"i{j}" for j in range(25)]
    p = np.linspace(2.0, 0.2, len(items))
    p /= p.sum()

    def session(n: int) -> list[str]:
        out = [str(rng.choice(items, p=p))]
        while len(out) < n:
            nxt = str(rng.choice(items, p=p))
            if nxt != out[-1]:
                out.append(nxt)
        return out

    train = [session(int(rng.integers(2, 8))) for _ in range(150)]
    test = [session(int(rng.integers(2, 10))) for _ in range(25)]
    split = make_split(
        train, test, session_gap_ms=int(3.6e6 * 7)
    )  # sessions ~7 h apart: the time decay bites
    model = build(name, exclude_last=False, **overrides).fit(split.train)
    batch = batch_of(split.test)
    scores = model.score(batch)
    cfg = model.config
    for b in range(len(batch)):
        now_s = split.test.timestamps_ms[batch.ends[b] - 1] / 1000.0
        expected = _reference_knn(variant, split.train, list(map(int, batch.visit_items(b))), now_s, cfg)
        np.testing.assert_allclose(scores[b], expected, rtol=1e-5, atol=1e-9)


def test_demoting_the_last_item_never_recommends_it():
    split = chain_split()
    batch = batch_of(split.test)
    for name in ["SR", "S-KNN", "V-SKNN", "STAN", "BPR-MF"]:
        best = top_k(build(name).fit(split.train).score(batch), 1)[:, 0]
        assert not (best == batch.last_items()).any(), name


def test_stan_time_decay_is_off_without_timestamps():
    train = [["a", "b", "c"], ["a", "c", "d"], ["b", "d"], ["a", "d", "b"]] * 3
    timed = make_split(train, [["a", "b", "d"]], session_gap_ms=86_400_000)
    untimed = make_split(train, [["a", "b", "d"]], constant_time=True)
    assert timed.train.has_time and not untimed.train.has_time
    for split, differs in ((timed, True), (untimed, False)):
        batch = batch_of(split.test)
        with_decay = build("STAN").fit(split.train).score(batch)
        without = build("STAN", lambda2_days=None).fit(split.train).score(batch)
        assert (not np.allclose(with_decay, without)) == differs


# ---- BPR-MF -------------------------------------------------------------------------------------


def test_bpr_mf_learns_co_occurrence_and_is_seeded():
    rng = np.random.default_rng(11)
    groups = [[f"g{g}_{j}" for j in range(6)] for g in range(12)]  # items co-occur only within a group

    def session() -> list[str]:
        group = groups[int(rng.integers(len(groups)))]
        return list(rng.choice(group, size=int(rng.integers(3, 5)), replace=False))

    split = make_split([session() for _ in range(600)], [session() for _ in range(80)])
    bpr = build("BPR-MF", seed=3).fit(split.train)
    recall = evaluate(bpr, split.test, ks=(10,)).metrics["recall@10"]
    floor = evaluate(RandomScorer(), split.test, ks=(10,)).metrics["recall@10"]
    assert recall > floor + 0.4

    batch = batch_of(split.test)
    again = build("BPR-MF", seed=3).fit(split.train)
    np.testing.assert_array_equal(bpr.score(batch), again.score(batch))
    other = build("BPR-MF", seed=4).fit(split.train)
    assert not np.array_equal(bpr.score(batch), other.score(batch))


# ---- real data ----------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_sr_and_sknn_beat_pop_on_yoochoose_100k(shared_data: Path):
    folder = shared_data / "yoochoose_100k"
    raw = pd.concat(
        [
            pd.read_csv(folder / f"yoochoose-clicks-100k_{part}.tsv.gz", sep="\t")
            for part in ("train_full", "test")
        ]
    )
    frame = pd.DataFrame(
        {
            "session_id": raw["SessionId"].astype(str),
            "timestamp_ms": (raw["Time"] * 1000).round().astype(np.int64),
            "item_id": raw["ItemId"].astype(str),
            "activity": "click",
        }
    )
    split = build_split(frame, "yoochoose_100k", CLICK, ProtocolConfig(test_seconds=86400))
    recall = {
        name: evaluate(build(name).fit(split.train), split.test, ks=(20,)).metrics["recall@20"]
        for name in ("POP", "SR", "S-KNN")
    }
    assert recall["POP"] < 0.15  # measured 0.075
    assert recall["SR"] > recall["POP"] + 0.3  # measured 0.553
    assert recall["S-KNN"] > recall["POP"] + 0.3  # measured 0.562


def test_last_item_is_demoted_only_where_training_never_repeats_it(tmp_path):
    """SR-GNN splits keep repeated clicks (one click = one visit): there the current item stays rankable."""
    import pickle

    from model.data.srgnn import load_srgnn_split

    train = [[1, 1, 2], [3, 3, 4], [1, 1, 2], [3, 3, 4]] * 5
    with open(tmp_path / "all_train_seq.txt", "wb") as handle:
        pickle.dump(train, handle)
    with open(tmp_path / "test.txt", "wb") as handle:
        pickle.dump(([[1], [3]], [1, 3]), handle)
    split = load_srgnn_split(tmp_path, "repeats")
    assert split.train.repeat_rate() > 0.3
    assert not BASELINES["BPR-MF"]().fit(split.train)._exclude_last
    for name in ("SR", "S-KNN", "V-SKNN", "STAN"):
        model = BASELINES[name]().fit(split.train)
        assert not model._exclude_last, name
        # Demoted, the repeated item would sit last (rank 4 of 4); kept, it is in the top two.
        assert evaluate(model, split.test).ranks.max() <= 2, name
