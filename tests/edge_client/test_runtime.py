"""The on-device Recommender: recommendations, explanations, exclusions, cold start, incremental steps, swap."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_client.package import FULL_GRAPH, PackageError, generate_keypair, load_private_key, sign_package
from edge_client.runtime import Recommender, latest_session
from edge_client.schema import MicroBehavior

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Keys, a trained synthetic model, and packages: v1 fp32, v2 int8."""
    from model.data.open import open_dataset
    from model.export import build_package, popularity_from
    from model.train import TrainConfig, rib_config_for, train_rib

    base = tmp_path_factory.mktemp("runtime")
    split = open_dataset("synthetic")
    tc = TrainConfig(epochs=4, min_steps=0, patience=10, w2v_init=False)
    rec, _ = train_rib(split.train, rib_config_for(split.train, hidden_dim=32, max_len=8), tc, progress=False)
    private, public = generate_keypair(base / "keys")
    popular = popularity_from(split.train)
    v1 = base / "v1"
    build_package(rec.model, split.vocab, v1, private, 1, popular, int8=False)
    v2 = base / "v2"
    build_package(rec.model, split.vocab, v2, private, 2, popular, int8=True)
    rec.save(base / "rib.pt")
    return {
        "split": split,
        "model": rec.model,
        "private": private,
        "public": public,
        "v1": v1,
        "v2": v2,
        "base": base,
        "popular": popular,
    }


def history_of(split, n: int = 6, session: int = 0) -> list[MicroBehavior]:
    test = split.test
    lo = int(test.offsets[session])
    hi = min(int(test.offsets[session + 1]), lo + n)
    vocab = split.vocab
    return [
        MicroBehavior(
            "s",
            int(test.timestamps_ms[i]),
            str(vocab.item_ids[test.items[i] - 1]),
            vocab.activities.names[int(test.activities[i])],
            float(test.dwell_seconds[i]),
        )
        for i in range(lo, hi)
    ]


def test_recommend_matches_torch(world):
    import torch

    split, model = world["split"], world["model"]
    rec = Recommender(world["v1"], world["public"])
    history = history_of(split, 6)
    recs = rec.recommend(history, k=10, exclude_seen=False)
    assert len(recs) == 10 and all(r.source == "model" for r in recs)
    index = {str(i): n + 1 for n, i in enumerate(split.vocab.item_ids)}
    items = torch.tensor([[index[b.item_id] for b in history]])
    acts = torch.tensor([[split.vocab.activities.index(b.activity) for b in history]])
    dwell = torch.tensor([[split.vocab.dwell.bucket_of(b.dwell_seconds) for b in history]])
    with torch.no_grad():
        ref = model(items, acts, dwell, torch.ones_like(items, dtype=torch.bool))[0].numpy()
    ref[0] = -np.inf
    expected = [str(split.vocab.item_ids[i - 1]) for i in np.argsort(-ref, kind="stable")[:10]]
    assert [r.item_id for r in recs] == expected
    assert all(abs(r.score - ref[index[r.item_id]]) < 1e-4 for r in recs)
    weights = [t.weight for t in recs[0].explanation]
    assert len(weights) == len(history) and math.isclose(sum(weights), 1.0, abs_tol=1e-5)
    assert [t.dwell_bucket for t in recs[0].explanation] == [
        split.vocab.dwell.bucket_of(b.dwell_seconds) for b in history
    ]


def test_unknown_items_skipped_and_counted(world):
    rec = Recommender(world["v1"], world["public"])
    history = history_of(world["split"], 4)
    noisy = [history[0], MicroBehavior("s", 1, "no-such-item", "Cart", 3.0), *history[1:]]
    bad_activity = MicroBehavior("s", 2, history[0].item_id, "Teleport", 3.0)
    a = rec.recommend(history, k=5)
    b = rec.recommend([*noisy, bad_activity][:-1], k=5)
    assert [r.item_id for r in a] == [r.item_id for r in b]
    assert rec.stats["unknown_item"] == 1
    explanation = b[0].explanation
    assert len(explanation) == 5 and not explanation[1].used and explanation[1].weight == 0.0
    rec.recommend([bad_activity], k=3)
    assert rec.stats["unknown_activity"] == 1


def test_exclusions(world):
    rec = Recommender(world["v1"], world["public"])
    history = history_of(world["split"], 5)
    seen = {b.item_id for b in history}
    n_items = len(rec.vocab.item_ids)
    with_seen = rec.recommend(history, k=n_items + 5, exclude_seen=False)
    assert len(with_seen) == n_items and seen <= {r.item_id for r in with_seen}  # never the padding column
    default = rec.recommend(history, k=n_items)
    assert len(default) == n_items - len(seen) and not seen & {r.item_id for r in default}
    banned = {r.item_id for r in default[:3]}
    filtered = rec.recommend(history, k=50, exclude=banned)
    assert not banned & {r.item_id for r in filtered}
    assert [r.item_id for r in filtered][:5] == [r.item_id for r in default if r.item_id not in banned][:5]


def test_popularity_fallback(world):
    rec = Recommender(world["v1"], world["public"])
    items, _ = world["popular"]
    cold = rec.recommend([], k=5)
    assert [r.item_id for r in cold] == items[:5] and all(r.source == "popularity" for r in cold)
    unknown_only = rec.recommend(
        [MicroBehavior("s", 1, "no-such-item", "Cart", 3.0)], k=5, exclude=[items[0]]
    )
    assert [r.item_id for r in unknown_only] == items[1:6]
    assert rec.stats["popularity_fallback"] == 2


def test_dwell_uses_package_edges(world):
    rec = Recommender(world["v1"], world["public"])
    edges = rec.vocab.dwell
    history = [
        MicroBehavior("s", 1, rec.vocab.item_ids[0], "Home2Product", s) for s in (0.5, 1e6, float("nan"))
    ]
    explanation = rec.recommend(history, k=1, exclude_seen=False)[0].explanation
    assert [t.dwell_bucket for t in explanation] == [
        edges.bucket_of(0.5),
        edges.bucket_of(1e6),
        edges.unknown,
    ]


def test_incremental_steps_match_full_recommend(world):
    rec = Recommender(world["v1"], world["public"])  # fp32: step graph == full graph
    split = world["split"]
    lengths = np.diff(split.test.offsets)
    session = int(np.flatnonzero(lengths > 10)[0])  # longer than max_len=8: exercises the window slide
    history = history_of(split, 12, session)
    live = rec.start_session()
    assert live.recommendations(k=3)[0].source == "popularity"
    for t in range(len(history)):
        stepped = live.step(history[t], k=20)
        full = rec.recommend(history[: t + 1], k=20)
        assert [r.item_id for r in stepped] == [r.item_id for r in full]
        assert max(abs(a.score - b.score) for a, b in zip(stepped, full, strict=True)) < 1e-4
        wa = [x.weight for x in stepped[0].explanation]
        wb = [x.weight for x in full[0].explanation]
        assert np.allclose(wa, wb, atol=1e-5)
    assert sum(x.used for x in stepped[0].explanation) == 8  # the model's window


def test_int8_package_close_to_fp32(world):
    fp32 = Recommender(world["v1"], world["public"])
    int8 = Recommender(world["v2"], world["public"])
    overlaps = []
    split = world["split"]
    for session in range(30):
        history = history_of(split, 8, session)
        if not history:
            continue
        a = {r.item_id for r in fp32.recommend(history, k=20, exclude_seen=False)}
        b = {r.item_id for r in int8.recommend(history, k=20, exclude_seen=False)}
        overlaps.append(len(a & b) / 20)
    assert np.mean(overlaps) >= 0.9
    assert (world["v2"] / FULL_GRAPH).stat().st_size < (world["v1"] / FULL_GRAPH).stat().st_size


def test_swap_and_keep_old_model_on_failure(world, tmp_path):
    rec = Recommender(world["v1"], world["public"])
    history = history_of(world["split"], 5)
    before = rec.recommend(history, k=5)

    def expect_failure(path: Path, reason: str) -> None:
        with pytest.raises(PackageError) as err:
            rec.swap(path)
        assert err.value.reason == reason
        assert rec.model_version == 1
        assert [r.item_id for r in rec.recommend(history, k=5)] == [r.item_id for r in before]

    tampered = tmp_path / "tampered"
    shutil.copytree(world["v2"], tampered)
    data = bytearray((tampered / FULL_GRAPH).read_bytes())
    data[-10] ^= 0xFF
    (tampered / FULL_GRAPH).write_bytes(bytes(data))
    expect_failure(tampered, "hash_mismatch")

    # Correctly signed, but the graph is garbage: verification passes, loading fails, old model stays.
    broken = tmp_path / "broken"
    shutil.copytree(world["v2"], broken)
    (broken / "manifest.json").unlink()
    (broken / "manifest.sig").unlink()
    (broken / FULL_GRAPH).write_bytes(b"definitely not onnx")
    sign_package(broken, world["private"], 3, rec.manifest.model)
    expect_failure(broken, "bad_payload")

    other_private, other_public = generate_keypair(tmp_path / "other")
    foreign = tmp_path / "foreign"
    shutil.copytree(world["v2"], foreign)
    (foreign / "manifest.sig").write_bytes(
        load_private_key(other_private).sign((foreign / "manifest.json").read_bytes())
    )
    expect_failure(foreign, "bad_signature")
    expect_failure(world["v1"], "stale_version")

    live = rec.start_session()
    live.step(history[0])
    manifest = rec.swap(world["v2"])
    assert manifest.model_version == 2 and rec.model_version == 2
    assert live.model_version == 1  # a running session keeps its model
    assert rec.recommend(history, k=5)
    expect_failure_v2 = pytest.raises(PackageError)
    with expect_failure_v2 as err:
        rec.swap(world["v2"])
    assert err.value.reason == "stale_version" and rec.model_version == 2


def test_latest_session():
    records = [
        MicroBehavior("a", 5, "x", "Cart", 1.0),
        MicroBehavior("b", 9, "y", "Cart", 1.0),
        MicroBehavior("b", 7, "z", "Cart", 1.0),
        MicroBehavior("a", 3, "w", "Cart", 1.0),
    ]
    assert [r.item_id for r in latest_session(records)] == ["z", "y"]
    assert latest_session([]) == []


def test_runtime_import_has_no_torch():
    code = "import sys, edge_client.runtime; sys.exit(1 if 'torch' in sys.modules or 'onnx' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_cli_edge_commands(world, tmp_path):
    from click.testing import CliRunner

    from model.data.synthetic import SyntheticConfig, generate_population
    from rib_edge.cli_edge import edge_group

    runner = CliRunner()
    public = str(world["public"])
    result = runner.invoke(edge_group, ["keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    other_public = str(tmp_path / "k" / "edge_signing_key.pub.pem")

    result = runner.invoke(edge_group, ["verify", str(world["v2"]), "--public-key", public])
    assert result.exit_code == 0 and json.loads(result.output)["model_version"] == 2
    result = runner.invoke(edge_group, ["verify", str(world["v2"]), "--public-key", other_public])
    assert result.exit_code == 2 and "bad_signature" in result.output
    result = runner.invoke(
        edge_group, ["verify", str(world["v2"]), "--public-key", public, "--installed-version", "2"]
    )
    assert result.exit_code == 2 and "stale_version" in result.output

    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(e.to_json() for e in generate_population(SyntheticConfig(n_devices=2), seed=7)) + "\n"
    )
    result = runner.invoke(
        edge_group,
        [
            "recommend",
            "--package",
            str(world["v2"]),
            "--events",
            str(events),
            "--public-key",
            public,
            "--json",
            "-k",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert len(payload["recommendations"]) == 5 and payload["session_tuples"] > 0
    result = runner.invoke(
        edge_group,
        ["recommend", "--package", str(world["v2"]), "--events", str(events), "--public-key", public],
    )
    assert result.exit_code == 0 and "attention over the session" in result.output

    out = tmp_path / "pkg"
    result = runner.invoke(
        edge_group,
        [
            "package",
            "--checkpoint",
            str(world["base"] / "rib.pt"),
            "--dataset",
            "synthetic",
            "--out",
            str(out),
            "--key",
            str(world["private"]),
            "--model-version",
            "7",
        ],
    )
    assert result.exit_code == 0, result.output
    assert Recommender(out, world["public"], installed_version=6).model_version == 7


def test_path_loading_gives_the_same_answers(world):
    history = history_of(world["split"], 6)
    strict = Recommender(world["v2"], world["public"])
    by_path = Recommender(world["v2"], world["public"], strict_load=False)
    a, b = strict.recommend(history, k=20), by_path.recommend(history, k=20)
    assert [r.item_id for r in a] == [r.item_id for r in b]
    assert [r.score for r in a] == [r.score for r in b]


def test_one_session_serves_whole_sessions_and_steps(world):
    """int8: a live session's steps and whole-session recommend() run the same graph, so they agree exactly."""
    rec = Recommender(world["v2"], world["public"])
    loaded = rec._loaded
    assert not hasattr(loaded, "step") and {"items", "hidden", "run_max"} <= loaded.inputs
    history = history_of(world["split"], 8, 3)
    live = rec.start_session()
    for t in range(len(history)):
        stepped = live.step(history[t], k=20)
        full = rec.recommend(history[: t + 1], k=20)
        assert [r.item_id for r in stepped] == [r.item_id for r in full]
        assert max(abs(a.score - b.score) for a, b in zip(stepped, full, strict=True)) < 1e-4


def test_top_k_is_exact(world):
    rec = Recommender(world["v1"], world["public"])
    top_k = rec._loaded.top_k
    rng = np.random.default_rng(0)

    def reference(scores, k, banned):
        scores = scores.astype(np.float32, copy=True)
        scores[0] = -np.inf
        scores[list(banned)] = -np.inf
        order = [
            int(i)
            for i in np.lexsort((np.arange(len(scores)), -scores))
            if scores[i] > -np.inf and not np.isnan(scores[i])
        ]
        return [(i, float(scores[i])) for i in order[:k]]

    for trial in range(60):
        n = int(rng.choice([7, 300, 5000, 100_001]))
        scores = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores, 1)  # many ties, also at the k-th place
        if trial % 5 == 0:
            scores[rng.integers(0, n, 4)] = np.nan
        k = int(rng.choice([1, 20, 100, n + 5]))
        banned = [int(b) for b in rng.integers(0, n, 10)]
        assert top_k(scores, k, banned) == reference(scores, k, banned), (trial, n, k)


def test_refuses_a_full_graph_that_is_not_a_session_graph(world, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    rec = Recommender(world["v1"], world["public"])
    package = tmp_path / "old"
    shutil.copytree(world["v2"], package)
    for name in ("manifest.json", "manifest.sig"):
        (package / name).unlink()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["items"], ["scores"])],
        "g",
        [helper.make_tensor_value_info("items", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("scores", TensorProto.INT64, None)],
    )
    (package / FULL_GRAPH).write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    )
    sign_package(package, world["private"], 9, rec.manifest.model)
    with pytest.raises(PackageError) as err:
        rec.swap(package)
    assert err.value.reason == "bad_payload" and rec.model_version == 1
    assert onnx.load(str(package / FULL_GRAPH)).graph.node[0].op_type == "Identity"
