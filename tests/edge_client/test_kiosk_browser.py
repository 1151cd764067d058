"""The kiosk example page in a real headless browser: clicks -> tracker.js -> POST /events -> the device's
model -> the recommendations the page shows.

The real server (``serve``) serves ``examples/kiosk`` on 127.0.0.1 over a client on the tiny trained, signed
package of the ``world`` fixture; playwright drives the system's chromium (its own browser download is not
needed). Skips when playwright or a chromium binary is missing. ``RIB_EDGE_SCREENSHOT_DIR`` set: the
screenshot is copied there too (``benchmarks/results/edge/kiosk_browser.png`` was made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from edge_client.client import EdgeClient
from edge_client.server import serve
from tests.edge_client.worlds import DEVICE

sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
K = 6  # recommendations the kiosk page asks for (kiosk.js)
VIEWPORT = {"width": 1280, "height": 800}
SCREENSHOT = "kiosk_browser.png"


def chromium_binary() -> str | None:
    """The system's chromium (Debian: /usr/bin/chromium), or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


pytestmark = pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary on PATH")


@pytest.fixture
def kiosk(world, tmp_path):
    """(client, server, received): the real local server with the kiosk pages, on a fresh store, and every
    (event, result) its client was handed (fetches and unload beacons alike)."""
    client = EdgeClient(tmp_path / "store", world["package"], world["public"], device_id=DEVICE)
    received: list[tuple[dict, dict]] = []
    record = client.record

    def recording(event):
        result = record(event)
        received.append((event, result.to_dict()))
        return result

    client.record = recording  # the server calls client.record for each event of POST /events
    try:
        server = serve(client, pages_dir=REPO / "examples" / "kiosk")
    except BaseException:
        client.close()
        raise
    try:
        yield client, server, received
    finally:
        server.stop()
        client.close()


@pytest.fixture
def browser():
    """(page, posted): a headless chromium page, and the events it POSTed to /events by fetch (playwright does
    not report the beacons sent at unload)."""
    posted: list[dict] = []

    def on_request(request) -> None:
        if request.method == "POST" and request.url.endswith("/events"):
            payload = json.loads(request.post_data or "null")
            posted.extend(payload if isinstance(payload, list) else [payload])

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_binary(), headless=True, timeout=30_000
        )
        try:
            context = chromium.new_context(viewport=VIEWPORT)
            context.on("request", on_request)
            page = context.new_page()
            page.set_default_timeout(10_000)
            yield page, posted
        finally:
            chromium.close()


def wait_recs(page, after: int) -> int:
    """Wait until #recs has rendered a new answer (its update counter passed ``after``); the new counter."""
    page.wait_for_function(
        "n => { const r = document.getElementById('recs');"
        " return r !== null && r.dataset.state === 'ready' && Number(r.dataset.updates) > n; }",
        arg=after,
    )
    return int(page.get_attribute("#recs", "data-updates"))


def shown(page) -> tuple[list[dict], list[tuple[str, str, int]]]:
    """(recommendations, the tuples the model saw) as the page shows them."""
    recs = page.eval_on_selector_all(
        "#recs [data-rec-item]",
        "els => els.map(e => ({item: e.dataset.recItem, source: e.dataset.recSource, score: Number(e.dataset.recScore),"
        " href: e.querySelector('a').getAttribute('href')}))",
    )
    tuples = page.eval_on_selector_all(
        "#visit [data-activity]",
        "els => els.map(e => [e.dataset.item, e.dataset.activity, Number(e.dataset.dwell)])",
    )
    return recs, [(item, activity, int(dwell)) for item, activity, dwell in tuples]


def check_against_model(
    client, recs: list[dict], tuples: list[tuple[str, str, int]], source: str
) -> list[str]:
    """The page's items are what the device's runtime recommends for the very tuples the page shows."""
    ids = [r["item"] for r in recs]
    expected = client.recommender.recommend(tuples, k=K)
    assert ids == [r.item_id for r in expected]
    assert [r["score"] for r in recs] == pytest.approx([r.score for r in expected], rel=1e-6)
    assert len(ids) == K and len(set(ids)) == K
    assert set(ids) <= set(client.recommender.vocab.item_ids)
    assert {r["source"] for r in recs} == {source}
    assert not {item for item, _, _ in tuples} & set(ids)  # seen items are not recommended again
    return ids


def activities(tuples) -> list[tuple[str, str]]:
    return [(item, activity) for item, activity, _ in tuples]


def navigate(page, selector: str, url_part: str) -> None:
    with page.expect_navigation():
        page.click(selector)
    assert url_part in page.url, page.url


def hover_tile(page, item: str) -> None:
    """Rest the pointer on a tile past the tracker's 300 ms, then leave it: one hover event."""
    page.hover(f'#recs [data-rec-item="{item}"] a')
    page.wait_for_timeout(400)
    page.mouse.move(2, VIEWPORT["height"] - 2)
    page.wait_for_selector(f'#log li[data-type="hover"][data-item="{item}"]', state="attached")


def test_clicks_to_recommendations(kiosk, browser, tmp_path):
    client, server, received = kiosk
    page, posted = browser

    # Home: an empty session, so the panel shows the package's popularity list.
    page.goto(server.url + "/")
    wait_recs(page, 0)
    recs, tuples = shown(page)
    assert tuples == []
    home = check_against_model(client, recs, tuples, "popularity")
    hover_tile(page, home[1])

    # A tile of the home page: page_enter from "home".
    a = home[0]
    navigate(page, f'#recs [data-rec-item="{a}"] a', f"product.html?item={a}&source=home")
    assert page.get_attribute("body", "data-rib-item") == a
    wait_recs(page, 0)
    recs, tuples = shown(page)
    assert activities(tuples) == [(a, "Home2Product")]
    entered = check_against_model(client, recs, tuples, "model")
    assert entered != home  # a left the list
    entered_scores = [(r["item"], r["score"]) for r in recs]

    # Module views (the nav links scroll to them), add to cart (the page refreshes itself), a hover, a refresh.
    page.click("#to-specification")
    page.wait_for_selector('#log li[data-type="module_view"][data-module="specification"]', state="attached")
    page.wait_for_selector('#log li[data-type="scroll"]', state="attached")
    updates = int(page.get_attribute("#recs", "data-updates"))
    page.click("#cart")
    updates = wait_recs(page, updates)
    recs, tuples = shown(page)
    assert activities(tuples) == [(a, "Home2Product"), (a, "Detail_specification"), (a, "Cart")]
    carted = check_against_model(client, recs, tuples, "model")
    page.click("#to-comments")
    page.wait_for_selector('#log li[data-type="module_view"][data-module="comments"]', state="attached")
    hover_tile(page, carted[2])
    page.click("#refresh")
    wait_recs(page, updates)
    recs, tuples = shown(page)
    assert activities(tuples) == [
        (a, "Home2Product"),
        (a, "Detail_specification"),
        (a, "Cart"),
        (a, "Detail_comments"),
    ]
    check_against_model(client, recs, tuples, "model")
    assert [(r["item"], r["score"]) for r in recs] != entered_scores  # the clicks changed what the model says
    assert page.locator('#log li[data-state="refused"]').count() == 0
    assert page.locator('#log li[data-state="stored"]').count() >= 5  # enter, 2 module views, scroll, cart
    seen_a = tuples

    # A recommended tile: page_leave of a (a beacon at unload), page_enter of b from a product list.
    b = recs[0]["item"]
    navigate(page, f'#recs [data-rec-item="{b}"] a', f"product.html?item={b}&source=shop_list")
    wait_recs(page, 0)
    recs, tuples = shown(page)
    assert activities(tuples) == [*activities(seen_a), (b, "ShopList2Product")]
    on_b = check_against_model(client, recs, tuples, "model")
    screenshot = tmp_path / SCREENSHOT
    page.screenshot(path=str(screenshot))

    # The search box: page_enter of c from "search".
    c = on_b[-1]
    page.fill("#search", c)
    navigate(page, "#search-go", f"product.html?item={c}&source=search")
    wait_recs(page, 0)
    recs, tuples = shown(page)
    assert activities(tuples) == [*activities(seen_a), (b, "ShopList2Product"), (c, "SearchList2Product")]
    check_against_model(client, recs, tuples, "model")

    # Home again (page_leave of c): the home panel now follows the session too.
    navigate(page, "#home-link", server.url + "/")
    wait_recs(page, 0)
    recs, home_tuples = shown(page)
    assert home_tuples == tuples
    check_against_model(client, recs, home_tuples, "model")

    # Every event the page sent reached the device and was recorded, none dropped; page_leave went as a beacon.
    deadline = time.monotonic() + 5
    while sum(e["event_type"] == "page_leave" for e, _ in received) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    events = [event for event, _ in received]
    assert all(result["ok"] for _, result in received), received
    with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
        stats = json.load(response)["stats"]
    assert stats["recorded"] == len(events) and not [key for key in stats if key.startswith("dropped_")], (
        stats
    )
    assert posted and all(event in events for event in posted)
    assert {"page_enter", "module_view", "cart", "scroll", "hover", "page_leave"} <= {
        e["event_type"] for e in events
    }
    assert [(e["item_id"], e["page_source"]) for e in events if e["event_type"] == "page_enter"] == [
        (a, "home"),
        (b, "shop_list"),
        (c, "search"),
    ]
    assert [e["item_id"] for e in events if e["event_type"] == "page_leave"] == [a, b, c]
    assert [e["item_id"] for e in events if e["event_type"] == "cart"] == [a]
    assert len({e["session_id"] for e in events}) == 1  # one tab, one session across the pages

    target = os.environ.get("RIB_EDGE_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, Path(target) / SCREENSHOT)
    assert screenshot.stat().st_size > 10_000
