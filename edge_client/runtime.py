"""On-device recommendations from a verified model package (numpy + onnxruntime + cryptography only).

``Recommender(package_dir, public_key)`` verifies the package (``edge_client.package.verify_package``) and
serves it with onnxruntime (``intra_op_num_threads=1`` by default):

- ``recommend(history, k, exclude, exclude_seen)`` runs the full-session graph over the last ``max_len``
  known tuples of ``history`` (``MicroBehavior`` records; dwell seconds are bucketed with the package's
  edges). Unknown items (and activities) are skipped and counted in ``stats``; with nothing left the
  package's popularity list answers (``source == "popularity"``). Every recommendation carries the
  attention weight of every input tuple (zero for skipped or truncated ones).
- ``start_session()`` returns an ``IncrementalSession`` whose ``step(behavior)`` costs one GRU step and one
  output projection (the same graph advanced by one tuple from the session's running-softmax state; with
  the copy term the session also keeps its own copy keys and items, O(t * hidden) per step). Past
  ``max_len`` tuples the model's window no longer holds the whole session, so a step falls back to one
  call over the window from the initial state (exact, O(max_len)).
- One onnxruntime session per package: ``full.onnx`` advances a state by L tuples, so a whole session (from
  the initial state) and a step (one tuple on the live state) share one copy of the weights and of
  onnxruntime's prepacked output matrix. ``step.onnx`` (the one-tuple graph, weights inside full.onnx) is
  verified with the package but not loaded here.
- The graph loads from the bytes that were hashed again as read (``strict_load=True``, the default), so a
  file replaced between verification and loading never runs; ``strict_load=False`` loads from the path
  (for a package directory in app-private storage; onnxruntime reads the file itself).
- ``top_k`` is exact and avoids a full partition of the scores: the k-th largest of 1024 group maxima
  bounds the k-th largest score from below, so only the (few) scores above it are ranked.
- ``swap(new_package_dir)`` verifies the new package (it must be newer), loads it, runs a smoke inference,
  and only then replaces the serving model in one assignment; on any failure the old model keeps serving
  and the error is raised. Sessions started before a swap keep the model they started with.
- Anti-rollback across restarts: ``installed_version`` (with ``allow_reinstall=True``: the same version
  loads again, an older one is ``stale_version``) and ``on_install(manifest)``, called after the first
  load and after a swap's checks but *before* the new model serves (if it raises, the swap fails and the
  old model keeps serving), so a version serves only once the caller has recorded it. ``EdgeClient`` wires
  both to the encrypted version blob in its store.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_client.package import (
    FULL_GRAPH,
    Manifest,
    PackageError,
    PackageVocab,
    load_vocab,
    read_verified,
    verify_package,
)
from edge_client.schema import MicroBehavior

INITIAL_RUN_MAX = -1e30  # must match model.export.INITIAL_RUN_MAX


@dataclass(frozen=True)
class TupleWeight:
    """One input tuple and the attention weight the model gave it (0 when skipped or outside the window)."""

    item_id: str
    activity: str
    dwell_bucket: int
    weight: float
    used: bool


@dataclass(frozen=True)
class Recommendation:
    """One recommended item; ``explanation`` holds the attention weight of every input tuple."""

    item_id: str
    score: float
    explanation: tuple[TupleWeight, ...] = ()
    source: str = "model"  # "model" | "popularity"


TupleLike = MicroBehavior | tuple[str, str, int]


def _feed(session, feed: dict[str, np.ndarray], names: frozenset[str] | None = None) -> dict[str, np.ndarray]:
    """Only the inputs the graph declares (the exporter drops inputs a model config never reads)."""
    names = names if names is not None else frozenset(i.name for i in session.get_inputs())
    return {k: v for k, v in feed.items() if k in names}


def _session_from_bytes(data: bytes, options) -> ort.InferenceSession:
    """An onnxruntime session of verified graph bytes, without keeping a second copy of them alive:
    ``InferenceSession`` keeps the bytes it was built from (only to rebuild itself on a provider change,
    which this runtime never asks for), ~17 MB at 100k items."""
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    if getattr(session, "_model_bytes", None) is data:
        session._model_bytes = None
    return session


# Exact top-k: the scores are split into this many disjoint groups; the k-th largest group maximum is a
# lower bound of the k-th largest score (k distinct groups each hold a score at least that large).
_TOPK_GROUPS = 1024


class _Loaded:
    """One package in memory: verified manifest, vocabulary and its one onnxruntime session."""

    def __init__(self, manifest: Manifest, threads: int, strict_load: bool = True) -> None:
        self.manifest = manifest
        self.vocab: PackageVocab = load_vocab(manifest)
        self.item_index = self.vocab.item_index()
        self.activity_index = {name: i for i, name in enumerate(self.vocab.activities.names)}
        model = manifest.model
        self.n_items = int(model["n_items"])
        self.hidden_dim = int(model.get("hidden_dim", 0))
        self.max_len = int(model.get("max_len", 50))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        assert manifest.path is not None
        try:
            if (
                strict_load
            ):  # from the bytes hashed again as read: a graph swapped after verification never loads
                self.full = _session_from_bytes(read_verified(manifest, FULL_GRAPH), options)
            else:  # from the path: the package dir must be private storage
                self.full = ort.InferenceSession(
                    str(manifest.path / FULL_GRAPH), options, providers=["CPUExecutionProvider"]
                )
        except PackageError:
            raise
        except Exception as err:  # onnxruntime raises its own exception types
            raise PackageError("bad_payload", f"onnxruntime cannot load the graph: {err}") from None
        self.inputs = frozenset(i.name for i in self.full.get_inputs())
        self.outputs = [o.name for o in self.full.get_outputs()]
        if (
            "items" not in self.inputs
            or self.outputs[:2] != ["scores", "weights"]
            or "new_hidden" not in self.outputs
        ):
            raise PackageError(
                "bad_payload",
                f"full.onnx is not a session graph (inputs {sorted(self.inputs)}, outputs {self.outputs})",
            )
        self.popular_items = np.asarray(self.vocab.popular_items, dtype=object)
        self.popular_counts = np.asarray(self.vocab.popular_counts, dtype=np.float64)

    def smoke_test(self) -> None:
        """One tiny inference (a whole one-tuple session, then one step on its state);
        PackageError('bad_payload') if anything is off."""
        try:
            first = self.advance([(1, 0, 0)], self.initial_state(), self.empty_copy_state())
            second = self.advance([(1, 0, 0)], self.state_of(first), self.empty_copy_state())
        except Exception as err:
            raise PackageError("bad_payload", f"smoke inference failed: {err}") from None
        h = self.hidden_dim
        for out in (first, second):
            shapes = (
                out["scores"].shape,
                out["weights"].shape,
                out["new_hidden"].shape,
                out["new_run_num"].shape,
            )
            if shapes != ((1, self.n_items + 1), (1, 1), (1, h), (1, h)):
                raise PackageError("bad_payload", f"graph outputs have unexpected shapes {shapes}")
            if not np.isfinite(out["scores"]).all():
                raise PackageError("bad_payload", "smoke inference produced non-finite scores")

    def initial_state(self) -> dict[str, np.ndarray]:
        h = self.hidden_dim
        return {
            "hidden": np.zeros((1, h), np.float32),
            "run_max": np.full((1,), INITIAL_RUN_MAX, np.float32),
            "run_den": np.zeros((1,), np.float32),
            "run_num": np.zeros((1, h), np.float32),
        }

    def empty_copy_state(self) -> dict[str, np.ndarray]:
        """The copy term's past keys and items before the first tuple."""
        return {
            "keys": np.zeros((1, 0, self.hidden_dim), np.float32),
            "past_items": np.zeros((1, 0), np.int64),
        }

    @staticmethod
    def state_of(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The running state after a call of the graph."""
        return {
            "hidden": out["new_hidden"],
            "run_max": out["new_run_max"],
            "run_den": out["new_run_den"],
            "run_num": out["new_run_num"],
        }

    def advance(
        self,
        encoded: Sequence[tuple[int, int, int]],
        state: dict[str, np.ndarray],
        copy_state: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """One call of the graph: ``state`` (and the copy keys/items) advanced by the encoded tuples (L >= 1);
        the outputs by name."""
        arr = np.asarray(encoded, dtype=np.int64).reshape(1, -1, 3)
        feed = {
            "items": arr[:, :, 0],
            "activities": arr[:, :, 1],
            "dwell": arr[:, :, 2],
            "lengths": np.array([arr.shape[1]], np.int64),
            **state,
            **copy_state,
        }
        return dict(zip(self.outputs, self.full.run(None, _feed(self.full, feed, self.inputs)), strict=True))

    # ---- tuple handling ------------------------------------------------------------------------------
    def encode(
        self, behavior: TupleLike, stats: Counter
    ) -> tuple[tuple[str, str, int], tuple[int, int, int] | None]:
        """(display tuple, model indices or None when it must be skipped)."""
        if isinstance(behavior, MicroBehavior):
            shown = (behavior.item_id, behavior.activity, self.vocab.dwell.bucket_of(behavior.dwell_seconds))
        else:
            item, activity, bucket = behavior
            shown = (str(item), str(activity), int(bucket))
        item_idx = self.item_index.get(shown[0])
        if item_idx is None:
            stats["unknown_item"] += 1
            return shown, None
        activity_idx = self.activity_index.get(shown[1])
        if activity_idx is None:
            stats["unknown_activity"] += 1
            return shown, None
        if not 0 <= shown[2] < self.vocab.dwell.vocab_size:
            stats["bad_dwell_bucket"] += 1
            return shown, None
        return shown, (item_idx, activity_idx, shown[2])

    def run_full(self, encoded: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n_items + 1,), weights (L,)) for one session of encoded tuples (1 <= L)."""
        out = self.advance(encoded, self.initial_state(), self.empty_copy_state())
        return out["scores"][0], out["weights"][0]

    def top_k(self, scores: np.ndarray, k: int, banned: Iterable[int]) -> list[tuple[int, float]]:
        """The k best (index, score) pairs, best first, ties by lower index; never the padding column 0, a
        banned index or a NaN score."""
        scores = scores.astype(np.float32, copy=True)
        scores[0] = -np.inf  # padding
        banned = list(banned)
        if banned:
            scores[np.asarray(banned, dtype=np.int64)] = -np.inf
        nan = np.isnan(scores)
        if nan.any():
            scores[nan] = -np.inf
        if k <= 0:
            return []
        n_groups = len(scores) // _TOPK_GROUPS
        candidates = None
        if _TOPK_GROUPS > 4 * k and n_groups:  # every score below the k-th largest group maximum is out
            # group j = scores j, j + n_groups, ...: an elementwise max over _TOPK_GROUPS contiguous rows
            group_max = scores[: n_groups * _TOPK_GROUPS].reshape(n_groups, _TOPK_GROUPS).max(axis=0)
            bound = np.partition(group_max, _TOPK_GROUPS - k)[_TOPK_GROUPS - k]
            if bound > -np.inf:
                candidates = np.flatnonzero(scores >= bound)
        if candidates is None:
            candidates = np.flatnonzero(scores > -np.inf)
        if len(candidates) > k:  # keep the k largest and every score tied with the k-th
            values = scores[candidates]
            kth = np.partition(values, len(values) - k)[len(values) - k]
            candidates = candidates[values >= kth]
        top = candidates[np.lexsort((candidates, -scores[candidates]))][:k]
        return [(int(i), float(scores[i])) for i in top]

    def popularity(self, k: int, excluded: set[str]) -> list[Recommendation]:
        out = []
        for item, count in zip(self.popular_items, self.popular_counts, strict=True):
            if item in excluded:
                continue
            out.append(Recommendation(str(item), float(count), (), "popularity"))
            if len(out) >= k:
                break
        return out

    def answer(
        self,
        shown: Sequence[tuple[str, str, int]],
        used: Sequence[bool],
        window: Sequence[int],
        scores: np.ndarray | None,
        weights: np.ndarray | None,
        k: int,
        exclude: Iterable[str],
        exclude_seen: bool,
    ) -> list[Recommendation]:
        """Recommendations from model scores (or popularity when ``scores`` is None) with explanations."""
        excluded = {str(e) for e in exclude}
        if exclude_seen:
            excluded |= {t[0] for t in shown}
        if scores is None:
            return self.popularity(k, excluded)
        weight_of = np.zeros(len(shown))
        if weights is not None:
            weight_of[np.asarray(window, dtype=np.int64)] = weights[: len(window)]
        in_window = np.zeros(len(shown), dtype=bool)
        in_window[np.asarray(window, dtype=np.int64)] = True
        explanation = tuple(
            TupleWeight(t[0], t[1], t[2], float(w), bool(u and iw))
            for t, w, u, iw in zip(shown, weight_of, used, in_window, strict=True)
        )
        banned = [self.item_index[e] for e in excluded if e in self.item_index]
        return [
            Recommendation(self.vocab.item_ids[i - 1], s, explanation)
            for i, s in self.top_k(scores, k, banned)
        ]


class IncrementalSession:
    """A live session fed one tuple at a time through the step graph (see module docstring)."""

    def __init__(self, loaded: _Loaded, stats: Counter) -> None:
        self._m = loaded
        self._stats = stats
        self.state = loaded.initial_state()
        self.shown: list[tuple[str, str, int]] = []
        self.used: list[bool] = []
        self.encoded: list[tuple[int, int, int]] = []
        self.positions: list[int] = []  # index into shown of each encoded tuple
        self.att: list[float] = []
        self.keys = np.zeros((1, 0, loaded.hidden_dim), np.float32)
        self.past_items = np.zeros((1, 0), np.int64)
        self.scores: np.ndarray | None = None
        self.weights: np.ndarray | None = None

    @property
    def model_version(self) -> int:
        """The model version this session runs on."""
        return self._m.manifest.model_version

    def step(
        self, behavior: TupleLike, k: int = 20, exclude: Iterable[str] = (), exclude_seen: bool = True
    ) -> list[Recommendation]:
        """Add one tuple (a MicroBehavior, or an (item, activity, dwell_bucket) tuple); returns the top k."""
        m = self._m
        shown, enc = m.encode(behavior, self._stats)
        self.shown.append(shown)
        self.used.append(enc is not None)
        if enc is not None:
            self.encoded.append(enc)
            self.positions.append(len(self.shown) - 1)
            if len(self.encoded) <= m.max_len:
                out = m.advance([enc], self.state, {"keys": self.keys, "past_items": self.past_items})
                run_max, run_den = out["new_run_max"], out["new_run_den"]
                self.state = m.state_of(out)
                if "new_keys" in out:  # copy term: the session's own keys and items grow by one
                    self.keys = np.concatenate([self.keys, out["new_keys"]], axis=1)
                    self.past_items = np.concatenate(
                        [self.past_items, np.array([[enc[0]]], np.int64)], axis=1
                    )
                self.att.append(float(out["att"][0, 0]))
                self.scores = out["scores"][0]
                s = np.asarray(self.att, dtype=np.float64)
                if m.manifest.model.get("use_attention", True):
                    self.weights = np.exp(s - float(run_max[0])) / float(run_den[0])
                else:
                    self.weights = np.eye(1, len(s), len(s) - 1)[0]
            else:  # the window slid: one full-graph call over the last max_len tuples
                self.scores, self.weights = m.run_full(self.encoded[-m.max_len :])
        return self.recommendations(k, exclude, exclude_seen)

    def recommendations(
        self, k: int = 20, exclude: Iterable[str] = (), exclude_seen: bool = True
    ) -> list[Recommendation]:
        """Top k for the session so far (popularity before the first known tuple)."""
        window = self.positions[-self._m.max_len :]
        return self._m.answer(
            self.shown, self.used, window, self.scores, self.weights, k, exclude, exclude_seen
        )


class Recommender:
    """Serves one verified package; ``swap`` replaces it atomically (see module docstring)."""

    def __init__(
        self,
        package_dir: str | Path,
        public_key: object,
        installed_version: int | None = None,
        intra_op_num_threads: int = 1,
        strict_load: bool = True,
        allow_reinstall: bool = False,
        on_install: Callable[[Manifest], None] | None = None,
    ) -> None:
        self._public_key = public_key
        self._threads = intra_op_num_threads
        self._strict_load = strict_load
        self._lock = threading.Lock()
        self.stats: Counter = Counter()
        self.on_install = on_install
        loaded = self._load(package_dir, installed_version, allow_reinstall)
        if on_install is not None:
            on_install(loaded.manifest)
        self._loaded = loaded
        self.session: IncrementalSession | None = None

    def _load(
        self, package_dir: str | Path, installed_version: int | None, allow_reinstall: bool = False
    ) -> _Loaded:
        manifest = verify_package(
            package_dir, self._public_key, installed_version, allow_reinstall=allow_reinstall
        )
        for name in ("n_items", "hidden_dim", "max_len"):
            value = manifest.model.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PackageError(
                    "bad_payload", f"manifest model.{name} must be a positive integer, got {value!r}"
                )
        loaded = _Loaded(manifest, self._threads, self._strict_load)
        loaded.smoke_test()
        return loaded

    @property
    def manifest(self) -> Manifest:
        """The manifest of the serving package."""
        return self._loaded.manifest

    @property
    def model_version(self) -> int:
        """The serving model version."""
        return self._loaded.manifest.model_version

    @property
    def vocab(self) -> PackageVocab:
        """The serving package's vocabularies."""
        return self._loaded.vocab

    def swap(self, new_package_dir: str | Path) -> Manifest:
        """Verify, load and smoke-test a newer package, then serve it; on failure the old one keeps serving."""
        with self._lock:
            loaded = self._load(new_package_dir, installed_version=self._loaded.manifest.model_version)
            if self.on_install is not None:  # record the version first: it serves only once remembered
                self.on_install(loaded.manifest)
            self._loaded = (
                loaded  # one reference assignment: callers see the old or the new model, never a mix
            )
            return loaded.manifest

    def recommend(
        self,
        history: Sequence[TupleLike],
        k: int = 20,
        exclude: Iterable[str] = (),
        exclude_seen: bool = True,
    ) -> list[Recommendation]:
        """Top ``k`` next items after ``history`` (oldest first); see the module docstring."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        m = self._loaded  # one snapshot for the whole call
        shown, used, encoded, positions = [], [], [], []
        for behavior in history:
            display, enc = m.encode(behavior, self.stats)
            shown.append(display)
            used.append(enc is not None)
            if enc is not None:
                encoded.append(enc)
                positions.append(len(shown) - 1)
        if not encoded:
            self.stats["popularity_fallback"] += 1
            return m.answer(shown, used, [], None, None, k, exclude, exclude_seen)
        window = positions[-m.max_len :]
        scores, weights = m.run_full(encoded[-m.max_len :])
        return m.answer(shown, used, window, scores, weights, k, exclude, exclude_seen)

    def start_session(self) -> IncrementalSession:
        """A new incremental session on the serving model (also kept as ``self.session`` for ``step``)."""
        self.session = IncrementalSession(self._loaded, self.stats)
        return self.session

    def step(
        self, behavior: TupleLike, k: int = 20, exclude: Iterable[str] = (), exclude_seen: bool = True
    ) -> list[Recommendation]:
        """``self.session.step`` (starting a session first if none is open)."""
        if self.session is None:
            self.start_session()
        assert self.session is not None
        return self.session.step(behavior, k, exclude, exclude_seen)


def latest_session(records: Sequence[MicroBehavior]) -> list[MicroBehavior]:
    """The records of the session with the latest timestamp, in time order."""
    if not records:
        return []
    last = max(records, key=lambda r: (r.timestamp_ms, r.session_id))
    return sorted((r for r in records if r.session_id == last.session_id), key=lambda r: r.timestamp_ms)


def format_recommendations(recs: Sequence[Recommendation]) -> list[dict[str, object]]:
    """JSON-ready form of recommendations (explanations included)."""
    return [
        {
            "item_id": r.item_id,
            "score": r.score if math.isfinite(r.score) else None,
            "source": r.source,
            "explanation": [
                {
                    "item_id": t.item_id,
                    "activity": t.activity,
                    "dwell_bucket": t.dwell_bucket,
                    "weight": t.weight,
                    "used": t.used,
                }
                for t in r.explanation
            ],
        }
        for r in recs
    ]
