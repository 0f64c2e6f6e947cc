"""streaming/venues.py: venue connectors -> `ticks` and `books` through a bus producer.

The OKX recording is replayed over a loopback WebSocket into VenueFeeds; what lands on the topics is
decoded with the contract's own decoders, and a consumer rebuilding the book from `books` gets
OKX's recorded checksum after every frame (the venue's truth, recomputed test-side).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from candlekeep.bars import Disconnect, Trade
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.bus import InProcessBus
from candlekeep.messages import BOOKS, TICKS, decode_book, decode_tick_record
from candlekeep.sources.exchanges.base import SymbolMap, listing_bodies
from candlekeep.sources.exchanges.registry import symbols_from_listing
from streaming.venues import VenueFeeds, publish_record, venue_instruments
from tests.utils.exchange_replay import (
    ReferenceBook,
    ReplayServer,
    ReplaySession,
    okx_crc,
    received_frames,
    recorded,
    recording_path,
)

IDS = {"BTC-USDT": "okx:BTC-USDT", "BTC-USD-220527": "okx_futures:BTC-USD220527", "UNI-USD-SWAP": "okx_swap:UNI-USD"}


def test_split_by_venue() -> None:
    served, rest = venue_instruments(["binance:BTC-USDT", "cccagg:BTC-USD", "okx_swap:UNI-USD", "coinbase:BTC-USD"])
    assert served == {"binance": ["binance:BTC-USDT"], "okx": ["okx_swap:UNI-USD"], "coinbase": ["coinbase:BTC-USD"]}
    assert rest == ["cccagg:BTC-USD"]
    # A venue without a connector stays with CryptoCompare.
    assert venue_instruments(["bitstamp:BTC-USD"]) == ({}, ["bitstamp:BTC-USD"])


def okx_session() -> tuple[list, dict[str, list[int]], Callable[[ReplaySession], None], SymbolMap]:
    """The OKX recording's frames, its own checksums per instrument (the venue's truth), a server
    script replaying them after the subscribe, and the symbols of its listing."""
    frames = received_frames(recorded("OKX.ws.1.0.txt"))
    expected: dict[str, list[int]] = defaultdict(list)
    for f in frames:
        msg = json.loads(f)
        if msg.get("arg", {}).get("channel") == "books" and "data" in msg:
            expected[IDS[msg["arg"]["instId"]]] += [d["checksum"] for d in msg["data"]]

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(frames)

    symbols = symbols_from_listing("okx", listing_bodies(recording_path("OKX.0.txt").read_text()))
    return frames, expected, script, symbols


def test_okx_recording_reaches_ticks_and_books() -> None:
    frames, expected, script, symbols = okx_session()
    bus = InProcessBus()
    bus.ensure_topics([TICKS, BOOKS])
    producer = bus.producer(name="venues-test")
    registry = CollectorRegistry()
    with ReplayServer([script]) as server:
        feeds = VenueFeeds(list(IDS.values()) + ["cccagg:BTC-USD"], registry=registry, symbols={"okx": symbols},
                           urls={"okx": (server.url, None)}, snapshot_every_s=0,
                           runner_options={"heartbeat_every_s": 3600})  # fmt: skip
        assert feeds.unserved == ["cccagg:BTC-USD"]
        feeds.start()
        trades = books_out = 0
        deadline = time.monotonic() + 30
        for record in feeds.events():
            publish_record(producer, "", record)
            trades += isinstance(record, Trade)
            books_out += isinstance(record, BookSnapshot | BookDelta)
            if (trades >= 74 and books_out >= 290) or time.monotonic() > deadline:
                break
        feeds.stop()
    producer.flush(5)
    consumer = bus.consumer(group="check", topics=[TICKS, BOOKS])
    got = []
    while batch := consumer.poll_batch(max_records=10_000, timeout=0.5):
        got += batch
    books = [decode_book(r.value) for r in got if r.topic == BOOKS]
    ticks = [decode_tick_record(r.value) for r in got if r.topic == TICKS]
    assert all(r.key == (b.instrument) for r, b in zip([r for r in got if r.topic == BOOKS], books, strict=True))
    assert sum(isinstance(t, Trade) for t in ticks) == 74
    assert sorted(t.instrument for t in ticks if isinstance(t, Disconnect)) == sorted(IDS.values())  # at start
    seen: dict[str, list[int]] = defaultdict(list)
    rebuilt: dict[str, ReferenceBook] = {}
    for b in books:
        book = rebuilt.setdefault(b.instrument, ReferenceBook())
        book.apply(b)
        seen[b.instrument].append(okx_crc(book.sorted_bids(), book.sorted_asks()))
    assert dict(seen) == dict(expected)
    assert sum(isinstance(b, BookSnapshot) for b in books) == 3
    ok = registry.get_sample_value("candlekeep_venue_integrity_total",
                                   {"venue": "okx", "instrument": "okx:BTC-USDT", "event": "checksum_ok"})  # fmt: skip
    assert ok == len(expected["okx:BTC-USDT"])


def test_a_frame_no_connector_can_read_goes_to_deadletter_and_the_socket_reads_on() -> None:
    from candlekeep.messages import DEADLETTER
    import base64

    frames = received_frames(recorded("OKX.ws.1.0.txt"))
    broken = '{"arg":{"channel":"books","instId":"BTC-USDT"},"action":"update","data":[{"asks":[["x","1","0","1"]]}]}'
    books_at = next(i for i, f in enumerate(frames) if '"instId":"UNI-USD-SWAP"},"action":"update"' in str(f))

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(frames[:books_at] + [broken] + frames[books_at:])

    symbols = symbols_from_listing("okx", listing_bodies(recording_path("OKX.0.txt").read_text()))
    bus = InProcessBus()
    bus.ensure_topics([TICKS, BOOKS, DEADLETTER])
    producer = bus.producer(name="venues-test")
    registry = CollectorRegistry()
    with ReplayServer([script]) as server:
        feeds = VenueFeeds(list(IDS.values()), registry=registry, symbols={"okx": symbols},
                           urls={"okx": (server.url, None)}, snapshot_every_s=0)  # fmt: skip
        feeds.start()
        deadline = time.monotonic() + 30
        trades = 0
        for record in feeds.events():
            publish_record(producer, "", record)
            trades += isinstance(record, Trade)
            if trades >= 74 or time.monotonic() > deadline:
                break
        feeds.stop()
    producer.flush(5)
    consumer = bus.consumer(group="check", topics=[DEADLETTER])
    [dead] = consumer.poll_batch(max_records=10, timeout=1.0)
    body = json.loads(dead.value)
    assert base64.b64decode(body["payload"]).decode() == broken and "okx" in body["error"]
    assert trades == 74  # everything after the bad frame still arrived
    assert registry.get_sample_value("candlekeep_venue_socket_events", {"venue": "okx", "event": "bad_frames"}) == 1


def test_settings_reach_the_runners() -> None:
    from candlekeep.settings import Settings

    settings = Settings(venue_snapshot_every_s=5, venue_rest_snapshots_per_second=1.5, venue_rest_snapshot_burst=3,
                        venue_heartbeat_every_s=2)  # fmt: skip
    feeds = VenueFeeds.from_settings(settings, ["okx:BTC-USDT"])
    assert feeds.snapshot_every_s == 5
    assert feeds.runner_options == {"snapshot_rate_per_s": 1.5, "snapshot_burst": 3, "heartbeat_every_s": 2}


def test_the_producer_runs_the_venue_connectors_into_ticks_and_books() -> None:
    """streaming.producer with the venue connectors as its live source (VenueSource inside the
    CombinedSource that `make_live_source` builds for a live deployment): the OKX recording's trades
    reach `ticks` and its books `books`, where a consumer's book passes OKX's own checksum."""
    import threading

    from streaming.producer import CombinedSource, Producer, SimulatorPlayback
    from streaming.venues import VenueSource

    frames, expected, script, symbols = okx_session()
    bus = InProcessBus()
    with ReplayServer([script]) as server:
        source = VenueSource(IDS.values(), feeds=lambda ids: VenueFeeds(
            ids, symbols={"okx": symbols}, urls={"okx": (server.url, None)}, snapshot_every_s=0,
            runner_options={"heartbeat_every_s": 3600}))  # fmt: skip
        others = SimulatorPlayback(instruments=[], speed=1)  # the configured source, with nothing to play
        producer = Producer(bus, CombinedSource([(source, lambda i: i.startswith("okx")), (others, lambda i: True)]))
        thread = threading.Thread(target=producer.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while producer.registry.get_sample_value("candlekeep_producer_book_updates_total") < 290:
            assert time.monotonic() < deadline and thread.is_alive(), producer.health()
            time.sleep(0.05)
        producer.stop()
        thread.join(30)
    consumer = bus.consumer(group="check", topics=[TICKS, BOOKS])
    got = []
    while batch := consumer.poll_batch(max_records=10_000, timeout=0.5):
        got += batch
    ticks = [decode_tick_record(r.value) for r in got if r.topic == TICKS]
    assert sum(isinstance(t, Trade) for t in ticks) == 74
    seen: dict[str, list[int]] = defaultdict(list)
    rebuilt: dict[str, ReferenceBook] = {}
    for b in (decode_book(r.value) for r in got if r.topic == BOOKS):
        book = rebuilt.setdefault(b.instrument, ReferenceBook())
        book.apply(b)
        seen[b.instrument].append(okx_crc(book.sorted_bids(), book.sorted_asks()))
    assert dict(seen) == dict(expected)
    # Each instrument's log opens and closes with a disconnect (the producer's start and stop).
    for instrument in IDS.values():
        gone = [t.reason for t in ticks if isinstance(t, Disconnect) and t.instrument == instrument]
        assert gone[0] == "producer started" and gone[-1] == "producer stopped"
