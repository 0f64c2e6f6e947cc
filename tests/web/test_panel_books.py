"""The order-book panel and heatmap in real Chromium against issue 11's routes (`/v1/book`,
`/v1/book/consolidated`, `/v1/heatmap` and `WS /v1/book/stream`), fed by the books daemon of
`stream all` and the simulator's L2 books.

Checked against the API's own answers, read here independently of the page: every settled stored
second of the heatmap is a column with exactly the API's painted buckets, the canvas is lit, the
spread shown is the exact difference of the best ask and bid, and each venue of the consolidated
book is listed with its age.
"""

from __future__ import annotations

import json
import time
import urllib.error
from collections import Counter
from decimal import Decimal

from tests.utils.wait import eventually
from tests.web.conftest import SIM_INSTRUMENT, Api, data_layer, shot, wait_for

SETTLED_S = 10  # a stored second older than this has its last output written (the books daemon's 1 s)


def _book(api: Api) -> dict | None:
    """`/v1/book`, or None while nothing is stored yet (a 404 until the books daemon's first output)."""
    try:
        return json.loads(api.get(f"/v1/book?instrument={SIM_INSTRUMENT}&depth=5"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def _settled_points(api: Api) -> bool:
    now = int(time.time())
    answer = json.loads(api.get(f"/v1/heatmap?instrument={SIM_INSTRUMENT}&start={now - 600}&end={now}&resolution=1s"))
    return any(t // 1000 < now - SETTLED_S - 2 for t, *_ in answer["slices"])


def test_heatmap_paints_the_stored_buckets_and_the_book_shows_spread_and_venues(api, simulator, page) -> None:
    page, _ = page
    # the books daemon has stored a live book, and buckets of seconds that have settled
    eventually(lambda: (_book(api) or {}).get("bids"), timeout=60, what="a live book")
    eventually(lambda: _settled_points(api), timeout=60, what="settled heatmap buckets")
    page.goto(f"{api.url}/#instrument={SIM_INSTRUMENT}&interval=1m")
    wait_for(page, "d.heatmap.range !== null && d.heatmap.cells > 0", timeout_s=30)
    rng = data_layer(page, "d.heatmap.range")
    answer = json.loads(api.get(f"/v1/heatmap?instrument={SIM_INSTRUMENT}&start={rng['start']}&end={rng['end']}&resolution=1s"))
    assert answer["columns"] == ["t_ms", "side", "prices", "sizes", "intensities"]
    # painted rows per stored second: the distinct prices with an intensity (a bucket can hold a
    # bid and an ask), counted from the API's rows, not by the page's code
    painted = {(t, price) for t, _, prices, _, levels in answer["slices"]
               for price, i in zip(prices, levels, strict=True) if Decimal(i) > 0}  # fmt: skip
    truth = Counter(t // 1000 for t, price in painted)
    drawn = dict(map(tuple, data_layer(page, "d.heatmap.storedColumns")))
    settled = rng["end"] - SETTLED_S
    assert sum(n for t, n in truth.items() if t < settled) > 0
    assert {t: n for t, n in drawn.items() if t < settled} == {t: n for t, n in truth.items() if t < settled}
    assert data_layer(page, "d.heatmap.cells") >= sum(drawn.values())  # live columns add more
    lit = page.evaluate("""() => { const c = document.getElementById('heatmap-canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] > 90) n++; return n; }""")
    assert lit > 500  # pixels brighter than the background ramp's floor

    wait_for(page, "d.book.book && d.book.book.bids.length > 0", timeout_s=20)
    # the book and the panel's text in one turn of the page's event loop (the live stream replaces both)
    shown, text = page.evaluate("() => [window.__candlekeep.book.book, document.getElementById('panel-book').textContent]")
    assert Decimal(shown["spread"]) == Decimal(shown["asks"][0]["price"]) - Decimal(shown["bids"][0]["price"])
    truth_book = _book(api)
    assert Decimal(truth_book["asks"][0][0]) > Decimal(truth_book["bids"][0][0])
    assert f"spread {shown['spread']}" in text
    assert "imb 1/5/10" in text

    wait_for(page, "d.book.consolidated !== null", timeout_s=20)
    venues = data_layer(page, "d.book.consolidated.venues")
    assert SIM_INSTRUMENT in [v["instrument"] for v in venues]
    text = page.locator("#panel-book .consolidated").text_content()
    for v in venues:
        assert v["instrument"] in text
    wait_for(page, "d.heatmap.slices > 0", timeout_s=10)
    slices_before = data_layer(page, "d.heatmap.slices")
    wait_for(page, f"d.heatmap.slices > {slices_before}", timeout_s=15)  # live columns appended
    shot(page, "#panel-heatmap", "heatmap.png")
    shot(page, "#panel-book", "book.png")
