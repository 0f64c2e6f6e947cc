"""Book records from the real recordings (through the connectors' normalize path), and an
independent pandas reference of what the books daemon must store for them.

`recorded_books()` runs candlekeep.feeds.normalize over Kraken's and OKX's recorded sessions
(../shared/fixtures/exchanges_ws/cryptofeed) and keeps the BookSnapshot / BookDelta records.

`reference(records, interval_ns, widths, depth)` rebuilds every book with plain dicts (not
candlekeep.orderbook), applies the daemon's documented rules (a delta before a snapshot or after a
sequence break waits; a Kraken book is cut to the recording's subscribed depth, "book-1000", after
each delta, as Kraken's docs tell a client to, other venues' books are not cut; an output per interval
of book time with updates, at the interval's end, before the first record of a later interval),
and computes each output with pandas: top N, mid, spread, depth within 10/50/100 bps, buckets
(floor(price / width) * width, summed, over the levels within 200 bps of the mid), imbalance over 1/5/10 levels and 10/50 bps, microprice.
Floats are used only where the comparison allows a tolerance (ratios); sums and prices stay Decimal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

import pandas as pd

from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.feeds import connector_from_listing, normalize
from candlekeep.sources.exchanges.recording import read_ws
from tests.utils.fixture_server import fixtures_dir

RECORDINGS = "exchanges_ws/cryptofeed"
KRAKEN = ("kraken", "KRAKEN.0.txt", "KRAKEN.ws.50.0.txt",
          ("kraken:XMR-USD", "kraken:OMG-USD", "kraken:ETH-CHF", "kraken:BTC-CHF"))  # fmt: skip
OKX = ("okx", "OKX.0.txt", "OKX.ws.1.0.txt", ("okx:BTC-USDT",))
# Kraken's channel in the recording is "book-1000": a client truncates to it after every update
# (docs.kraken.com, "Book checksum": no delete comes for a level that falls out of scope).
SUBSCRIBED_DEPTH = {"kraken": 1000}
WIDTHS = {"kraken:XMR-USD": Decimal("1"), "kraken:OMG-USD": Decimal("0.01"), "kraken:ETH-CHF": Decimal("1"),
          "kraken:BTC-CHF": Decimal("10"), "okx:BTC-USDT": Decimal("10")}  # fmt: skip


@lru_cache(maxsize=4)
def recorded_books(snapshot_every_s: float = 60.0) -> tuple[BookSnapshot | BookDelta, ...]:
    """Book records of the Kraken and OKX recordings, each venue's in its own log order."""
    out: list[BookSnapshot | BookDelta] = []
    for venue, listing, ws, instruments in (KRAKEN, OKX):
        base = fixtures_dir() / RECORDINGS
        connector = connector_from_listing(venue, (base / listing).read_text(), list(instruments),
                                           snapshot_every_s=snapshot_every_s)  # fmt: skip
        out += [r for r in normalize(connector, read_ws(base / ws)) if isinstance(r, BookSnapshot | BookDelta)]
    return tuple(out)


@dataclass(frozen=True)
class RefOutput:
    instrument: str
    ts_ns: int
    bids: list[tuple[Decimal, Decimal]]
    asks: list[tuple[Decimal, Decimal]]
    mid: float
    spread: Decimal
    depth: dict[str, Decimal]  # "bid_10", "ask_50", ...
    buckets: dict[tuple[str, Decimal], Decimal]
    imbalance: dict[str, float | None]  # "1", "5", "10", "10bps", "50bps"
    microprice: float


def _output(instrument: str, ts_ns: int, bids: dict, asks: dict, width: Decimal, depth: int) -> RefOutput:
    b = pd.DataFrame(sorted(bids.items(), reverse=True), columns=["price", "size"])
    a = pd.DataFrame(sorted(asks.items()), columns=["price", "size"])
    best_bid, best_ask = b.price.iloc[0], a.price.iloc[0]
    mid = (best_bid + best_ask) / 2  # Decimal / int: exact at this precision for these prices
    depth_sums = {}
    for bps in (10, 50, 100):
        reach = mid * bps / 10_000
        depth_sums[f"bid_{bps}"] = b[b.price >= mid - reach]["size"].sum()
        depth_sums[f"ask_{bps}"] = a[a.price <= mid + reach]["size"].sum()
    buckets = {}
    band = mid * 200 / 10_000  # the daemon's bucket band: 200 bps of the mid, edges included
    for side, frame in (("bid", b[b.price >= mid - band]), ("ask", a[a.price <= mid + band])):
        cells = frame.assign(bucket=frame.price.map(lambda p: Decimal(math.floor(p / width)) * width))
        for bucket, size in cells.groupby("bucket")["size"].sum().items():
            buckets[(side, bucket)] = size

    def ratio(bs: Decimal, as_: Decimal) -> float | None:
        return None if bs + as_ == 0 else float(bs - as_) / float(bs + as_)

    imbalance = {str(n): ratio(b["size"].head(n).sum(), a["size"].head(n).sum()) for n in (1, 5, 10)}
    for bps in (10, 50):
        imbalance[f"{bps}bps"] = ratio(depth_sums[f"bid_{bps}"], depth_sums[f"ask_{bps}"])
    bq, aq = float(b["size"].iloc[0]), float(a["size"].iloc[0])
    micro = (float(best_bid) * aq + float(best_ask) * bq) / (bq + aq)
    return RefOutput(instrument, ts_ns, list(b.head(depth).itertuples(index=False, name=None)),
                     list(a.head(depth).itertuples(index=False, name=None)), float(mid), best_ask - best_bid,
                     depth_sums, buckets, imbalance, micro)  # fmt: skip


def reference(records: Iterable[BookSnapshot | BookDelta], interval_ns: int, widths: Mapping[str, Decimal],
              depth: int = 25) -> list[RefOutput]:  # fmt: skip
    books: dict[str, dict] = {}
    out: list[RefOutput] = []
    for r in records:
        state = books.get(r.instrument)
        k = r.ts_ns // interval_ns
        if state is not None and state["dirty"] and k > state["k"]:
            out.append(_output(r.instrument, (state["k"] + 1) * interval_ns, state["bids"], state["asks"],
                               widths[r.instrument], depth))  # fmt: skip
            state["dirty"] = False
        if isinstance(r, BookSnapshot):
            books[r.instrument] = {"bids": dict(r.bids), "asks": dict(r.asks), "seq": r.sequence, "dirty": True,
                                   "k": max(k, state["k"]) if state else k,
                                   "cut": SUBSCRIBED_DEPTH.get(r.instrument.split(":")[0])}  # fmt: skip
            continue
        if state is None:
            continue
        if r.prev_sequence is not None and state["seq"] is not None and r.prev_sequence != state["seq"]:
            books[r.instrument] = None  # type: ignore[assignment]
            continue
        for side, levels in (("bids", r.bids), ("asks", r.asks)):
            for price, size in levels:
                if size == 0:
                    state[side].pop(price, None)
                else:
                    state[side][price] = size
        cut = state["cut"]
        for side, reverse in (("bids", True), ("asks", False)):
            if cut is not None and len(state[side]) > cut:
                state[side] = dict(sorted(state[side].items(), reverse=reverse)[:cut])
        state["seq"] = r.sequence if r.sequence is not None else state["seq"]
        state["k"] = max(state["k"], k)
        state["dirty"] = True
    return out

