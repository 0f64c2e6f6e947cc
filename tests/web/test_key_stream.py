"""The live stream of a key-protected API in real Chromium (enable at merge with the front door,
issue 8 item 5: `WS /v1/stream` accepting `?api_key=`; on today's main the socket is closed with
1008 "unknown parameter(s): api_key", so this test fails there, by design, rather than being skipped).

A browser cannot give a WebSocket headers: the page sends the key it was given as `?api_key=` on
the socket only, never on an HTTP URL, and the forming bar arrives as it does without keys.
"""

from __future__ import annotations

import uuid

from tests.web.conftest import SIM_INSTRUMENT, block_network, data_layer, start_api, wait_for


def test_live_stream_works_with_a_key(database_url, redis_url, port_base, web_tmp, browser, simulator) -> None:
    key = f"k-{uuid.uuid4().hex}"
    secured = start_api(database_url, redis_url, port_base, web_tmp, CANDLEKEEP_API_KEYS=key)
    page = browser.new_page()
    offline = block_network(page)
    sockets: list[str] = []
    requests: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(f"{secured.url}/#instrument={SIM_INSTRUMENT}&interval=1m")
        page.wait_for_selector("#api-key-dialog", timeout=20_000)
        page.fill("#api-key-input", key)
        page.click("#api-key-submit")
        wait_for(page, "d.chart.feed === 'live'", timeout_s=60)
        wait_for(page, "d.chart.updates > 0", timeout_s=60)
        assert any("/v1/stream" in u and f"api_key={key}" in u for u in sockets)
        assert all(key not in u for u in requests if u.startswith("http"))
        assert data_layer(page, "d.keyPrompts") == 1
        assert offline.blocked == []
    finally:
        page.close()
        secured.process.stop()
