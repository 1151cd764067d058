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

Copy/repeat term (``RIBConfig.copy``, on by default except with the paper loss): a second, bilinear
attention of the prefix's pooled vector over the prefix's own GRU states, scaled by a non-negative gate
(softplus of a Linear on the pooled vector), is added onto the logits of the items at those steps
(``scatter_add`` on activations only, so Opacus' per-sample gradients stay exact; tested). Measured on the
validation split carved from training: +6 points Recall@20 on jdata2016 (65% of its targets repeat an
item of the session), +0.4 on yoochoose_100k, -3 on the tiny jdata2018 validation set. Loops must pass
the copy term to the loss: ``example_loss`` (or ``outputs_all(...).at(positions)`` + ``loss_at``).
Other options: ``attention_micro`` (activity/dwell embeddings inside the attention scorer's tanh) and
``micro_dropout`` (dropout on the activity/dwell embeddings); both off by default (no consistent gain on
validation). ``tie_output`` scores items against the input item embeddings (NARM / SR-GNN style, see
``TiedOutput``). Activity/dwell embeddings default to 4 dims (beat 16/8 on jdata2016 and jdata2018 validation).

The losses (``RIBConfig.loss``):
- ``"softmax"`` (default, and better in our measurements): full softmax cross-entropy over the catalogue,
  ``nn.Linear(hidden, n_items + 1)``.
- ``"sampled"``: sampled softmax for big catalogues. Training scores only the batch's targets plus
  ``TrainConfig.n_negatives`` shared negatives (uniform or popularity), with the logQ correction, through
  ``SampledOutput.sampled`` (rows of ``self.out.weight`` indexed inside the module); evaluation scores the
  whole catalogue through the same module's ordinary ``nn.Linear`` forward. Opacus has no per-sample rule
  for the row indexing, so the DP-SGD path keeps ``"softmax"`` (a plain ``nn.Linear``).
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

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("softmax", "paper", "sampled")

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
    activity_dim: int = 4  # measured (validation, jdata2016/2018): 4 beats 16
    dwell_dim: int = 4
    hidden_dim: int = 100
    use_activity: bool = True
    use_dwell: bool = True
    use_attention: bool = True  # False: RIB-Attention (last hidden state)
    dropout: float = 0.1
    max_len: int = 50  # tuples of context the model looks at (the last max_len of a prefix)
    loss: str = (
        "softmax"  # "softmax" | "paper" | "sampled" (sampled softmax in training, full scores at eval)
    )
    copy: bool | None = (
        None  # repeat/copy term (see RIB._copy_amounts); None = on, except with the paper loss
    )
    attention_micro: bool = False  # the attention scorer also sees the step's activity/dwell embeddings
    micro_dropout: float = 0.0  # dropout on the activity/dwell embeddings only (on top of ``dropout``)
    tie_output: bool = False  # score items against the input item embeddings (see TiedOutput)
    # > 0: score = cosine_scale * cos(W_b pooled, item embedding) + bias (NISER, Gupta et al. 2019); needs
    # tie_output. Measured on SR-GNN diginetica's validation split: 0.463 vs 0.428 Recall@20 at 16.
    cosine_scale: float = 0.0
    # With attention: the output sees [attention-pooled; h_t], the pooled summary beside the last hidden state
    # (NARM's global + local encoders, STAMP's last click). Off = the paper's RIB.
    last_state: bool = False
    # The item embeddings stay as initialised: a public table (model/catalog.py's vectors) that training never
    # moves. Under user-level DP no clip budget and no noise go to it; with tie_output it scores items too.
    freeze_items: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.tie_output and self.loss == "paper":
            raise ValueError(
                "tie_output scores items with the item embeddings; the paper loss scores in embedding space"
            )
        if self.copy is True and self.loss == "paper":
            raise ValueError("the copy term adds onto item logits; the paper loss has none")
        if self.cosine_scale < 0 or not math.isfinite(self.cosine_scale):
            raise ValueError(f"cosine_scale must be a finite number >= 0, got {self.cosine_scale}")
        if self.cosine_scale > 0 and not self.tie_output:
            raise ValueError("cosine_scale scores against the item embeddings: it needs tie_output=True")
        if self.last_state and not self.use_attention:
            raise ValueError(
                "last_state adds the last hidden state beside the attention output: it needs use_attention"
            )
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
    def use_copy(self) -> bool:
        """Whether the copy term is on (``copy`` resolved: default on for item-logit losses)."""
        return self.loss != "paper" if self.copy is None else bool(self.copy)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector the output layer (and the copy query) reads."""
        return self.hidden_dim * (2 if self.last_state else 1)

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
            if c.attention_micro and c.input_dim > c.item_dim:
                # W_x [a_t; d_t] added inside the tanh: the scorer sees the micro behavior directly.
                self.att_micro = nn.Linear(c.input_dim - c.item_dim, c.hidden_dim, bias=False)
        self.micro_dropout = nn.Dropout(c.micro_dropout)
        if c.use_copy:
            # Copy/repeat term (see ``_copy_weights``): bilinear attention of the prefix's pooled vector over
            # its own steps, scaled by a non-negative gate, is added to the logits of the items at those steps.
            self.copy_query = nn.Linear(c.pooled_dim, c.hidden_dim, bias=False)
            self.copy_key = nn.Linear(c.hidden_dim, c.hidden_dim)
            self.copy_gate = nn.Linear(c.pooled_dim, 1)
        self.output_dropout = nn.Dropout(c.dropout)
        if c.tie_output:
            self.out = TiedOutput(c.pooled_dim, c.item_dim, c.n_items + 1, c.cosine_scale)
            self.out.scores.weight = self.item_emb.weight  # module-level tying: one Parameter, two modules
            # Output rows are item vectors now: N(0, 1) entries would start every logit at a std of
            # sqrt(item_dim) times the projection; 1/sqrt(item_dim) keeps them at nn.Linear's scale.
            with torch.no_grad():
                self.item_emb.weight.normal_(0.0, c.item_dim**-0.5)
                self.item_emb.weight[0].zero_()
        elif c.loss == "softmax":
            self.out = nn.Linear(c.pooled_dim, c.n_items + 1)
        elif c.loss == "sampled":
            self.out = SampledOutput(c.pooled_dim, c.n_items + 1)
        else:
            self.out = nn.Linear(c.pooled_dim, c.item_dim)  # output embedding, before normalisation
            self.target_emb = nn.Embedding(c.n_items + 1, c.item_dim)  # frozen target table (see docstring)
            self.target_emb.weight.requires_grad_(False)
            self.target_emb.weight.data.copy_(self.item_emb.weight.data)
        if c.freeze_items:
            self.item_emb.weight.requires_grad_(False)

    # ---- initialisation ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_item_embeddings(self, vectors: torch.Tensor, present: torch.Tensor | None = None) -> None:
        """Copy pretrained (Word2vec) item vectors into W_P (and the paper loss's target table).

        ``vectors`` is (n_items + 1, item_dim); rows where ``present`` is False keep their random init.
        """
        if vectors.shape != self.item_emb.weight.shape:
            raise ValueError(
                f"item vectors {tuple(vectors.shape)} != embedding {tuple(self.item_emb.weight.shape)}"
            )
        rows = torch.ones(len(vectors), dtype=torch.bool) if present is None else present.bool().clone()
        rows[0] = False  # padding stays zero
        vectors = vectors.to(self.item_emb.weight)
        self.item_emb.weight[rows] = vectors[rows]
        if self.config.loss == "paper":
            self.target_emb.weight[rows] = vectors[rows]

    # ---- the network -------------------------------------------------------------------------------
    def _left_align(
        self, mask: torch.Tensor, *fields: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
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

    def _encode(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GRU hidden states h_1..h_L of left-aligned inputs (B, L, hidden), and the micro embeddings (or None)."""
        micro_parts = []
        if self.activity_emb is not None:
            micro_parts.append(self.activity_emb(activities))
        if self.dwell_emb is not None:
            micro_parts.append(self.dwell_emb(dwell))
        micro = self.micro_dropout(torch.cat(micro_parts, dim=-1)) if micro_parts else None
        parts = [self.item_emb(items)] + ([micro] if micro is not None else [])
        embedded = self.input_dropout(torch.cat(parts, dim=-1))
        # Padding is always after the valid steps here, so the causal GRU's valid outputs never see it.
        hidden, _ = self.gru(embedded)
        return hidden, micro

    def _hidden(self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor) -> torch.Tensor:
        """GRU hidden states h_1..h_L of left-aligned inputs, (B, L, hidden)."""
        return self._encode(items, activities, dwell)[0]

    def _attention_scores(self, hidden: torch.Tensor, micro: torch.Tensor | None = None) -> torch.Tensor:
        """score_t = w_a . tanh(W_m h_t + b_m [+ W_x micro_t]) + b_a, (B, L)."""
        pre = self.att_proj(hidden)
        att_micro = getattr(self, "att_micro", None)
        if att_micro is not None and micro is not None:
            pre = pre + att_micro(micro)
        return self.att_score(torch.tanh(pre)).squeeze(-1)

    def _copy_amounts(
        self, pooled: torch.Tensor, hidden: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Copy term: gate(query) * softmax_j(q . k_j / sqrt(H)) over allowed steps j.

        ``pooled`` is (B, Q, H) queries, ``hidden`` (B, L, H) keys, ``allowed`` (B, Q, L); returns (B, Q, L),
        zero where not allowed. Pure activations after the Linear modules (Opacus-safe).
        """
        query = self.copy_query(pooled)
        key = self.copy_key(hidden)
        scores = query @ key.transpose(1, 2) / float(self.config.hidden_dim) ** 0.5
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        weights = weights * allowed
        gate = F.softplus(self.copy_gate(pooled))  # (B, Q, 1), >= 0
        return gate * weights

    @staticmethod
    def _causal_allowed(mask: torch.Tensor) -> torch.Tensor:
        """(B, t, j): j <= t and j is a real step."""
        steps = mask.shape[1]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=mask.device).tril()
        return causal[None, :, :] & mask[:, None, :]

    def _pool_all(
        self, hidden: torch.Tensor, mask: torch.Tensor, micro: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled output for every prefix end t (attention over valid steps <= t), and the weights."""
        if not self.config.use_attention:
            return hidden, None
        steps = hidden.shape[1]
        allowed = self._causal_allowed(mask)
        # A padding row t has no allowed j only if the whole sequence is empty; let it see step 0 so the
        # softmax stays finite (its output is never used).
        allowed[:, :, 0] |= ~allowed.any(-1)
        scores = self._attention_scores(hidden, micro)[:, None, :].expand(-1, steps, -1)
        weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        pooled = weights @ hidden
        if self.config.last_state:
            pooled = torch.cat([pooled, hidden], dim=-1)  # h_t is the last state of the prefix ending at t
        return pooled, weights

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The output module applied to pooled vectors."""
        return self.out(self.output_dropout(pooled))

    def _logits(self, pooled: torch.Tensor, copy: CopyTerm | None = None) -> torch.Tensor:
        """Item scores from pooled vectors (..., hidden) -> (..., n_items + 1), plus the copy term if given."""
        projected = self._project(pooled)
        if self.config.loss in ("softmax", "sampled"):
            return projected if copy is None else copy.add_to(projected)
        # Paper loss: score_j = -KL(t_j || o) = sum_i t_ji log o_i + H(t_j), t_j = softmax(E_j). For a fixed
        # target, KL and the cross-entropy differ by H(t_j) only, so the training gradient is the same; but
        # ranking by raw cross-entropy would favour items with peaked t_j whatever the context. The target
        # table is frozen (no gradient), so these products carry no trainable weight.
        log_targets = torch.log_softmax(self.target_emb.weight, dim=-1)
        targets = log_targets.exp()
        entropy = -(targets * log_targets).sum(-1)
        return torch.log_softmax(projected, dim=-1) @ targets.T + entropy

    def logits(self, pooled: torch.Tensor, copy: CopyTerm | None = None) -> torch.Tensor:
        """Item scores (..., n_items + 1) of pooled vectors (..., hidden), copy term included when given."""
        return self._logits(pooled, copy)

    def _unshift(self, values: torch.Tensor, shift: torch.Tensor, roll_last: bool) -> torch.Tensor:
        """Undo ``_left_align`` along dim 1 (and roll the key dim of (B, L, L) weights when ``roll_last``)."""
        steps = torch.arange(values.shape[1], device=values.device)
        back = (steps[None, :] - shift[:, None]).clamp(min=0)
        values = values.gather(1, back[:, :, None].expand(-1, -1, values.shape[-1]))
        if roll_last:
            values = torch.stack([w.roll(int(s), dims=-1) for w, s in zip(values, shift, strict=True)])
        return values

    def outputs_all(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor
    ) -> AllOutputs:
        """Everything the loss needs for every prefix end, at the caller's positions."""
        aligned, (items_a, activities_a, dwell_a), shift = self._left_align(mask, items, activities, dwell)
        hidden, micro = self._encode(items_a, activities_a, dwell_a)
        pooled, weights = self._pool_all(hidden, aligned, micro)
        copy = None
        if self.config.use_copy:
            copy = self._copy_amounts(pooled, hidden, self._causal_allowed(aligned))
        if bool(shift.any()):  # put every row back where the caller had it
            pooled = self._unshift(pooled, shift, roll_last=False)
            if weights is not None:
                weights = self._unshift(weights, shift, roll_last=True)
            if copy is not None:
                copy = self._unshift(copy, shift, roll_last=True)
        return AllOutputs(pooled, weights, copy, items)

    def pooled_all(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pooled (B, L, hidden) output for every prefix end, aligned with the input positions, plus weights."""
        out = self.outputs_all(items, activities, dwell, mask)
        return out.pooled, out.weights

    def forward_all(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, L, n_items + 1) logits: position t scores the next item after the prefix ending at t."""
        out = self.outputs_all(items, activities, dwell, mask)
        copy = None
        if out.copy is not None:
            copy = CopyTerm(out.copy, out.items[:, None, :].expand(-1, out.copy.shape[1], -1))
        return self._logits(out.pooled, copy)

    def loss_at(
        self,
        pooled: torch.Tensor,
        targets: torch.Tensor,
        copy: CopyTerm | None = None,
        negatives: torch.Tensor | None = None,
        log_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean training loss of pooled vectors (N, hidden) against target items (N,).

        ``copy``: the copy term of these N examples (``AllOutputs.at``). ``negatives`` (loss "sampled"
        only): shared negative item ids; the candidates are the unique batch targets plus these, scored
        through ``self.out.sampled``; ``log_q`` (n_items + 1,) is subtracted from candidate logits (logQ
        correction for the sampling probability). Without ``negatives`` the full softmax is used.
        """
        if self.config.use_copy and copy is None and self.config.loss != "paper":
            raise ValueError(
                "this RIB has a copy term: pass copy= from outputs_all(...).at(positions), or use example_loss"
            )
        if self.config.loss == "sampled" and negatives is not None:
            candidates = torch.unique(torch.cat([targets, negatives]))  # sorted
            labels = torch.searchsorted(candidates, targets)
            logits = self.out.sampled(self.output_dropout(pooled), candidates)
            if log_q is not None:
                logits = logits - log_q[candidates]
            if copy is not None:
                logits = copy.add_to(logits, candidates, self.config.n_items + 1)
            return F.cross_entropy(logits, labels)
        if self.config.loss in ("softmax", "sampled"):
            return F.cross_entropy(self._logits(pooled, copy), targets)
        # -sum_i t_i log o_i with t = softmax(E[target]) from the frozen table; only gathered rows needed.
        projected = self._project(pooled)
        target_dist = torch.softmax(self.target_emb(targets), dim=-1)
        return -(target_dist * torch.log_softmax(projected, dim=-1)).sum(-1).mean()

    def example_loss(
        self,
        items: torch.Tensor,
        activities: torch.Tensor,
        dwell: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor,
        **sampled: torch.Tensor,
    ) -> torch.Tensor:
        """Mean loss of the prefixes ending at boolean ``positions`` (B, L) against ``targets`` (N,), in one call
        (what the training loop and a DP-SGD loop should use: it includes the copy term when there is one)."""
        pooled, copy = self.outputs_all(items, activities, dwell, mask).at(positions)
        return self.loss_at(pooled, targets, copy, **sampled)

    def _last(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Value at each row's last valid position, (B, ...) from (B, L, ...)."""
        mask = mask.bool()
        steps = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, steps[None, :], torch.full_like(steps[None, :], -1)).amax(1).clamp(min=0)
        return values[torch.arange(len(values), device=values.device), last]

    def _pool_last(self, items, activities, dwell, mask):
        aligned, (items, activities, dwell), shift = self._left_align(mask, items, activities, dwell)
        hidden, micro = self._encode(items, activities, dwell)
        weights = None
        if self.config.use_attention:
            # Only the last position is needed: plain (non-causal) masked attention over the valid steps.
            scores = self._attention_scores(hidden, micro).masked_fill(~aligned, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> zero vector
            pooled = (weights[:, :, None] * hidden).sum(1)
            if self.config.last_state:
                pooled = torch.cat([pooled, self._last(hidden, aligned)], dim=-1)
        else:
            pooled = self._last(hidden, aligned)
        copy = None
        if self.config.use_copy:
            amounts = self._copy_amounts(pooled[:, None, :], hidden, aligned[:, None, :])[:, 0]
            copy = CopyTerm(amounts, items)
        return pooled, weights, copy, shift

    def forward(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, n_items + 1) logits for the whole (masked) sequence of each row."""
        pooled, _, copy, _ = self._pool_last(items, activities, dwell, mask)
        return self._logits(pooled, copy)

    @torch.no_grad()
    def attention_weights(
        self, items: torch.Tensor, activities: torch.Tensor, dwell: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) attention over each whole sequence, at the caller's positions (zero on padding); case study."""
        if not self.config.use_attention:
            raise ValueError("RIB-Attention (use_attention=False) has no attention layer")
        _, weights, _, shift = self._pool_last(items, activities, dwell, mask)
        return torch.stack([w.roll(int(s)) for w, s in zip(weights, shift, strict=True)])


class SampledOutput(nn.Linear):
    """The item output layer for loss "sampled": an ``nn.Linear`` (same weights, same full-catalogue
    ``forward`` at eval) that can also score a subset of rows during training.

    ``sampled`` indexes ``self.weight``/``self.bias`` inside the module; Opacus has no per-sample
    gradient rule for that, so the DP-SGD path uses loss "softmax" (a plain ``nn.Linear``) instead.
    """

    def sampled(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N, len(candidates)) logits of ``x`` (N, in) for the candidate rows only."""
        return F.linear(x, self.weight[candidates], self.bias[candidates])


class TiedOutput(nn.Module):
    """Item scores against the input item embeddings: ``E (W_b pooled) + b`` (``RIBConfig.tie_output``).

    NARM and SR-GNN score items this way (a bilinear form with the item embeddings). With tens of
    thousands of rarely seen items it shares what an item learns as input with what it learns as a
    target, and halves the item parameters. Both products are module calls (``proj``, then ``scores``,
    whose weight *is* ``RIB.item_emb.weight``), so nothing is functional weight tying and Opacus sums the
    two modules' per-sample gradients of the shared table correctly (tested); ``sampled`` scores a subset
    of rows for loss "sampled" like ``SampledOutput``.

    With ``cosine_scale`` s > 0 the score is ``s * cos(W_b pooled, E_i) + b_i`` (NISER): unit-length
    item vectors stop frequent items winning on norm alone, and s sets the softmax temperature. The rows
    are normalised inside this module, which Opacus has no per-sample rule for: DP-SGD refuses it.
    """

    def __init__(self, hidden_dim: int, item_dim: int, n_outputs: int, cosine_scale: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_dim, item_dim, bias=False)  # W_b
        self.scores = SampledOutput(item_dim, n_outputs)  # weight replaced by the item embeddings
        self.cosine_scale = float(cosine_scale)

    @property
    def out_features(self) -> int:
        """Number of scored items (n_items + 1), like ``nn.Linear``."""
        return self.scores.out_features

    def _cosine(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        query = F.normalize(self.proj(x), dim=-1)
        return F.linear(query, F.normalize(weight, dim=-1)) * self.cosine_scale + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n_items + 1) scores of pooled vectors (..., hidden)."""
        if self.cosine_scale > 0:
            return self._cosine(x, self.scores.weight, self.scores.bias)
        return self.scores(self.proj(x))

    def sampled(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(N, len(candidates)) scores of ``x`` (N, hidden) for the candidate rows only."""
        if self.cosine_scale > 0:
            return self._cosine(x, self.scores.weight[candidates], self.scores.bias[candidates])
        return self.scores.sampled(self.proj(x), candidates)


@dataclass
class CopyTerm:
    """Copy amounts (..., L) on the items (..., L) they belong to (activations only, no weights)."""

    amounts: torch.Tensor
    items: torch.Tensor

    def add_to(
        self, logits: torch.Tensor, candidates: torch.Tensor | None = None, n_items: int | None = None
    ) -> torch.Tensor:
        """logits[..., item] += amount for every step; with ``candidates``, logits' columns are those items."""
        if candidates is None:
            return logits.scatter_add(-1, self.items, self.amounts)
        lookup = torch.full((n_items,), -1, dtype=torch.long, device=logits.device)
        lookup[candidates] = torch.arange(len(candidates), device=logits.device)
        column = lookup[self.items]
        return logits.scatter_add(-1, column.clamp(min=0), self.amounts * (column >= 0))


@dataclass
class AllOutputs:
    """``RIB.outputs_all``: pooled (B, L, H), attention (B, L, L) or None, copy amounts (B, L, L) or None,
    and the input items (B, L) the copy amounts refer to."""

    pooled: torch.Tensor
    weights: torch.Tensor | None
    copy: torch.Tensor | None
    items: torch.Tensor

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, CopyTerm | None]:
        """(pooled, copy term) of the prefixes at boolean ``positions`` (B, L), as (N, H) and (N, L)."""
        pooled = self.pooled[positions]
        if self.copy is None:
            return pooled, None
        steps = self.items.shape[1]
        items = self.items[:, None, :].expand(-1, steps, -1)[positions]
        return pooled, CopyTerm(self.copy[positions], items)
