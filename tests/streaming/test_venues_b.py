"""streaming/venues.py with a connectors-b venue: the Gate.io recording (WS + REST snapshots) over
loopback into VenueFeeds, through a bus producer to `ticks` and `books`, decoded with the contract's
decoders. The trades on `ticks` aggregate to the venue's own recorded 1m candles, and the books a
consumer rebuilds from `books` start from each pair's snapshot and never cross."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry

from candlekeep.bars import Interval, Trade, aggregate_trades
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.bus import InProcessBus
from candlekeep.messages import BOOKS, TICKS, decode_book, decode_tick_record
from candlekeep.sources.exchanges.base import listing_bodies
from candlekeep.sources.exchanges.recording import read_http
from candlekeep.sources.exchanges.registry import symbols_from_listing
from streaming.venues import VenueFeeds, publish_record
from tests.utils.exchange_drive import Mirror, play, sent_frames
from tests.utils.exchange_replay import ReplayServer, received_frames, recorded, recording_path
from tests.utils.fixture_server import FixtureServer, Reply


def test_gateio_recording_reaches_ticks_and_books() -> None:
    events = recorded("GATEIO.ws.1.0.txt")
    http = read_http(recording_path("GATEIO.http.0.0.txt"))
    symbols = symbols_from_listing("gateio", listing_bodies(recording_path("GATEIO.0.txt").read_text()))
    pairs = next(f for f in sent_frames(events) if f["channel"] == "spot.trades")["payload"]
    instruments = [symbols.instrument(p) for p in pairs]
    recorded_trades = sum('"spot.trades","event":"update"' in f for f in received_frames(events))

    bus = InProcessBus()
    bus.ensure_topics([TICKS, BOOKS])
    producer = bus.producer(name="venues-b-test")
    with FixtureServer() as rest, ReplayServer([play(received_frames(events))]) as ws:
        for response in http:
            split = urlsplit(response.url)
            rest.add(split.path, Reply.json(response.body), query=dict(parse_qsl(split.query)))
        feeds = VenueFeeds(instruments, registry=CollectorRegistry(), symbols={"gateio": symbols},
                           urls={"gateio": (ws.url, rest.url)}, snapshot_every_s=0,
                           runner_options={"heartbeat_every_s": 3600})  # fmt: skip
        assert feeds.unserved == []
        feeds.start()
        trades, synced = 0, set()
        deadline = time.monotonic() + 30
        for record in feeds.events():
            publish_record(producer, "", record)
            trades += isinstance(record, Trade)
            if isinstance(record, BookSnapshot):
                synced.add(record.instrument)
            if (trades >= recorded_trades and synced == set(instruments)) or time.monotonic() > deadline:
                break
        feeds.stop()
    producer.flush(5)
    consumer = bus.consumer(group="check-b", topics=[TICKS, BOOKS])
    got = []
    while batch := consumer.poll_batch(max_records=10_000, timeout=0.5):
        got += batch
    books = [decode_book(r.value) for r in got if r.topic == BOOKS]
    ticks = [t for t in (decode_tick_record(r.value) for r in got if r.topic == TICKS) if isinstance(t, Trade)]
    assert {b.instrument for b in books if isinstance(b, BookSnapshot)} == set(instruments)
    mirror = Mirror()
    for b in books:
        mirror.apply(b)
        if isinstance(b, BookDelta):
            bid, ask = mirror.best(b.instrument)
            assert bid < ask and b.verified

    # The venue's own candles: a candle frame pushed at second T (its `time`) holds the minute's
    # trades before T; each minute the recording saw whole (its first candle frame had no volume)
    # equals the trades that reached `ticks` (a trade within T's own second makes it ambiguous: skipped).
    first: dict[tuple[str, int], Decimal] = {}
    compared = 0
    for frame in received_frames(events):
        msg = json.loads(frame)
        if msg["channel"] != "spot.candlesticks" or msg["event"] != "update":
            continue
        c, pushed_ns = msg["result"], int(msg["time"]) * 1_000_000_000
        instrument, minute = symbols.instrument(c["n"].split("_", 1)[1]), int(c["t"])
        if first.setdefault((instrument, minute), Decimal(c["v"])) != 0 or Decimal(c["v"]) == 0:
            continue
        mine = [t for t in ticks if t.instrument == instrument]
        if any(pushed_ns <= t.ts_ns < pushed_ns + 1_000_000_000 for t in mine):
            continue
        (bar,) = aggregate_trades([t for t in mine if t.ts_ns < pushed_ns], Interval.M1, minute, minute + 60,
                                  instrument=instrument, source="t")  # fmt: skip
        assert (bar.open, bar.high, bar.low, bar.close, bar.quote_volume) == tuple(Decimal(c[k]) for k in "ohlcv")
        compared += 1
    assert compared >= 2
