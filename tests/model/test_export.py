"""ONNX export of RIB: fp32 parity with torch (full graph, step by step, chunked advance), the step graph's
weights living in full.onnx, int8 (one fused output MatMul) top-20 agreement, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.export import (
    ExportError,
    FullSession,
    build_package,
    check_exportable,
    export_onnx,
    feed_for,
    folded_for_export,
    full_advance,
    initial_step_state,
    link_to_full,
    popularity_from,
    quantize_int8,
    real_prefixes,
    run_steps,
    session_for,
    topk_agreement,
)
from model.rib import RIB, RIBConfig


@pytest.fixture(scope="module")
def trained():
    """A small RIB trained for a few epochs on the synthetic population (seconds)."""
    from model.data.open import open_dataset
    from model.train import TrainConfig, rib_config_for, train_rib

    split = open_dataset("synthetic")
    tc = TrainConfig(epochs=6, min_steps=0, patience=10, w2v_init=False)
    rec, _ = train_rib(split.train, rib_config_for(split.train, hidden_dim=64), tc, progress=False)
    return rec.model.eval(), split


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, _ = trained
    return export_onnx(model, tmp_path_factory.mktemp("onnx"))


def test_fp32_full_and_step_parity_with_torch(exported):
    assert exported.full_max_abs_diff < 1e-4
    assert exported.step_max_abs_diff < 1e-4


def test_step_by_step_equals_full_graph_on_real_prefixes(trained, exported):
    model, split = trained
    full, step = session_for(exported.full), session_for(exported.step)
    for items, activities, dwell in real_prefixes(split.test, model.config.max_len, n=10):
        step_scores, _, step_weights = run_steps(step, model.config.hidden_dim, items, activities, dwell)
        feed = {
            "items": items[None],
            "activities": activities[None],
            "dwell": dwell[None],
            "lengths": np.array([len(items)]),
        }
        scores, weights = full.run(None, feed_for(full, feed))[:2]
        assert np.abs(step_scores[-1] - scores[0]).max() < 1e-4
        advanced, _, advanced_weights = run_steps(
            full, model.config.hidden_dim, items, activities, dwell
        )  # the device's step
        assert np.abs(advanced - step_scores).max() < 1e-4
        assert np.abs(advanced_weights - weights[0]).max() < 1e-5
        assert np.abs(step_weights - weights[0]).max() < 1e-5
        with torch.no_grad():
            ref = model(
                *(torch.from_numpy(a[None]) for a in (items, activities, dwell)),
                torch.ones(1, len(items), dtype=torch.bool),
            )
            all_prefixes = model.forward_all(
                *(torch.from_numpy(a[None]) for a in (items, activities, dwell)),
                torch.ones(1, len(items), dtype=torch.bool),
            )
        assert np.abs(scores[0] - ref[0].numpy()).max() < 1e-4
        assert np.abs(step_scores - all_prefixes[0].numpy()).max() < 1e-4


def test_full_graph_padded_batch_and_dynamic_length(trained, exported):
    model, _ = trained
    full = session_for(exported.full)
    g = torch.Generator().manual_seed(3)
    for length in (1, 5, 50):
        items = torch.randint(1, model.config.n_items + 1, (3, length), generator=g)
        acts = torch.randint(0, model.config.n_activities, (3, length), generator=g)
        dwell = torch.randint(0, model.config.n_dwell, (3, length), generator=g)
        lengths = torch.tensor([length, max(1, length // 2), 1])
        mask = torch.arange(length)[None] < lengths[:, None]
        items, acts, dwell = (torch.where(mask, x, torch.zeros_like(x)) for x in (items, acts, dwell))
        with torch.no_grad():
            ref = model(items, acts, dwell, mask).numpy()
            ref_w = model.attention_weights(items, acts, dwell, mask).numpy()
        scores, weights = full.run(
            None,
            feed_for(
                full,
                {
                    "items": items.numpy(),
                    "activities": acts.numpy(),
                    "dwell": dwell.numpy(),
                    "lengths": lengths.numpy(),
                },
            ),
        )[:2]
        assert np.abs(scores - ref).max() < 1e-4
        assert np.abs(weights - ref_w).max() < 1e-5
        assert np.allclose(weights.sum(1), 1.0, atol=1e-5)


def test_chunked_advance_equals_one_call(trained, exported):
    """Advancing a state by chunks of any size gives the scores, weights and state of one whole call."""
    model, split = trained
    full = session_for(exported.full)
    items, activities, dwell = next(
        p for p in real_prefixes(split.test, model.config.max_len, n=50) if len(p[0]) >= 6
    )
    whole_state, whole = full_advance(
        full, initial_step_state(model.config.hidden_dim), items, activities, dwell
    )
    state, att = initial_step_state(model.config.hidden_dim), []
    for start, stop in ((0, 3), (3, 5), (5, len(items))):
        state, out = full_advance(full, state, items[start:stop], activities[start:stop], dwell[start:stop])
        att.extend(out["att"][0].tolist())
    assert np.abs(out["scores"] - whole["scores"]).max() < 1e-4
    for name in ("hidden", "run_max", "run_den", "run_num", "keys"):
        assert np.abs(state[name] - whole_state[name]).max() < 1e-4, name
    assert np.array_equal(state["past_items"], whole_state["past_items"])
    weights = np.exp(np.asarray(att) - state["run_max"][0]) / state["run_den"][0]
    assert np.abs(weights - whole["weights"][0]).max() < 1e-5


def test_step_graph_weights_live_in_full(exported, tmp_path):
    import onnx

    step = onnx.load(str(exported.step), load_external_data=False)
    external = [t for t in step.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(
        {e.key: e.value for e in t.external_data}["location"] == "full.onnx" for t in external
    )
    assert exported.step.stat().st_size < exported.full.stat().st_size / 5
    # A step graph of another model's weights cannot be linked to this full graph.
    other = export_onnx(RIB(RIBConfig(n_items=300, hidden_dim=64)), tmp_path / "other", check=False)
    (tmp_path / "full.onnx").write_bytes(exported.full.read_bytes())
    with pytest.raises(ExportError, match="not found"):
        link_to_full(other.step, tmp_path / "full.onnx", tmp_path / "step.onnx", max_inline_bytes=0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_top20_agreement(trained, exported, tmp_path, per_channel):
    import onnx

    model, split = trained
    full8 = quantize_int8(exported.full, tmp_path / "full8.onnx", per_channel=per_channel)
    graph = onnx.load(str(full8)).graph
    ops = [n.op_type for n in graph.node]  # one fused int8 output MatMul; the small layers stay fp32
    assert ops.count("DynamicQuantizeMatMul") == 1 and not {"MatMulInteger", "DynamicQuantizeLinear"} & set(
        ops
    )
    assert not {"out.weight", "embed.item_emb.weight"} & {t.name for t in graph.initializer}
    prefixes = real_prefixes(split.test, model.config.max_len, n=200)
    agreement = topk_agreement(exported.full, full8, prefixes, k=20)
    print(
        f"int8 (per_channel={per_channel}) vs fp32 top-20 agreement on {len(prefixes)} real prefixes: {agreement:.4f}"
    )
    assert agreement >= 0.95
    assert full8.stat().st_size < exported.full.stat().st_size
    # The int8 step graph (linked to the int8 full graph) steps to the int8 full graph's scores.
    step8 = quantize_int8(exported.step, tmp_path / "step8_inline.onnx", per_channel=per_channel)
    link_to_full(step8, full8, tmp_path / "step8.onnx")
    full, step = session_for(full8), session_for(tmp_path / "step8.onnx")
    for items, activities, dwell in prefixes[:5]:
        stepped = run_steps(step, model.config.hidden_dim, items, activities, dwell)[0][-1]
        advanced = run_steps(full, model.config.hidden_dim, items, activities, dwell)[0][-1]
        whole = full.run(
            None,
            feed_for(
                full,
                {
                    "items": items[None],
                    "activities": activities[None],
                    "dwell": dwell[None],
                    "lengths": np.array([len(items)]),
                },
            ),
        )[0][0]
        assert np.abs(stepped - advanced).max() < 1e-3 and np.abs(advanced - whole).max() < 0.05


def _dynamic_quantize_matmul(x: np.ndarray, weight_int8: np.ndarray) -> np.ndarray:
    """onnxruntime's DynamicQuantizeMatMul of ``x`` by ``weight_int8`` (unit scale, no bias), 1 thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "", ""], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], weight_int8.shape[1]])],
        [numpy_helper.from_array(weight_int8, "w"), numpy_helper.from_array(np.ones((), np.float32), "s")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_int8_output_gemm_is_exact_on_this_cpu(exported, tmp_path):
    """The output weights are 7-bit, so onnxruntime's u8 x s8 GEMM equals the exact integer product on every
    CPU; full-range weights saturate int16 pair sums on AVX2 without VNNI (scores off by ~5% of their range)."""
    import onnx
    from onnx import numpy_helper

    from model.export import OUTPUT_WEIGHT_QMAX

    full8 = quantize_int8(exported.full, tmp_path / "full8.onnx")
    inits = {t.name: t for t in onnx.load(str(full8)).graph.initializer}
    weight = numpy_helper.to_array(inits["out.weight_int8"])
    assert np.abs(weight.astype(np.int32)).max() == OUTPUT_WEIGHT_QMAX <= 63
    x = np.tanh(np.random.default_rng(0).standard_normal((4, weight.shape[0]))).astype(np.float32)
    x[:, 0], x[:, 1] = 1.0, -1.0  # the activation's full u8 range, as a tanh hidden state reaches
    got = _dynamic_quantize_matmul(x, weight)
    # The same product in exact arithmetic: x quantized as onnxruntime does (asymmetric u8 over [min, max] with 0).
    low, high = np.minimum(x.min(1, keepdims=True), 0), np.maximum(x.max(1, keepdims=True), 0)
    scale = (high - low) / 255.0
    zero = np.clip(np.rint(-low / scale), 0, 255)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255)

    def exact(w: np.ndarray) -> np.ndarray:
        return ((xq - zero) @ w.astype(np.float64)) * scale

    assert np.abs(got - exact(weight)).max() <= 1e-4 * np.abs(exact(weight)).max()
    # Full-range weights are what would break it on a non-VNNI CPU; on this one, say which kernel it has.
    full_range = np.clip(weight.astype(np.int32) * 2, -127, 127).astype(np.int8)
    wide_error = np.abs(_dynamic_quantize_matmul(x, full_range) - exact(full_range)).max()
    print(
        f"full-range int8 weights on this CPU: max error {wide_error:.4g} (0 with VNNI / ARM dot-product kernels)"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_attention": False},
        {"use_activity": False, "use_dwell": False},
        {"attention_micro": True},
        {"loss": "sampled"},
        {"copy": True},
        {"copy": False},
        {"copy": True, "use_attention": False, "attention_micro": True},
    ],
)
def test_parity_other_exportable_configs(overrides, tmp_path):
    torch.manual_seed(0)
    try:
        config = RIBConfig(n_items=40, hidden_dim=16, item_dim=8, **overrides)
    except TypeError:
        pytest.skip(f"this RIBConfig has no {overrides}")
    model = RIB(config)
    if getattr(model, "copy_gate", None) is not None:
        torch.nn.init.constant_(model.copy_gate.bias, 3.0)  # a copy term that moves the ranking
    result = export_onnx(model, tmp_path)  # raises ExportError on a parity failure
    assert result.full_max_abs_diff < 1e-4 and result.step_max_abs_diff < 1e-4
    # The int8 surgery handles every exportable graph; int8 steps track the int8 full graph exactly.
    int8 = tmp_path / "int8"
    full8 = quantize_int8(result.full, int8 / "full.onnx")
    link_to_full(quantize_int8(result.step, tmp_path / "step8_inline.onnx"), full8, int8 / "step.onnx")
    seq = tuple(np.asarray(x[0]) for x in _example_full_numpy(model.config))
    reference = run_steps(session_for(result.full), config.hidden_dim, *seq)[0]
    stepped = run_steps(session_for(int8 / "step.onnx"), config.hidden_dim, *seq)[0]
    advanced = run_steps(session_for(full8), config.hidden_dim, *seq, chunks=(2,))[0]
    assert np.abs(stepped[1:] - advanced).max() < 1e-3
    assert np.abs(advanced - reference[1:]).max() < 0.05


@pytest.mark.parametrize("freeze_items", [False, True])
def test_a_tied_output_is_folded_into_one_linear_and_exported(freeze_items, tmp_path):
    torch.manual_seed(0)
    config = RIBConfig(n_items=40, hidden_dim=16, item_dim=8, tie_output=True, freeze_items=freeze_items)
    model = RIB(config).eval()
    with torch.no_grad():
        model.out.scores.bias.normal_()  # a bias that matters
    folded = folded_for_export(model)
    assert not folded.config.tie_output and not folded.config.freeze_items
    assert isinstance(folded.out, torch.nn.Linear) and folded.out.weight.shape == (41, 16)
    batch = tuple(torch.from_numpy(x) for x in _example_full_numpy(config))
    mask = torch.ones_like(batch[0], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(folded(*batch, mask), model(*batch, mask), atol=1e-5, rtol=1e-5)
    result = export_onnx(model, tmp_path)  # the parity check runs against the folded model
    assert result.full_max_abs_diff < 1e-4 and result.step_max_abs_diff < 1e-4
    untied = RIB(RIBConfig(n_items=40, hidden_dim=16, item_dim=8))
    assert folded_for_export(untied) is untied
    with pytest.raises(ExportError, match="cosine"):
        folded_for_export(RIB(RIBConfig(n_items=10, item_dim=8, tie_output=True, cosine_scale=8.0)))


def _example_full_numpy(config):
    g = torch.Generator().manual_seed(11)
    return tuple(
        torch.randint(low, high, (1, 6), generator=g).numpy()
        for low, high in ((1, config.n_items + 1), (0, config.n_activities), (0, config.n_dwell))
    )


def test_refuses_configs_it_cannot_export(tmp_path):
    with pytest.raises(ExportError, match="paper"):
        check_exportable(RIBConfig(n_items=10, loss="paper"))
    with pytest.raises(ExportError):
        FullSession(RIB(RIBConfig(n_items=10, loss="paper")))


def test_refuses_a_model_whose_forward_the_graphs_do_not_follow(tmp_path, monkeypatch):
    model = RIB(RIBConfig(n_items=20, hidden_dim=8, item_dim=8))
    original = RIB.forward
    monkeypatch.setattr(RIB, "forward", lambda self, *a: original(self, *a) + 1.0)
    with pytest.raises(ExportError, match="parity"):
        export_onnx(model, tmp_path)


def test_refuses_unknown_config_fields_off_default():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class FutureConfig(RIBConfig):
        new_trick: bool = False

    check_exportable(FutureConfig(n_items=10))
    with pytest.raises(ExportError, match="new_trick"):
        check_exportable(FutureConfig(n_items=10, new_trick=True))


def test_build_package_refuses_mismatched_vocab(trained, tmp_path):
    from edge_client.package import generate_keypair

    model, split = trained
    private, _ = generate_keypair(tmp_path / "keys")
    other = RIB(RIBConfig(n_items=model.config.n_items + 1))
    with pytest.raises(ExportError, match="items"):
        build_package(other, split.vocab, tmp_path / "pkg", private, 1, popularity_from(split.train))


def test_output_matmul_floor_benchmark(tmp_path):
    """experiments/output_matmul.py: every precision runs, fp32 agrees with itself, int8 tracks fp32's top 20."""
    import json

    from experiments import output_matmul as module

    result = module.main(
        ["--items", "2000", "--hidden", "32", "--calls", "3", "--runs", "1", "--out", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "output_matmul.json").read_text())
    assert set(saved["variants"]) == set(module.VARIANTS) == set(result["variants"])
    rows = saved["variants"]
    assert rows["fp32"]["top20_agreement"] == 1.0 and rows["fp32"]["size_ratio"] == 1.0
    assert rows["int8 per-tensor"]["top20_agreement"] >= 0.8
    assert 0.2 < rows["int8 per-tensor"]["size_ratio"] < 0.35  # int8 weights: about a quarter of fp32
    assert all(r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in rows.values())
    assert "| int4 (int8 compute) |" in (tmp_path / "output_matmul.md").read_text()
