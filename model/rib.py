"""RIB (Zhou et al., WSDM 2018, Section 4): embeddings -> GRU -> attention pooling -> item scores.

One readable file, nanoGPT style: a config dataclass and one ``nn.Module``.

Layers (paper Figure 7):
- Input / embedding (Eq. 3): e_t = concat(W_P p_t, W_A a_t, W_D d_t). Only the fields switched on in the
  config are embedded, which gives the paper's data types SKU, SKU+Activity, SKU+Dwell, SKU+Micro.
- RNN (Eq. 6): a single-layer GRU over e_1..e_T.
- Attention (Eq. 7): M_t = tanh(W_m h_t + b_m), score_t = w_a . M_t + b_a, att = softmax(score) over the
  valid steps only (padding never receives weight), output = sum_t att_t h_t. RIB-Attention (the paper's
  ablation, ``use_attention=False``) uses the last valid hidden state instead.
- Output: a *module* maps the pooled vector to item space. Everything with trainable weights is an
  ``nn.Module`` called as a module (no functional weight tying such as ``h @ emb.weight.T``), because
  Opacus computes per-sample gradients from module hooks and silently gets tied/functional weights wrong;
  the same class is trained under DP-SGD elsewhere (``ModuleValidator.fix`` swaps ``nn.GRU`` for DPGRU).

Every prefix at once: the GRU is causal, and ``forward_all`` uses a lower-triangular attention mask, so
position t of one forward pass over a session is exactly the model's output for the prefix ending at t
(O(L^2) for the L x L attention, trivial for L <= 50). Training takes the loss at the positions whose next
tuple starts a new visit, which are precisely the dataset's examples.

Padding: the model accepts any mask whose valid steps are contiguous (padding after, as
``PrefixBatch.padded`` gives, or before); rows are shifted to start at step 0 internally, so the GRU never
sees padding before a valid step and the output does not depend on how much padding surrounds a sequence.

The two losses (``RIBConfig.loss``):
- ``"softmax"`` (default, and better in our measurements): full softmax cross-entropy over the catalogue,
  ``nn.Linear(hidden, n_items + 1)``.
- ``"paper"``: our faithful reading of Section 4.4, ``L = sum_i -t_i log(o_i)`` where "t is the normalized
  target embedding and o is the normalized output embedding". Both vectors live in item-embedding space:
  the pooled output is projected to ``item_dim`` (``nn.Linear``) and normalised with a softmax over the
  embedding dimensions, ``o = softmax(W_o output)``; the target is the target item's embedding normalised
  the same way, ``t = softmax(E[target])``. The target table is a frozen copy of the initial item
  embeddings (Word2vec, as the paper initialises W_P): if it were trainable the loss would collapse by
  mapping every item to one peaked distribution. Items are ranked by ``-KL(t_j || o)``, i.e. the loss
  they would incur as the target minus its context-free part H(t_j) (same gradient, so training and
  ranking agree; raw cross-entropy would rank items with peaked t_j first whatever the context).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("softmax", "paper")

# The paper's four data types (Section 5.1) -> which micro-behavior fields enter the embedding.
DATA_TYPES: dict[str, tuple[bool, bool]] = {
    "SKU": (False, False),
    "SKU+Activity": (True, False),
    "SKU+Dwell": (False, True),
    "SKU+Micro": (True, True),
}


def data_type_flags(data_type: str) -> dict[str, bool]:
    """``use_activity`` / ``use_dwell`` for a paper data type name (SKU, SKU+Activity, SKU+Dwell, SKU+Micro)."""
    try:
        use_activity, use_dwell = DATA_TYPES[data_type]
    except KeyError:
        raise ValueError(f"unknown data type {data_type!r}; known: {list(DATA_TYPES)}") from None
    return {"use_activity": use_activity, "use_dwell": use_dwell}


@dataclass(frozen=True)
class RIBConfig:
    """Sizes and switches of one RIB model."""

    n_items: int  # real items 1..n_items; index 0 is padding
    n_activities: int = 10  # ActivityVocabulary length
    n_dwell: int = 6  # DwellBuckets.vocab_size (known buckets + unknown)
    item_dim: int = 64  # must equal the Word2vec vector size when initialising from Word2vec
    activity_dim: int = 16
    dwell_dim: int = 8
    hidden_dim: int = 100
    use_activity: bool = True
    use_dwell: bool = True
    use_attention: bool = True  # False: RIB-Attention (last hidden state)
    dropout: float = 0.1
    max_len: int = 50  # tuples of context the model looks at (the last max_len of a prefix)
    loss: str = "softmax"  # "softmax" | "paper"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.n_items < 1 or self.n_activities < 1 or self.n_dwell < 1 or self.max_len < 1:
            raise ValueError(f"bad sizes in {self}")

    @property
    def data_type(self) -> str:
        """The paper's name for the enabled fields."""
        for name, flags in DATA_TYPES.items():
            if flags == (self.use_activity, self.use_dwell):
                return name
        raise AssertionError("unreachable")

    @property
    def input_dim(self) -> int:
        """Width of the concatenated embedding e_t."""
        return self.item_dim + self.activity_dim * self.use_activity + self.dwell_dim * self.use_dwell

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (what checkpoints store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RIBConfig:
        """Inverse of to_dict; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RIBConfig fields {sorted(unknown)}")
        return cls(**data)


class RIB(nn.Module):
    """Embeddings -> GRU -> (causal) attention pooling -> item logits."""

    def __init__(self, config: RIBConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.item_emb = nn.Embedding(c.n_items + 1, c.item_dim, padding_idx=0)
        self.activity_emb = nn.Embedding(c.n_activities, c.activity_dim) if c.use_activity else None
        self.dwell_emb = nn.Embedding(c.n_dwell, c.dwell_dim) if c.use_dwell else None
        self.input_dropout = nn.Dropout(c.dropout)
        self.gru = nn.GRU(c.input_dim, c.hidden_dim, batch_first=True)
        if c.use_attention:
            self.att_proj = nn.Linear(c.hidden_dim, c.hidden_dim)  # W_m, b_m
            self.att_score = nn.Linear(c.hidden_dim, 1)  # w_a, b_a
        self.output_dropout = nn.Dropout(c.dropout)
        if c.loss == "softmax":
            self.out = nn.Linear(c.hidden_dim, c.n_items + 1)
        else:
            self.out = nn.Linear(c.hidden_dim, c.item_dim)  # output embedding, before normalisation
            self.target_emb = nn.Embedding(c.n_items + 1, c.item_dim)  # frozen target table (see docstring)
            self.target_emb.weight.requires_grad_(False)
            self.target_emb.weight.data.copy_(self.item_emb.weight.data)

    # ---- initialisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_item_embeddings(self, vectors: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Copy pretrained (Word2vec) item vectors into W_P (and the paper loss's target table).

        ``vectors`` is (n_items + 1, item_dim); rows where ``present`` is False keep their random init.
        """
        if vectors.shape != self.item_emb.weight.shape:
            raise ValueError(f"item vectors {tuple(vectors.shape)} != embedding {tuple(self.item_emb.weight.shape)}")
        rows = torch.ones(len(vectors), dtype=torch.bool) if present is None else present.bool().clone()
        rows[0] = False  # padding stays zero
        vectors = vectors.to(self.item_emb.weight)
        self.item_emb.weight[rows] = vectors[rows]
        if self.config.loss == "paper":
            self.target_emb.weight[rows] = vectors[rows]


    # ---- the network -------------------------------------------------------------------------------
    def _left_align(self, mask: torch.Tensor, *fields: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Shift every row so its valid steps start at 0; returns (aligned mask, aligned fields, shift)."""
        mask = mask.bool()
        length = mask.sum(1)
        shift = torch.where(length > 0, mask.int().argmax(1), torch.zeros_like(length))
        if not bool(shift.any()):  # the usual case (PrefixBatch.padded): nothing to move
            return mask, list(fields), shift
        steps = torch.arange(mask.shape[1], device=mask.device)
        index = (steps[None, :] + shift[:, None]).clamp(max=mask.shape[1] - 1)
        aligned = steps[None, :] < length[:, None]
        moved = [torch.where(aligned, f.gather(1, index), torch.zeros_like(f)) for f in fields]
        return aligned, moved, shift

    def _hidden(self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor) -> torch.Tensor:
        """GRU hidden states h_1..h_L of left-aligned inputs, (B, L, hidden)."""
        parts = [self.item_emb(items)]
        if self.activity_emb is not None:
            parts.append(self.activity_emb(activities))
        if self.dwell_emb is not None:
            parts.append(self.dwell_emb(dwell))
        embedded = self.input_dropout(torch.cat(parts, dim=-1))
        # Padding is always after the valid steps here, so the causal GRU's valid outputs never see it.
        hidden, _ = self.gru(embedded)
        return hidden

    def _attention_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """score_t = w_a . tanh(W_m h_t + b_m) + b_a, (B, L)."""
        return self.att_score(torch.tanh(self.att_proj(hidden))).squeeze(-1)

    def _pool_all(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled output for every prefix end t (attention over valid steps <= t), and the weights."""
        if not self.config.use_attention:
            return hidden, None
        steps = hidden.shape[1]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=hidden.device).tril()
        allowed = causal[None, :, :] & mask[:, None, :]  # (B, t, j): j <= t and j is a real step
        # A padding row t has no allowed j only if the whole sequence is empty; let it see step 0 so the
        # softmax stays finite (its output is never used).
        allowed[:, :, 0] |= ~allowed.any(-1)
        scores = self._attention_scores(hidden)[:, None, :].expand(-1, steps, -1)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return weights @ hidden, weights

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The output module applied to pooled vectors."""
        return self.out(self.output_dropout(pooled))

    def _logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Item scores from pooled vectors (..., hidden) -> (..., n_items + 1)."""
        projected = self._project(pooled)
        if self.config.loss == "softmax":
            return projected
        # Paper loss: score_j = -KL(t_j || o) = sum_i t_ji log o_i + H(t_j), t_j = softmax(E_j). For a fixed
        # target, KL and the cross-entropy differ by H(t_j) only, so the training gradient is the same; but
        # ranking by raw cross-entropy would favour items with peaked t_j whatever the context. The target
        # table is frozen (no gradient), so these products carry no trainable weight.
        log_targets = torch.log_softmax(self.target_emb.weight, dim=-1)
        targets = log_targets.exp()
        entropy = -(targets * log_targets).sum(-1)
        return torch.log_softmax(projected, dim=-1) @ targets.T + entropy

    def pooled_all(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled (B, L, hidden) output for every prefix end, aligned with the input positions, plus weights."""
        aligned, (items, activities, dwell), shift = self._left_align(mask, items, activities, dwell)
        hidden = self._hidden(items, activities, dwell)
        pooled, weights = self._pool_all(hidden, aligned)
        if bool(shift.any()):  # put every row back where the caller had it
            steps = torch.arange(mask.shape[1], device=mask.device)
            back = (steps[None, :] - shift[:, None]).clamp(min=0)
            pooled = pooled.gather(1, back[:, :, None].expand(-1, -1, pooled.shape[-1]))
            if weights is not None:
                weights = weights.gather(1, back[:, :, None].expand(-1, -1, weights.shape[-1]))
                weights = torch.stack([w.roll(int(s), dims=-1) for w, s in zip(weights, shift, strict=True)])
        return pooled, weights

    def forward_all(self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, n_items + 1) logits: position t scores the next item after the prefix ending at t."""
        pooled, _ = self.pooled_all(items, activities, dwell, mask)
        return self._logits(pooled)

    def loss_at(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean training loss of pooled vectors (N, hidden) against target items (N,)."""
        projected = self._project(pooled)
        if self.config.loss == "softmax":
            return F.cross_entropy(projected, targets)
        # -sum_i t_i log o_i with t = softmax(E[target]) from the frozen table; only gathered rows needed.
        target_dist = torch.softmax(self.target_emb(targets), dim=-1)
        return -(target_dist * torch.log_softmax(projected, dim=-1)).sum(-1).mean()

    def _last(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Value at each row's last valid position, (B, ...) from (B, L, ...)."""
        mask = mask.bool()
        steps = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, steps[None, :], torch.full_like(steps[None, :], -1)).amax(1).clamp(min=0)
        return values[torch.arange(len(values), device=values.device), last]

    def forward(self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, n_items + 1) logits for the whole (masked) sequence of each row."""
        aligned, (items, activities, dwell), _ = self._left_align(mask, items, activities, dwell)
        hidden = self._hidden(items, activities, dwell)
        if self.config.use_attention:
            # Only the last position is needed: plain (non-causal) masked attention over the valid steps.
            scores = self._attention_scores(hidden).masked_fill(~aligned, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> zero vector
            pooled = (weights[:, :, None] * hidden).sum(1)
        else:
            pooled = self._last(hidden, aligned)
        return self._logits(pooled)

    @torch.no_grad()
    def attention_weights(self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) attention over each whole sequence, at the caller's positions (zero on padding); case study."""
        if not self.config.use_attention:
            raise ValueError("RIB-Attention (use_attention=False) has no attention layer")
        aligned, (items_a, activities_a, dwell_a), shift = self._left_align(mask, items, activities, dwell)
        hidden = self._hidden(items_a, activities_a, dwell_a)
        scores = self._attention_scores(hidden).masked_fill(~aligned, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return torch.stack([w.roll(int(s)) for w, s in zip(weights, shift, strict=True)])
