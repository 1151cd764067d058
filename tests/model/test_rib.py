"""RIB network: shapes, masking, causal all-prefix forward, and DP-SGD (Opacus) compatibility."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.rib import DATA_TYPES, RIB, RIBConfig, data_type_flags

N_ITEMS, N_ACT, N_DWELL = 30, 5, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int = 0, **overrides: object) -> RIB:
    torch.manual_seed(seed)
    settings = dict(
        n_items=N_ITEMS,
        n_activities=N_ACT,
        n_dwell=N_DWELL,
        item_dim=8,
        activity_dim=3,
        dwell_dim=2,
        hidden_dim=12,
        dropout=0.0,
        max_len=10,
    )
    settings.update(overrides)
    return RIB(RIBConfig(**settings)).eval()


def random_inputs(batch: int, length: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (batch, length), generator=g)
    activities = torch.randint(0, N_ACT, (batch, length), generator=g)
    dwell = torch.randint(0, N_DWELL, (batch, length), generator=g)
    return items, activities, dwell


ALL_VARIANTS = [
    {**data_type_flags(dt), "use_attention": att, "loss": loss}
    for dt in DATA_TYPES
    for att in (True, False)
    for loss in ("softmax", "paper")
]


@pytest.mark.parametrize(
    "variant",
    ALL_VARIANTS,
    ids=lambda v: f"{v['use_activity']}-{v['use_dwell']}-{v['use_attention']}-{v['loss']}",
)
def test_shapes(variant):
    model = make_model(**variant)
    items, activities, dwell = random_inputs(4, 7)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5])[:, None]
    assert model(items, activities, dwell, mask).shape == (4, N_ITEMS + 1)
    assert model.forward_all(items, activities, dwell, mask).shape == (4, 7, N_ITEMS + 1)
    if variant["use_attention"]:
        assert model.attention_weights(items, activities, dwell, mask).shape == (4, 7)
    expected_input = 8 + 3 * variant["use_activity"] + 2 * variant["use_dwell"]
    assert model.gru.input_size == expected_input == model.config.input_dim


def test_config_validation_and_round_trip():
    config = RIBConfig(n_items=5, loss="paper", use_dwell=False)
    assert RIBConfig.from_dict(config.to_dict()) == config
    assert config.data_type == "SKU+Activity"
    with pytest.raises(ValueError):
        RIBConfig(n_items=5, loss="bpr")
    with pytest.raises(ValueError):
        data_type_flags("SKU+Everything")
    with pytest.raises(ValueError):
        RIBConfig.from_dict({"n_items": 5, "bogus": 1})


def test_disabled_fields_are_ignored():
    """SKU-only: changing activities/dwell must not change the output."""
    model = make_model(use_activity=False, use_dwell=False)
    items, activities, dwell = random_inputs(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    a = model(items, activities, dwell, mask)
    b = model(items, (activities + 1) % N_ACT, (dwell + 2) % N_DWELL, mask)
    torch.testing.assert_close(a, b)
    assert model.activity_emb is None and model.dwell_emb is None


@pytest.mark.parametrize("use_attention", [True, False])
def test_padding_never_matters(use_attention):
    """The same sequence with 0..5 padding steps after it, or before it, gives the same scores."""
    model = make_model(use_attention=use_attention)
    items, activities, dwell = random_inputs(1, 4)
    reference = model(items, activities, dwell, torch.ones(1, 4, dtype=torch.bool))
    for pad in range(0, 6):
        for before in (False, True):
            garbage = random_inputs(1, pad, seed=pad + 10)  # padding content must not matter either
            parts = [garbage, (items, activities, dwell)] if before else [(items, activities, dwell), garbage]
            padded = [torch.cat([p[i] for p in parts], dim=1) for i in range(3)]
            mask = torch.cat(
                [torch.zeros(1, pad, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)][
                    :: 1 if before else -1
                ],
                dim=1,
            )
            out = model(*padded, mask)
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
            if use_attention:
                weights = model.attention_weights(*padded, mask)
                assert torch.all(weights[~mask] == 0), "padding received attention"
                torch.testing.assert_close(weights.sum(1), torch.ones(1))
                torch.testing.assert_close(
                    weights[mask],
                    model.attention_weights(items, activities, dwell, torch.ones(1, 4, dtype=torch.bool))[0],
                )


def test_attention_sums_to_one_over_valid_steps_in_a_batch():
    model = make_model()
    items, activities, dwell = random_inputs(5, 8)
    lengths = torch.tensor([8, 1, 4, 6, 2])
    mask = torch.arange(8)[None, :] < lengths[:, None]
    weights = model.attention_weights(items, activities, dwell, mask)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))
    assert torch.all(weights[~mask] == 0)
    assert torch.all(weights[mask] > 0)
    _, causal = model.pooled_all(items, activities, dwell, mask)
    # Causal weights of row t: over valid steps <= t only, summing to 1.
    for b in range(5):
        for t in range(int(lengths[b])):
            torch.testing.assert_close(causal[b, t].sum(), torch.tensor(1.0))
            assert torch.all(causal[b, t, t + 1 :] == 0)


@pytest.mark.parametrize(
    "variant",
    [
        {"use_attention": True},
        {"use_attention": False},
        {"loss": "paper"},
        {"last_state": True},
        {"last_state": True, "tie_output": True, "cosine_scale": 12.0},
    ],
    ids=["attention", "last-hidden", "paper", "last-state", "last-state-cosine"],
)
def test_forward_all_equals_truncated_forward(variant):
    """Position t of the all-prefix forward == forward on the prefix that ends at t."""
    model = make_model(**variant)
    items, activities, dwell = random_inputs(3, 9)
    lengths = torch.tensor([9, 5, 2])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    every = model.forward_all(items, activities, dwell, mask)
    for b in range(3):
        for t in range(int(lengths[b])):
            prefix = [x[b : b + 1, : t + 1] for x in (items, activities, dwell)]
            alone = model(*prefix, torch.ones(1, t + 1, dtype=torch.bool))
            torch.testing.assert_close(every[b, t], alone[0], rtol=1e-5, atol=1e-5)


def test_forward_all_with_leading_padding_matches_left_aligned():
    model = make_model()
    items, activities, dwell = random_inputs(1, 5)
    left = model.forward_all(items, activities, dwell, torch.ones(1, 5, dtype=torch.bool))
    pad = 3
    shifted = [torch.cat([torch.zeros(1, pad, dtype=x.dtype), x], dim=1) for x in (items, activities, dwell)]
    mask = torch.arange(8)[None, :] >= pad
    right = model.forward_all(*shifted, mask)
    torch.testing.assert_close(right[0, pad:], left[0], rtol=1e-5, atol=1e-5)


def test_init_item_embeddings_keeps_padding_zero():
    model = make_model(loss="paper")
    vectors = torch.randn(N_ITEMS + 1, 8)
    present = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    present[5] = False
    before = model.item_emb.weight[5].clone()
    model.init_item_embeddings(vectors, present)
    torch.testing.assert_close(model.item_emb.weight[1], vectors[1])
    torch.testing.assert_close(model.item_emb.weight[5], before)
    assert torch.all(model.item_emb.weight[0] == 0)
    torch.testing.assert_close(model.target_emb.weight[1], vectors[1])
    assert not model.target_emb.weight.requires_grad
    with pytest.raises(ValueError):
        model.init_item_embeddings(torch.randn(N_ITEMS, 8))


def test_losses_are_finite_and_trainable():
    for loss in ("softmax", "paper"):
        model = make_model(loss=loss).train()
        items, activities, dwell = random_inputs(4, 6)
        mask = torch.ones(4, 6, dtype=torch.bool)
        positions = mask.clone()
        positions[:, -1] = False
        value = model.example_loss(items, activities, dwell, mask, positions, items[:, 1:].reshape(-1))
        assert torch.isfinite(value)
        value.backward()
        assert model.item_emb.weight.grad is not None


def _per_sample_reference(model: nn.Module, inputs, last, targets) -> dict[str, torch.Tensor]:
    """Per-sample gradients the slow way: one backward per example."""
    grads: dict[str, list[torch.Tensor]] = {}
    for b in range(len(targets)):
        model.zero_grad()
        at_last = torch.zeros_like(inputs[3][b : b + 1])
        at_last[0, last[b]] = True
        model.example_loss(*(x[b : b + 1] for x in inputs), at_last, targets[b : b + 1]).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads.setdefault(name, []).append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus hooks on index-input embeddings
@pytest.mark.parametrize(
    "overrides",
    [
        {"loss": "softmax"},
        {"loss": "paper"},
        {"loss": "softmax", "tie_output": True},
        {"loss": "softmax", "last_state": True},
    ],
    ids=["softmax", "paper", "tied", "last-state"],
)
def test_opacus_accepts_model_and_per_sample_grads_are_right(overrides):
    """After swapping nn.GRU for DPGRU the model validates, and Opacus' per-sample grads are exact (with
    tie_output too: Opacus sums the two modules' per-sample gradients of the shared item table)."""
    from opacus import GradSampleModule
    from opacus.layers import DPGRU
    from opacus.validators import ModuleValidator

    model = make_model(**overrides)
    assert isinstance(model.out, nn.Module)  # scoring goes through a registered submodule
    dp_model = ModuleValidator.fix(copy.deepcopy(model))
    assert isinstance(dp_model.gru, DPGRU)
    dp_model.train()  # Opacus validates training-mode models (dropout is 0 here, so outputs are unchanged)
    assert ModuleValidator.validate(dp_model, strict=False) == []
    items, activities, dwell = random_inputs(3, 5)
    lengths = torch.tensor([5, 3, 2])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    items = items.masked_fill(~mask, 0)  # real padding, as training batches have
    inputs = (items, activities, dwell, mask)
    torch.testing.assert_close(dp_model(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)

    targets = torch.tensor([3, 7, 11])
    last = lengths - 1
    reference = _per_sample_reference(dp_model, inputs, last, targets)
    gsm = GradSampleModule(dp_model)
    gsm.zero_grad()
    at_last = torch.zeros_like(mask)
    at_last[torch.arange(3), last] = True
    # Mean loss, as GradSampleModule(loss_reduction="mean") expects: grad_sample = each example's own gradient.
    # Padded steps never reach the loss, so Opacus' embedding sampler (which ignores padding_idx) still
    # gives the padding row a zero per-sample gradient.
    gsm._module.example_loss(*inputs, at_last, targets).backward()
    checked = 0
    for name, p in dp_model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample is not None, f"no per-sample gradient for {name}"
        torch.testing.assert_close(
            p.grad_sample, reference[name], rtol=1e-3, atol=1e-5, msg=f"per-sample grad of {name}"
        )
        checked += 1
    assert checked >= 8


# ---- sampled softmax -----------------------------------------------------------------------------------
def test_sampled_softmax_trains_and_full_scores_rank_the_planted_item_first():
    """Training on sampled candidates (shared negatives + in-batch targets, logQ-corrected) learns a planted
    next-item rule that the full-catalogue scores (the same nn.Linear, all rows) then rank first."""
    from model.rib import SampledOutput

    n_items = 300
    torch.manual_seed(0)
    model = RIB(
        RIBConfig(
            n_items=n_items,
            n_activities=N_ACT,
            n_dwell=N_DWELL,
            item_dim=16,
            hidden_dim=32,
            dropout=0.0,
            max_len=6,
            loss="sampled",
            use_activity=False,
            use_dwell=False,
        )
    )
    assert isinstance(model.out, SampledOutput) and isinstance(model.out, nn.Linear)
    successor = lambda x: x % n_items + 1  # noqa: E731  planted rule: i -> i + 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    log_q = torch.full((n_items + 1,), float(torch.log(torch.tensor(64.0 / n_items))))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(250):
        start = torch.randint(1, n_items + 1, (64, 1), generator=g)
        items = (start + torch.arange(4)[None, :] - 1) % n_items + 1
        zeros = torch.zeros_like(items)
        mask = torch.ones_like(items, dtype=torch.bool)
        pooled, copy = model.outputs_all(items, zeros, zeros, mask).at(mask)
        negatives = torch.randint(1, n_items + 1, (64,), generator=g)
        loss = model.loss_at(pooled, successor(items).reshape(-1), copy, negatives=negatives, log_q=log_q)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    model.eval()
    items = torch.arange(1, n_items + 1)[:, None]
    zeros = torch.zeros_like(items)
    scores = model(items, zeros, zeros, torch.ones_like(items, dtype=torch.bool))
    assert scores.shape == (n_items, n_items + 1)
    top = scores[:, 1:].argmax(-1) + 1
    assert (top == successor(items[:, 0])).float().mean() > 0.9
    # Sampled logits are exactly the full logits' columns.
    pooled = torch.randn(5, 32)
    candidates = torch.tensor([1, 7, 300])
    torch.testing.assert_close(model.out.sampled(pooled, candidates), model.out(pooled)[:, candidates])


# ---- copy term ------------------------------------------------------------------------------------------
COPY_VARIANTS = [
    {"copy": True, "use_attention": att, **data_type_flags(dt)}
    for att in (True, False)
    for dt in ("SKU", "SKU+Micro")
]


@pytest.mark.parametrize(
    "variant", COPY_VARIANTS, ids=lambda v: f"att{v['use_attention']}-{v['use_activity']}"
)
def test_copy_term_padding_and_causality(variant):
    model = make_model(**variant, attention_micro=True)
    items, activities, dwell = random_inputs(3, 6)
    lengths = torch.tensor([6, 4, 2])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    full = model(items, activities, dwell, mask)
    # Padding content never matters.
    noisy = model(items.masked_fill(~mask, 5), activities.masked_fill(~mask, 1), dwell, mask)
    torch.testing.assert_close(full, noisy)
    # forward_all at t == forward on the prefix ending at t; leading padding gives the same outputs.
    every = model.forward_all(items, activities, dwell, mask)
    for b, n in enumerate(lengths.tolist()):
        for t in range(n):
            one = model(
                items[b : b + 1, : t + 1],
                activities[b : b + 1, : t + 1],
                dwell[b : b + 1, : t + 1],
                torch.ones(1, t + 1, dtype=torch.bool),
            )
            torch.testing.assert_close(every[b, t], one[0], rtol=1e-4, atol=1e-5)
    shifted = model(
        torch.roll(items, 2, 1), torch.roll(activities, 2, 1), torch.roll(dwell, 2, 1), torch.roll(mask, 2, 1)
    )
    torch.testing.assert_close(shifted[1:], full[1:], rtol=1e-4, atol=1e-5)
    # The copy term only raises the items of the session: others keep the plain output-layer score.
    plain = model._project(model._pool_last(items, activities, dwell, mask)[0])
    bonus = full - plain
    assert (bonus >= -1e-6).all()
    for b, n in enumerate(lengths.tolist()):
        outside = torch.ones(N_ITEMS + 1, dtype=torch.bool)
        outside[items[b, :n]] = False
        assert torch.allclose(bonus[b, outside], torch.zeros(()), atol=1e-6)
    if variant["use_attention"]:
        weights = model.attention_weights(items, activities, dwell, mask)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
        assert (weights[~mask] == 0).all()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_grads_with_copy_term_and_micro_attention():
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = make_model(copy=True, attention_micro=True, micro_dropout=0.0)
    dp_model = ModuleValidator.fix(copy.deepcopy(model)).train()
    assert ModuleValidator.validate(dp_model, strict=False) == []
    items, activities, dwell = random_inputs(3, 5)
    lengths = torch.tensor([5, 3, 2])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    items = items.masked_fill(~mask, 0)
    targets = torch.tensor([items[0, 1].item(), 7, items[2, 0].item()])  # two repeats: the copy term matters
    last = lengths - 1
    at_last = torch.zeros_like(mask)
    at_last[torch.arange(3), last] = True

    def loss_of(module, rows):
        out = module.outputs_all(items[rows], activities[rows], dwell[rows], mask[rows])
        pooled, copy_term = out.at(at_last[rows])
        return dp_model.loss_at(pooled, targets[rows], copy_term)

    reference: dict[str, list[torch.Tensor]] = {}
    for b in range(3):
        dp_model.zero_grad()
        loss_of(dp_model, slice(b, b + 1)).backward()
        for name, p in dp_model.named_parameters():
            reference.setdefault(name, []).append(p.grad.detach().clone())
    gsm = GradSampleModule(dp_model)
    gsm.zero_grad()
    loss_of(gsm._module, slice(0, 3)).backward()
    names = []
    for name, p in dp_model.named_parameters():
        torch.testing.assert_close(
            p.grad_sample,
            torch.stack(reference[name]),
            rtol=1e-3,
            atol=1e-5,
            msg=f"per-sample grad of {name}",
        )
        names.append(name)
    assert {"copy_query.weight", "copy_key.weight", "copy_gate.weight", "att_micro.weight"} <= set(names)


# ---- tied output ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["softmax", "sampled"])
def test_tied_output_scores_with_the_item_embeddings(loss):
    """tie_output: one Parameter serves as input embedding and output rows; scores = E (W_b pooled) + b."""
    model = make_model(loss=loss, tie_output=True)
    assert model.out.scores.weight is model.item_emb.weight
    assert torch.all(model.item_emb.weight[0] == 0)  # padding row stays zero
    assert (
        0.5 < float(model.item_emb.weight[1:].detach().std()) * 8**0.5 < 2.0
    )  # entries ~ N(0, 1/item_dim), not N(0, 1)
    n_params = sum(p.numel() for p in model.parameters())
    untied = sum(p.numel() for p in make_model(loss=loss).parameters())
    assert n_params < untied  # the item table is counted once
    items, activities, dwell = random_inputs(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    pooled = model.outputs_all(items, activities, dwell, mask).pooled[:, -1]
    expected = model.out.proj(pooled) @ model.item_emb.weight.T + model.out.scores.bias
    torch.testing.assert_close(model.logits(pooled), expected)
    candidates = torch.tensor([2, 5, 9])
    torch.testing.assert_close(model.out.sampled(pooled, candidates), expected[:, candidates])
    # A gradient step on the output side moves the input embedding too (it is the same tensor).
    model.train()
    positions = torch.zeros_like(mask)
    positions[:, -1] = True
    model.example_loss(items, activities, dwell, mask, positions, torch.tensor([4, 4, 4])).backward()
    assert model.item_emb.weight.grad[4].abs().sum() > 0


def test_tied_output_refuses_the_paper_loss():
    with pytest.raises(ValueError, match="tie_output"):
        RIBConfig(n_items=5, loss="paper", tie_output=True)


@pytest.mark.parametrize("loss", ["softmax", "sampled"])
def test_cosine_scale_scores_by_scaled_cosine_and_ignores_item_norm(loss):
    """cosine_scale s: scores = s * cos(W_b pooled, E_i) + b_i, so rescaling an item's row leaves its score alone."""
    model = make_model(loss=loss, tie_output=True, cosine_scale=16.0)
    items, activities, dwell = random_inputs(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    pooled = model.outputs_all(items, activities, dwell, mask).pooled[:, -1]
    query = model.out.proj(pooled)
    table = model.item_emb.weight
    cosine = (query @ table.T) / (query.norm(dim=-1, keepdim=True) * table.norm(dim=-1).clamp(min=1e-12))
    expected = 16.0 * cosine + model.out.scores.bias
    scores = model.logits(pooled)
    torch.testing.assert_close(scores, expected)
    assert float((scores - model.out.scores.bias).detach().abs().max()) <= 16.0 + 1e-4
    candidates = torch.tensor([2, 5, 9])
    torch.testing.assert_close(model.out.sampled(pooled, candidates), expected[:, candidates])
    with torch.no_grad():
        model.item_emb.weight[5] *= 10.0
    torch.testing.assert_close(model.logits(pooled)[:, 5], scores[:, 5])
    model.train()
    positions = torch.zeros_like(mask)
    positions[:, -1] = True
    model.example_loss(items, activities, dwell, mask, positions, torch.tensor([4, 4, 4])).backward()
    assert model.item_emb.weight.grad[4].abs().sum() > 0 and model.out.proj.weight.grad.abs().sum() > 0


def test_cosine_scale_needs_tied_output():
    with pytest.raises(ValueError, match="tie_output"):
        RIBConfig(n_items=5, cosine_scale=16.0)
    with pytest.raises(ValueError, match="cosine_scale"):
        RIBConfig(n_items=5, tie_output=True, cosine_scale=-1.0)


def test_last_state_puts_the_last_hidden_state_beside_the_attention_output():
    """last_state: the output reads [attention-pooled; h_last]; changing only the last step moves the second half."""
    model = make_model(last_state=True)
    assert (
        model.config.pooled_dim == 24 and model.out.in_features == 24 and model.copy_query.in_features == 24
    )
    items, activities, dwell = random_inputs(2, 6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    pooled = model.outputs_all(items, activities, dwell, mask).pooled
    hidden = model._hidden(items, activities, dwell)
    torch.testing.assert_close(pooled[..., 12:], hidden)
    plain = make_model(last_state=False)
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("out.", "copy_"))}, strict=False
    )
    torch.testing.assert_close(pooled[..., :12], plain.outputs_all(items, activities, dwell, mask).pooled)
    with pytest.raises(ValueError, match="use_attention"):
        RIBConfig(n_items=5, use_attention=False, last_state=True)
