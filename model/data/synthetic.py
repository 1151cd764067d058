"""Synthetic raw-event populations with a planted micro-behavior signal (for tests and the quickstart).

Each session has a latent *intent* category. Visits to intent items look engaged (entered from search
or a category list, comments/specification read, long dwell, often carted); interleaved *distractor*
visits look shallow (entered from home or sale, short dwell). The next intent item follows the previous
intent item along a per-category chain. So the next item depends on which earlier items were engaged:
a model that sees activities and dwell can tell intent from distraction, an item-only model must guess.
Numpy only: simulations and the device-side tests use it without torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edge_client.schema import MODULES, EventType, RawEvent

DAY_MS = 86_400_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic population."""

    n_devices: int = 200
    n_items: int = 300
    n_categories: int = 15
    sessions_per_device: tuple[int, int] = (2, 6)  # inclusive range
    visits_per_session: tuple[int, int] = (3, 9)
    intent_share: float = 0.55  # share of visits that follow the intent
    chain_noise: float = 0.15  # chance an intent visit jumps to a random item of the category
    days: int = 14
    start_ms: int = 1_700_000_000_000


def _category_chains(config: SyntheticConfig, rng: np.random.Generator) -> list[np.ndarray]:
    items = rng.permutation(np.arange(1, config.n_items + 1))
    return [chunk for chunk in np.array_split(items, config.n_categories) if len(chunk)]


def item_categories(config: SyntheticConfig | None = None, seed: int = 0) -> dict[str, int]:
    """Each item's category (its chain) in the population ``generate_population(config, seed)`` writes."""
    chains = _category_chains(config or SyntheticConfig(), np.random.default_rng(seed))
    return {str(item): index for index, chain in enumerate(chains) for item in chain}


def generate_population(config: SyntheticConfig | None = None, seed: int = 0) -> Iterator[RawEvent]:
    """Yield raw UI events device by device, session by session, in time order within a session."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(seed)
    chains = _category_chains(config, rng)
    # Distractors come from a skewed popularity so that popularity alone is a weak, not useless, cue.
    popularity = 1.0 / np.arange(1, config.n_items + 1) ** 0.8
    popularity /= popularity.sum()
    span_ms = config.days * DAY_MS
    for device in range(config.n_devices):
        device_id = f"device-{device:06d}"
        n_sessions = int(rng.integers(config.sessions_per_device[0], config.sessions_per_device[1] + 1))
        starts = np.sort(rng.integers(0, span_ms, n_sessions))
        for number, offset in enumerate(starts):
            yield from _session_events(
                device_id, f"s{number}", config.start_ms + int(offset), config, chains, popularity, rng
            )


def _session_events(
    device_id: str,
    session_id: str,
    t_ms: int,
    config: SyntheticConfig,
    chains: list[np.ndarray],
    popularity: np.ndarray,
    rng: np.random.Generator,
) -> Iterator[RawEvent]:
    chain = chains[int(rng.integers(len(chains)))]
    position = int(rng.integers(len(chain)))
    n_visits = int(rng.integers(config.visits_per_session[0], config.visits_per_session[1] + 1))

    def event(kind: EventType, item: str | None = None, **fields: object) -> RawEvent:
        return RawEvent(device_id, session_id, t_ms, kind, item, **fields)

    for visit in range(n_visits):
        engaged = visit == 0 or rng.random() < config.intent_share
        if engaged:
            if visit > 0:
                jump = rng.random() < config.chain_noise
                position = int(rng.integers(len(chain))) if jump else (position + 1) % len(chain)
            item = str(chain[position])
            source = rng.choice(["search", "shop_list", "cart"], p=[0.55, 0.35, 0.10])
            dwell_s = float(rng.lognormal(np.log(70), 0.5))
        else:
            item = str(int(rng.choice(len(popularity), p=popularity)) + 1)
            source = rng.choice(["home", "sale"], p=[0.6, 0.4])
            dwell_s = float(rng.lognormal(np.log(6), 0.5))
        yield event(EventType.PAGE_ENTER, item, page_source=str(source))
        enter_ms = t_ms
        if engaged:
            for module in MODULES:
                if rng.random() < 0.6:
                    t_ms += int(rng.integers(1_000, 8_000))
                    yield event(EventType.MODULE_VIEW, item, module=module)
            t_ms += int(rng.integers(500, 3_000))
            yield event(EventType.SCROLL, item, value=round(float(rng.uniform(0.5, 1.0)), 2))
            if rng.random() < 0.35:
                t_ms += int(rng.integers(500, 5_000))
                yield event(EventType.CART, item)
                if rng.random() < 0.3:
                    t_ms += int(rng.integers(500, 5_000))
                    yield event(EventType.ORDER, item)
        elif rng.random() < 0.5:
            t_ms += int(rng.integers(200, 1_500))
            yield event(EventType.HOVER, item, value=float(rng.integers(100, 900)))
        hidden_ms = 0
        if rng.random() < 0.1:  # the shopper switches away for a while; dwell must not count it
            t_ms += int(rng.integers(500, 2_000))
            yield event(EventType.VISIBILITY_HIDDEN, item)
            hidden_ms = int(rng.integers(60_000, 600_000))
            t_ms += hidden_ms
            yield event(EventType.VISIBILITY_VISIBLE, item)
        t_ms = max(t_ms, enter_ms + hidden_ms + int(dwell_s * 1000))
        yield event(EventType.PAGE_LEAVE, item)
        t_ms += int(rng.integers(1_000, 20_000))
