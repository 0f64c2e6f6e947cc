"""OKX v5 replayed from the real recording (OKX.ws.1.0, 2022-05-13: books + trades of BTC-USDT,
BTC-USD-220527, UNI-USD-SWAP) through a loopback WebSocket server into the live FeedRunner.

Independent truth: OKX's own `checksum` on every recorded book frame, recomputed test-side from the
book a consumer rebuilds out of the published snapshot + deltas.
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal
from typing import Any

from candlekeep.bars import Trade, decimal_str
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.feeds import connector_from_listing, normalize, record_json
from tests.utils.exchange_replay import (
    ReferenceBook,
    ReplayServer,
    ReplaySession,
    okx_crc,
    received_frames,
    recorded,
    recording_path,
    run_live,
)

IDS = {"BTC-USDT": "okx:BTC-USDT", "BTC-USD-220527": "okx_futures:BTC-USD220527", "UNI-USD-SWAP": "okx_swap:UNI-USD"}
RECORDING = "OKX.ws.1.0.txt"


def connector(url: str, **options: Any) -> Any:
    return connector_from_listing("okx", recording_path("OKX.0.txt").read_text(), list(IDS.values()), ws_url=url,
                                  **options)  # fmt: skip


def recorded_checksums(frames: list[str | bytes]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for frame in frames:
        msg = json.loads(frame)
        if msg.get("arg", {}).get("channel") == "books" and "data" in msg:
            out[IDS[msg["arg"]["instId"]]] += [d["checksum"] for d in msg["data"]]
    return out


def consumer_checksums(records: list[Any], *, periodic: bool = True) -> dict[str, list[int]]:
    books: dict[str, ReferenceBook] = {}
    out: dict[str, list[int]] = defaultdict(list)
    for r in records:
        if isinstance(r, BookSnapshot | BookDelta):
            if periodic and isinstance(r, BookSnapshot) and r.instrument in books and books[r.instrument].bids:
                continue  # a periodic snapshot of a book we already hold: no frame of its own
            book = books.setdefault(r.instrument, ReferenceBook())
            book.apply(r)
            out[r.instrument].append(okx_crc(book.sorted_bids(), book.sorted_asks()))
    return out


def replay(frames: list[str | bytes]) -> Any:
    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(frames)

    return script


def test_every_book_frame_passes_okxs_checksum_and_trades_keep_their_digits() -> None:
    frames = received_frames(recorded(RECORDING))
    checksums = recorded_checksums(frames)
    total = sum(len(v) for v in checksums.values())
    trades_expected = [(IDS[t["instId"]], t["tradeId"], t["px"], t["sz"], t["side"])
                       for f in frames if '"channel":"trades"' in str(f) and '"data"' in str(f)
                       for t in json.loads(f)["data"]]  # fmt: skip
    assert total == 290 and len(checksums) == 3 and trades_expected

    def done(rs: list[Any]) -> bool:
        return sum(isinstance(r, BookDelta) for r in rs) >= total - 3 and sum(isinstance(r, Trade) for r in rs) >= len(
            trades_expected)

    with ReplayServer([replay(frames)]) as server:
        records, runner = run_live(connector(server.url, snapshot_every_s=0), done)
        sent = [json.loads(f) for f in server.sessions[0].received if f != "ping"]
    assert [a["channel"] for a in sent[0]["args"]] == ["books"] * 3
    assert consumer_checksums(records) == checksums
    trades = [r for r in records if isinstance(r, Trade)]
    assert [(t.instrument, t.trade_id, decimal_str(t.price), decimal_str(t.size), t.side) for t in trades] == trades_expected
    assert not any(m.get("resync") for m in runner.connector.metrics().values())


def test_a_reordered_pair_resyncs_only_that_instrument() -> None:
    frames = received_frames(recorded(RECORDING))
    books = [i for i, f in enumerate(frames) if '"instId":"BTC-USDT"},"action":"update"' in str(f)]
    a, b = books[10], books[11]
    faulty = list(frames)
    faulty[a], faulty[b] = frames[b], frames[a]
    # the true BTC-USDT book after both frames, from the untouched recording (plain dicts)
    truth = ReferenceBook()
    for f in frames[: b + 1]:
        msg = json.loads(f, parse_float=Decimal)
        if msg.get("arg", {}).get("instId") == "BTC-USDT" and msg["arg"]["channel"] == "books" and "data" in msg:
            if msg["action"] == "snapshot":
                truth.bids, truth.asks = {}, {}
            for side, key in ((truth.bids, "bids"), (truth.asks, "asks")):
                for row in msg["data"][0][key]:
                    side.pop(Decimal(row[0]), None) if Decimal(row[1]) == 0 else side.__setitem__(Decimal(row[0]), row)
    bids = [truth.bids[p] for p in sorted(truth.bids, reverse=True)]
    asks = [truth.asks[p] for p in sorted(truth.asks)]
    crc = okx_crc([(Decimal(r[0]), Decimal(r[1])) for r in bids], [(Decimal(r[0]), Decimal(r[1])) for r in asks])
    snapshot = json.dumps({"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": "snapshot",
                           "data": [{"asks": asks, "bids": bids, "ts": json.loads(frames[b])["data"][0]["ts"],
                                     "checksum": crc}]}, separators=(",", ":"))  # fmt: skip

    def script(session: ReplaySession) -> None:
        session.expect('"subscribe"')
        session.send_all(faulty[: b + 1])
        assert '"BTC-USDT"' in session.expect('"unsubscribe"')
        again = json.loads(session.expect('"subscribe"'))
        assert again["args"] == [{"channel": "books", "instId": "BTC-USDT"}]
        session.send(snapshot)
        session.send_all(faulty[b + 1 :])

    checksums = recorded_checksums(frames)
    total = sum(len(v) for v in checksums.values())
    with ReplayServer([script]) as server:
        records, runner = run_live(connector(server.url, trades=False, snapshot_every_s=0),
                                   lambda rs: sum(isinstance(r, BookDelta) for r in rs) >= total - 3 - 2)  # fmt: skip
    metrics = runner.connector.metrics()
    assert metrics["okx:BTC-USDT"]["checksum_mismatch"] == 1 and metrics["okx:BTC-USDT"]["resync"] == 1
    assert metrics["okx:BTC-USDT"]["synced"] == 2
    for other in ("okx_futures:BTC-USD220527", "okx_swap:UNI-USD"):
        assert metrics[other].get("resync", 0) == 0 and metrics[other]["checksum_ok"] == len(checksums[other])
    seen = consumer_checksums(records, periodic=False)
    spot = checksums["okx:BTC-USDT"]
    n = books.index(a) + 1  # book frames of BTC-USDT before the pair (snapshot + updates)
    assert seen["okx:BTC-USDT"][:n] == spot[:n]  # good up to the pair
    # then the resync's snapshot (checksum of the truth after both frames) and every later frame
    assert seen["okx:BTC-USDT"][n:] == [crc] + spot[n + 2 :]
    for other in ("okx_futures:BTC-USD220527", "okx_swap:UNI-USD"):
        assert seen[other] == checksums[other]


def test_feeds_normalize_equals_the_live_path() -> None:
    events = recorded(RECORDING)
    frames = received_frames(events)
    with ReplayServer([replay(frames)]) as server:
        live, _ = run_live(connector(server.url), lambda rs: sum(isinstance(r, BookDelta) for r in rs) >= 287
                           and sum(isinstance(r, Trade) for r in rs) >= 74)  # fmt: skip
    offline = list(normalize(connector("wss://unused"), events))

    def published(records: list[Any]) -> list[dict[str, Any]]:
        out = [record_json(r) for r in records if isinstance(r, BookSnapshot | BookDelta | Trade)]
        for body in out:
            body.pop("received_ns")
        return out

    assert published(live) == published(offline) and len(published(live)) >= 287 + 74 + 3


def with_sequence_ids(frames: list[str | bytes], *, zero_checksums: bool) -> list[str]:
    """The recorded frames with `seqId`/`prevSeqId` added as the OKX v5 docs define them ("Order
    book channel": a snapshot's prevSeqId is -1; an update's prevSeqId is the previous seqId;
    seqIds jump by varying steps), optionally with `checksum: 0` as OKX now sends on `books`."""
    out = []
    last: dict[str, int] = {}
    for n, frame in enumerate(frames):
        msg = json.loads(frame)
        if msg.get("arg", {}).get("channel") == "books" and "data" in msg:
            inst = msg["arg"]["instId"]
            for d in msg["data"]:
                seq = 1000 + 7 * n
                d["prevSeqId"] = -1 if msg["action"] == "snapshot" else last[inst]
                d["seqId"] = last[inst] = seq
                if zero_checksums:
                    d["checksum"] = 0
        out.append(json.dumps(msg, separators=(",", ":")))
    return out


def test_the_seq_id_chain_alone_catches_a_dropped_update_when_checksums_are_zero() -> None:
    from candlekeep.feeds import normalize as run
    from candlekeep.sources.exchanges.recording import WsEvent

    frames = with_sequence_ids(received_frames(recorded(RECORDING)), zero_checksums=True)
    books = [i for i, f in enumerate(frames) if '"instId":"UNI-USD-SWAP"},"action":"update"' in f]
    dropped = frames[: books[5]] + frames[books[5] + 1 :]
    c = connector("wss://unused")
    events = [WsEvent("open", 1, "wss://unused", None)] + [WsEvent("received", 2 + i, None, f) for i, f in enumerate(dropped)]
    records = list(run(c, events))
    m = c.metrics()
    assert m["okx_swap:UNI-USD"]["sequence_gap"] == 1 and m["okx_swap:UNI-USD"]["resync"] == 1
    assert "checksum_ok" not in m["okx_swap:UNI-USD"] and m["okx_swap:UNI-USD"]["sequence_ok"] == 5
    for other in ("okx:BTC-USDT", "okx_futures:BTC-USD220527"):
        assert m[other].get("resync", 0) == 0 and m[other]["sequence_ok"] == len(recorded_checksums(frames)[other]) - 1
    # after the gap, that instrument's later updates are held back until a new snapshot arrives
    late = [r for r in records if isinstance(r, BookDelta) and r.instrument == "okx_swap:UNI-USD"]
    assert len(late) == 5 and [r.prev_sequence for r in late[1:]] == [r.sequence for r in late[:-1]]
