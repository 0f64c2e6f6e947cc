"""Order-book throughput on the real recordings, against the JSON-decode floor measured in the same run.

    .venv/bin/python bench/books.py [--rounds 5]

(a) The pipeline: every frame of the largest book recordings (KRAKEN.ws.50.0: 4,269 updates of 10
    depth-1000 books; OKX.ws.1.0: 290 books frames of 400-level books) through the connector's
    `on_frame`: parse (Decimal from the wire), apply, verify the venue's CRC32 on every update, emit
    records. The floor is the same frames only decoded (`json.JSONDecoder(parse_float=Decimal)`).
    Target: pipeline updates/s >= 0.5 x floor, per recording; p99 latency of one update printed.
(b) The structure (how candlekeep/orderbook.py was chosen): the Kraken updates, pre-parsed, applied
    to three books with the top 10 of both sides read after each update (what the checksum reads):
    dict + bisect-sorted price list (ours), `sortedcontainers.SortedDict`, and the C `order-book`
    package (cryptofeed's author) when installed.
(c) cryptofeed's own book handling, when `cryptofeed` is installed (optional; skipped otherwise).

Exits non-zero when (a) misses its target on any recording.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from bisect import bisect_left
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from candlekeep.feeds import connector_from_listing  # noqa: E402
from candlekeep.orderbook import OrderBook  # noqa: E402
from candlekeep.sources.exchanges.recording import read_ws  # noqa: E402

FIXTURES = Path(__import__("os").environ.get("CANDLEKEEP_FIXTURES_DIR", ROOT.parent / "shared" / "fixtures"))
RECORDINGS = FIXTURES / "exchanges_ws" / "cryptofeed"
TARGET = 0.5

KRAKEN_IDS = ["kraken:WAVES-EUR", "kraken:XMR-USD", "kraken:KSM-BTC", "kraken:GRT-ETH", "kraken:SC-EUR",
              "kraken:ETH-CHF", "kraken:OCEAN-BTC", "kraken:OMG-USD", "kraken:BTC-CHF", "kraken:ADA-BTC"]  # fmt: skip
OKX_IDS = ["okx:BTC-USDT", "okx_futures:BTC-USD220527", "okx_swap:UNI-USD"]


def frames(name: str) -> list[str]:
    return [e.data for e in read_ws(RECORDINGS / name) if e.kind == "received" and isinstance(e.data, str)]


def is_update(frame: str, venue: str) -> bool:
    if venue == "kraken":
        return frame.startswith("[") and '"book-' in frame
    return '"channel":"books"' in frame and '"data"' in frame


# --- (a) pipeline vs decode floor ----------------------------------------------------------------


def pipeline(venue: str, recording: str, listing: str, ids: list[str], rounds: int
             ) -> tuple[float, float, float, float, int]:  # fmt: skip
    data = frames(recording)
    books = [f for f in data if is_update(f, venue)]
    listing_text = (RECORDINGS / listing).read_text()
    best_floor = best_loads = best_pipe = float("inf")
    latencies: list[int] = []
    for _ in range(rounds):
        decode = json.JSONDecoder(parse_float=Decimal).decode  # the fastest exact decode: built once
        start = time.perf_counter()
        for frame in books:
            decode(frame)
        best_floor = min(best_floor, time.perf_counter() - start)
        start = time.perf_counter()
        for frame in books:  # json.loads(parse_float=Decimal) as usually written: a decoder per call
            json.loads(frame, parse_float=Decimal)
        best_loads = min(best_loads, time.perf_counter() - start)

        connector = connector_from_listing(venue, listing_text, ids, trades=False)
        for spec in connector.connections():
            connector.on_open(spec.key, 0)
        conn = connector.connections()[0].key
        lat: list[int] = []
        clock = time.perf_counter_ns
        start = time.perf_counter()
        for frame in books:
            t0 = clock()
            connector.on_frame(conn, frame, 0)
            lat.append(clock() - t0)
        elapsed = time.perf_counter() - start
        if elapsed < best_pipe:
            best_pipe, latencies = elapsed, lat
        problems = {k: v for k, v in connector.counters.items() if k[1] in ("checksum_mismatch", "resync")}
        assert not problems, problems
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] / 1000
    return len(books) / best_floor, len(books) / best_loads, len(books) / best_pipe, p99, len(books)


# --- (b) structures ------------------------------------------------------------------------------


def kraken_ops() -> list[tuple[str, list[tuple[bool, Decimal, Decimal]], bool]]:
    """(pair, [(is_bid, price, size)], is_snapshot) per book frame, parsed once."""
    out = []
    for frame in frames("KRAKEN.ws.50.0.txt"):
        if not is_update(frame, "kraken"):
            continue
        msg = json.loads(frame)
        ops = []
        snapshot = False
        for part in msg[1:-2]:
            for key in ("as", "a", "bs", "b"):
                snapshot |= key in ("as", "bs") and key in part
                ops += [(key.startswith("b"), Decimal(r[0]), Decimal(r[1])) for r in part.get(key, ())]
        out.append((msg[-1], ops, snapshot))
    return out


class SortedDictBook:
    def __init__(self) -> None:
        from sortedcontainers import SortedDict

        self.bids = SortedDict()
        self.asks = SortedDict()

    def set(self, is_bid: bool, price: Decimal, size: Decimal) -> None:
        side = self.bids if is_bid else self.asks
        if size == 0:
            side.pop(price, None)
        else:
            side[price] = size

    def top(self, n: int) -> tuple[list, list]:
        bids = self.bids
        asks = self.asks
        nb, na = len(bids), len(asks)
        return ([bids.peekitem(-1 - i) for i in range(min(n, nb))], [asks.peekitem(i) for i in range(min(n, na))])

    def truncate(self, depth: int) -> None:
        while len(self.bids) > depth:
            self.bids.popitem(0)
        while len(self.asks) > depth:
            self.asks.popitem(-1)


class OursBook:
    def __init__(self) -> None:
        self.book = OrderBook("bench:A-B", 1000)

    def set(self, is_bid: bool, price: Decimal, size: Decimal) -> None:
        (self.book.set_bid if is_bid else self.book.set_ask)(price, size)

    def top(self, n: int) -> tuple:
        return self.book.top(n)

    def truncate(self, depth: int) -> None:
        self.book.truncate(depth)


class COrderBook:
    def __init__(self) -> None:
        from order_book import OrderBook as C

        self.book = C(max_depth=1000)

    def set(self, is_bid: bool, price: Decimal, size: Decimal) -> None:
        side = self.book.bids if is_bid else self.book.asks
        if size == 0:
            if price in side:
                del side[price]
        else:
            side[price] = size

    def top(self, n: int) -> tuple:
        bids, asks = self.book.bids, self.book.asks
        return ([bids.index(i) for i in range(min(n, len(bids)))], [asks.index(i) for i in range(min(n, len(asks)))])

    def truncate(self, depth: int) -> None:
        pass  # max_depth truncates on insert


def structure(factory: Any, ops: list, rounds: int) -> float:
    count = sum(len(o) for _, o, _ in ops)
    best = float("inf")
    for _ in range(rounds):
        books: dict[str, Any] = {}
        start = time.perf_counter()
        for pair, updates, snapshot in ops:
            if snapshot or pair not in books:
                books[pair] = factory()
            book = books[pair]
            for is_bid, price, size in updates:
                book.set(is_bid, price, size)
            book.truncate(1000)
            book.top(10)
        best = min(best, time.perf_counter() - start)
    return count / best


def bisect_check() -> None:
    assert bisect_left([Decimal(1), Decimal(2)], Decimal("1.5")) == 1


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ok = True
    print("(a) parse + apply + verify every update vs JSONDecoder(parse_float=Decimal) of the same frames")
    for venue, recording, listing, ids in (("kraken", "KRAKEN.ws.50.0.txt", "KRAKEN.0.txt", KRAKEN_IDS),
                                           ("okx", "OKX.ws.1.0.txt", "OKX.0.txt", OKX_IDS)):  # fmt: skip
        floor, loads, pipe, p99, n = pipeline(venue, recording, listing, ids, args.rounds)
        ratio = pipe / floor
        verdict = "ok" if ratio >= TARGET else f"MISS (target >= {TARGET})"
        ok &= ratio >= TARGET
        print(f"  {recording:20s} {n:5d} updates  floor {floor:10,.0f}/s  pipeline {pipe:10,.0f}/s  "
              f"ratio {ratio:.2f} {verdict}  p99 {p99:,.0f} us/update")  # fmt: skip
        print(f"  {'':20s} {'':13s} (json.loads per call: {loads:10,.0f}/s, pipeline/that {pipe / loads:.2f})")
    print("(b) book structures: Kraken updates applied, top 10 of both sides read after each (levels/s)")
    ops = kraken_ops()
    candidates: list[tuple[str, Any]] = [("dict + bisect (candlekeep.orderbook)", OursBook),
                                         ("sortedcontainers.SortedDict", SortedDictBook)]  # fmt: skip
    try:
        import order_book  # noqa: F401

        candidates.append(("order-book (C, PyPI)", COrderBook))
    except ImportError:
        print("  order-book not installed (pip install order-book) - skipped")
    for name, factory in candidates:
        print(f"  {name:40s} {structure(factory, ops, args.rounds):12,.0f} levels/s")
    print("(c) cryptofeed's own book handling")
    try:
        import cryptofeed  # noqa: F401

        print("  cryptofeed is installed, but replaying its feed classes needs its network stack; not measured")
    except ImportError:
        print("  cryptofeed not installed - skipped (optional)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
