"""Kraken v1 replayed from the real recordings (KRAKEN.ws.50.0 book, KRAKEN.ws.48.0 trades) through a
loopback WebSocket server into the live FeedRunner + KrakenConnector.

Independent truth: Kraken's own CRC32 (`c`) of every recorded update frame. The book a consumer
rebuilds from the published snapshot + deltas (plain dicts, truncated to the depth) must give that
checksum after every update, with our test-side implementation of the documented rule.
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from typing import Any

from candlekeep.bars import Disconnect, Trade, decimal_str
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.feeds import connector_from_listing, normalize, record_json
from candlekeep.sources.exchanges.base import IntegrityEvent
from candlekeep.sources.exchanges.kraken import KrakenConnector
from candlekeep.sources.exchanges.live import STARTED
from tests.utils.exchange_replay import (
    ReferenceBook,
    ReplayServer,
    ReplaySession,
    kraken_crc,
    received_frames,
    recorded,
    recording_path,
    run_live,
)

PAIRS = ["WAVES/EUR", "XMR/USD", "KSM/XBT", "GRT/ETH", "SC/EUR", "ETH/CHF", "OCEAN/XBT", "OMG/USD", "XBT/CHF", "ADA/XBT"]
INSTRUMENTS = ["kraken:WAVES-EUR", "kraken:XMR-USD", "kraken:KSM-BTC", "kraken:GRT-ETH", "kraken:SC-EUR",
               "kraken:ETH-CHF", "kraken:OCEAN-BTC", "kraken:OMG-USD", "kraken:BTC-CHF", "kraken:ADA-BTC"]  # fmt: skip
BOOK = "KRAKEN.ws.50.0.txt"
TRADES = "KRAKEN.ws.48.0.txt"


def connector(url: str, **options: Any) -> KrakenConnector:
    c = connector_from_listing("kraken", recording_path("KRAKEN.0.txt").read_text(), INSTRUMENTS, ws_url=url,
                               **options)  # fmt: skip
    assert isinstance(c, KrakenConnector)
    return c


def recorded_checksums(frames: list[str | bytes]) -> dict[str, list[int]]:
    """pair -> the venue's checksum of each update frame, in order (read straight from the JSON)."""
    out: dict[str, list[int]] = defaultdict(list)
    for frame in frames:
        msg = json.loads(frame)
        if isinstance(msg, list) and str(msg[-2]).startswith("book"):
            c = next((part["c"] for part in msg[1:-2] if "c" in part), None)
            if c is not None:
                out[msg[-1]].append(int(c))
    return out


def instrument_of(pair: str) -> str:
    return INSTRUMENTS[PAIRS.index(pair)]


def assert_books_match_venue_checksums(records: list[Any], checksums: dict[str, list[int]]) -> None:
    books: dict[str, ReferenceBook] = {}
    seen: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if isinstance(r, BookSnapshot):
            books[r.instrument] = ReferenceBook(depth=1000)
            books[r.instrument].apply(r)
        elif isinstance(r, BookDelta):
            book = books[r.instrument]
            book.apply(r)
            seen[r.instrument].append(kraken_crc(book.sorted_bids(), book.sorted_asks()))
    for pair, venue_sums in checksums.items():
        assert seen[instrument_of(pair)] == venue_sums, pair


def subscribe_then_replay(frames: list[str | bytes]) -> Any:
    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(frames)

    return script


def test_every_replayed_book_update_passes_krakens_checksum() -> None:
    frames = received_frames(recorded(BOOK))
    checksums = recorded_checksums(frames)
    total = sum(len(v) for v in checksums.values())
    assert total > 4000 and len(checksums) == 10
    with ReplayServer([subscribe_then_replay(frames)]) as server:
        records, runner = run_live(connector(server.url, trades=False),
                                   lambda rs: sum(isinstance(r, BookDelta) for r in rs) >= total, timeout=120)  # fmt: skip
        subscribe = json.loads(server.sessions[0].received[0])
    assert subscribe == {"event": "subscribe", "pair": PAIRS, "subscription": {"name": "book", "depth": 1000}}
    assert_books_match_venue_checksums(records, checksums)
    assert all(r.verified for r in records if isinstance(r, BookDelta | BookSnapshot))
    metrics = runner.connector.metrics()
    assert sum(m.get("checksum_ok", 0) for m in metrics.values()) == total
    assert not any(m.get("checksum_mismatch") or m.get("resync") for m in metrics.values())


def test_trades_keep_the_wire_digits_and_the_taker_side() -> None:
    frames = received_frames(recorded(TRADES))
    expected = []  # straight from the JSON, independently of the connector
    for frame in frames:
        msg = json.loads(frame)
        if isinstance(msg, list) and msg[-2] == "trade":
            expected += [(instrument_of(msg[-1]), row[0], row[1], {"b": "buy", "s": "sell"}[row[3]]) for row in msg[1]]
    assert expected
    with ReplayServer([subscribe_then_replay(frames)]) as server:
        records, _ = run_live(connector(server.url, books=False),
                              lambda rs: sum(isinstance(r, Trade) for r in rs) >= len(expected))  # fmt: skip
    trades = [r for r in records if isinstance(r, Trade)]
    assert [(t.instrument, decimal_str(t.price), decimal_str(t.size), t.side) for t in trades] == expected
    assert trades[0].ts_ns == 1618678142_557535000 and trades[0].price == Decimal("354.11000000")
    assert len({t.trade_id for t in trades}) == len(trades)


def corrupt_checksum(frames: list[str | bytes], pair: str, nth: int) -> tuple[list[str | bytes], int]:
    """The frames with the `nth` update of `pair` carrying a wrong checksum; its index."""
    out = list(frames)
    seen = 0
    for i, frame in enumerate(frames):
        msg = json.loads(frame)
        if isinstance(msg, list) and msg[-1] == pair and any("c" in p for p in msg[1:-2]):
            seen += 1
            if seen == nth:
                for part in msg[1:-2]:
                    if "c" in part:
                        part["c"] = str((int(part["c"]) + 1) % 2**32)
                out[i] = json.dumps(msg, separators=(",", ":"))
                return out, i
    raise AssertionError("no such update")


def true_snapshot_frame(frames: list[str | bytes], pair: str, upto: int) -> str:
    """A Kraken snapshot frame (the recorded shape) of `pair`'s true book after frames[:upto+1],
    rebuilt from the untouched recording with plain dicts."""
    book = ReferenceBook(depth=1000)
    channel = None
    for frame in frames[: upto + 1]:
        msg = json.loads(frame, parse_float=Decimal)
        if not (isinstance(msg, list) and msg[-1] == pair and str(msg[-2]).startswith("book")):
            continue
        channel = msg[0]
        for part in msg[1:-2]:
            if "as" in part or "bs" in part:
                book.bids, book.asks = {}, {}
            for key, side in (("as", book.asks), ("a", book.asks), ("bs", book.bids), ("b", book.bids)):
                for row in part.get(key, ()):
                    if Decimal(row[1]) == 0:
                        side.pop(Decimal(row[0]), None)
                    else:
                        side[Decimal(row[0])] = (row[1], row[2])
        if len(book.bids) > 1000:
            book.bids = dict(sorted(book.bids.items(), reverse=True)[:1000])
        if len(book.asks) > 1000:
            book.asks = dict(sorted(book.asks.items())[:1000])
    asks = [[f"{p:f}", v, t] for p, (v, t) in sorted(book.asks.items())]
    bids = [[f"{p:f}", v, t] for p, (v, t) in sorted(book.bids.items(), reverse=True)]
    return json.dumps([channel, {"as": asks, "bs": bids}, "book-1000", pair], separators=(",", ":"))


def test_a_corrupted_checksum_resyncs_only_that_pair() -> None:
    frames = received_frames(recorded(BOOK))
    checksums = recorded_checksums(frames)
    faulty, at = corrupt_checksum(frames, "SC/EUR", 5)

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(faulty[: at + 1])
        session.expect('"unsubscribe"')
        again = json.loads(session.expect('"subscribe"'))
        assert again["pair"] == ["SC/EUR"]
        session.send(true_snapshot_frame(frames, "SC/EUR", at))
        session.send_all(faulty[at + 1 :])

    total = sum(len(v) for v in checksums.values())
    with ReplayServer([script]) as server:
        records, runner = run_live(connector(server.url, trades=False),
                                   lambda rs: sum(isinstance(r, BookDelta) for r in rs) >= total - 1, timeout=120)  # fmt: skip
        sent = [json.loads(f) for f in server.sessions[0].received]
    assert [f["event"] for f in sent if f["event"] != "ping"] == ["subscribe", "unsubscribe", "subscribe"]
    assert sent[1]["pair"] == ["SC/EUR"]
    metrics = runner.connector.metrics()
    sc = metrics.pop("kraken:SC-EUR")
    assert sc["checksum_mismatch"] == 1 and sc["resync"] == 1 and sc["synced"] == 2
    assert sc["checksum_ok"] == len(checksums["SC/EUR"]) - 1
    for instrument, m in metrics.items():  # the nine others never noticed
        assert m.get("resync", 0) == 0 and m.get("synced") == 1, instrument
        assert m["checksum_ok"] == len(checksums[PAIRS[INSTRUMENTS.index(instrument)]])
    # the published SC/EUR stream, rebuilt by a consumer, passes the venue's checksum after the resync
    sc_checks = checksums["SC/EUR"]
    healed = {p: (v if p != "SC/EUR" else v[:4] + v[5:]) for p, v in checksums.items()}
    assert_books_match_venue_checksums(records, healed)
    assert len(sc_checks) > 6
    events = [r for r in records if isinstance(r, IntegrityEvent) and r.instrument == "kraken:SC-EUR"
              and r.kind in ("checksum_mismatch", "resync")]  # fmt: skip
    assert [e.kind for e in events] == ["checksum_mismatch", "resync"]


def lost(record: Any) -> bool:
    return isinstance(record, Disconnect) and record.reason != STARTED


def test_a_forced_disconnect_reconnects_resubscribes_and_resnapshots() -> None:
    frames = received_frames(recorded(BOOK))
    total = sum(len(v) for v in recorded_checksums(frames).values())

    def first(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(frames[:600])
        session.drop()

    with ReplayServer([first, subscribe_then_replay(frames)]) as server:
        records, runner = run_live(
            connector(server.url, trades=False),
            lambda rs: sum(isinstance(r, BookDelta) for r in rs[next((i for i, r in enumerate(rs)
                                                                       if lost(r)), len(rs)):]) >= total,
            timeout=120,
        )  # fmt: skip
        assert len(server.sessions) == 2
        resubscribed = json.loads(server.sessions[1].received[0])
    assert resubscribed["event"] == "subscribe" and resubscribed["pair"] == PAIRS
    cut = next(i for i, r in enumerate(records) if lost(r))
    gone = [r for r in records if lost(r)]
    started = [r for r in records[:cut] if isinstance(r, Disconnect)]
    assert sorted(d.instrument for d in started) == sorted(INSTRUMENTS) and records[: len(started)] == started
    assert sorted(d.instrument for d in gone) == sorted(INSTRUMENTS)
    after = records[cut:]
    assert {r.instrument for r in after if isinstance(r, BookSnapshot)} == set(INSTRUMENTS)
    assert_books_match_venue_checksums(after, recorded_checksums(frames))
    assert runner.stats["connects"] == 2 and runner.stats["disconnects"] == 1


def test_feeds_normalize_equals_the_live_path() -> None:
    events = recorded(BOOK)
    frames = received_frames(events)
    total = sum(len(v) for v in recorded_checksums(frames).values())
    with ReplayServer([subscribe_then_replay(frames)]) as server:
        live, _ = run_live(connector(server.url, trades=False),
                           lambda rs: sum(isinstance(r, BookDelta) for r in rs) >= total, timeout=120)  # fmt: skip
    offline = list(normalize(connector("wss://unused"), events))

    def published(records: list[Any]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            if isinstance(r, BookSnapshot | BookDelta | Trade):
                body = record_json(r)
                body.pop("received_ns")
                out.append(body)
        return out

    assert published(live) == published(offline)
    assert len(published(live)) == total + 10 + sum(1 for r in live if isinstance(r, BookSnapshot)) - 10
