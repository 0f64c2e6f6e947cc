"""Order-book analytics: pure functions over sorted L2 levels. No I/O, no clock, exact Decimals.

    summary = summarize(bids, asks, depth=25)        # top N, mid, spread, depth within 10/50/100 bps
    metrics = book_metrics(bids, asks)               # imbalance 1/5/10 levels and 10/50 bps, weighted mid, microprice
    buckets = price_buckets(bids, width)             # ((bucket price, summed size), ...)
    points = heatmap_slice(ts_ns, bid_buckets, ask_buckets)   # intensity 0..1, normalized in this slice
    book = consolidate("BTC-USD", venue_books, now_ns=..., stale_ns=..., width=...)

Levels are `(price, size)` tuples of `Decimal` (candlekeep.books.Level): bids sorted by price
descending, asks ascending, sizes positive (what an L2 book holds). Times are book time (ns from
the records), passed in: nothing here reads a clock.

Arithmetic. Sums, differences, products and halvings are exact (candlekeep.bars.EXACT traps any
rounding). Divisions that do not terminate are rounded, each where documented: the imbalances, the
weighted mid and the microprice in `RATIO` (28 significant digits, ROUND_HALF_EVEN); the heatmap
intensities to 6 decimal places, half up (`intensity`). The mid, `(best bid + best ask) / 2`, is exact.

Bucket rule (one rule, both sides): the bucket of `price` for width `w` is `floor(price / w) * w`,
the half-open interval `[k*w, (k+1)*w)`. A price exactly on an edge `k*w` belongs to the bucket it
opens (`k*w`), never to the one below, whether it is a bid or an ask. Computed exactly with Decimal
integer division, so `60000.00` with `w = 10` is bucket `60000`, and `59999.99` is bucket `59990`.

Depth within `b` bps of the mid counts levels with `mid - mid*b/10000 <= bid price` and
`ask price <= mid + mid*b/10000`, both edges included, exactly.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import takewhile

from candlekeep.bars import EXACT, decimal_str
from candlekeep.books import Level
from candlekeep.instruments import Instrument

RATIO = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation])
DEPTH_BPS = (10, 50, 100)
IMBALANCE_LEVELS = (1, 5, 10)
IMBALANCE_BPS = (10, 50)
WEIGHTED_MID_LEVELS = 5
_BPS = Decimal(10_000)
_ZERO = Decimal(0)
_TWO = Decimal(2)


class AnalyticsError(ValueError):
    """Input the analytics cannot work on (a width that is not positive, a bad pair); says why."""


# --- one book -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BookSummary:
    """What `book_snapshots` stores: the top N levels, mid, spread, depth within 10/50/100 bps."""

    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    mid: Decimal | None  # None when a side is empty
    spread: Decimal | None
    bid_depth: dict[int, Decimal]  # bps -> summed bid size within that distance of the mid
    ask_depth: dict[int, Decimal]


@dataclass(frozen=True, slots=True)
class BookMetrics:
    """What `book_metrics` stores. Imbalance is (bid - ask) / (bid + ask) in [-1, 1], None if both are 0."""

    imbalance_levels: dict[int, Decimal | None]  # top N levels per side -> imbalance
    imbalance_bps: dict[int, Decimal | None]  # within N bps of the mid -> imbalance
    weighted_mid: Decimal | None
    microprice: Decimal | None


def mid_price(bids: Sequence[Level], asks: Sequence[Level]) -> Decimal | None:
    """(best bid + best ask) / 2, exact; None when a side is empty."""
    if not bids or not asks:
        return None
    with decimal.localcontext(EXACT):
        return (bids[0][0] + asks[0][0]) / _TWO


def spread(bids: Sequence[Level], asks: Sequence[Level]) -> Decimal | None:
    """best ask - best bid, exact (negative for a crossed book); None when a side is empty."""
    if not bids or not asks:
        return None
    with decimal.localcontext(EXACT):
        return asks[0][0] - bids[0][0]


def depth_within(bids: Sequence[Level], asks: Sequence[Level], mid: Decimal, bps: int) -> tuple[Decimal, Decimal]:
    """(bid size, ask size) of the levels within `bps` basis points of `mid`, edges included, exact."""
    with decimal.localcontext(EXACT):
        reach = mid * bps / _BPS  # exact: dividing by 10^4 only shifts the exponent
        low, high = mid - reach, mid + reach
        bid = sum((s for _, s in takewhile(lambda level: level[0] >= low, bids)), _ZERO)  # sorted: stop at the edge
        ask = sum((s for _, s in takewhile(lambda level: level[0] <= high, asks)), _ZERO)
    return bid, ask


def within(bids: Sequence[Level], asks: Sequence[Level], mid: Decimal | None,
           bps: int) -> tuple[Sequence[Level], Sequence[Level]]:  # fmt: skip
    """The levels within `bps` of `mid`, edges included, exactly (all of them when `mid` is None)."""
    if mid is None:
        return bids, asks
    with decimal.localcontext(EXACT):
        reach = mid * bps / _BPS
        low, high = mid - reach, mid + reach
    return list(takewhile(lambda lv: lv[0] >= low, bids)), list(takewhile(lambda lv: lv[0] <= high, asks))


def summarize(bids: Sequence[Level], asks: Sequence[Level], *, depth: int = 25,
              depth_bps: Iterable[int] = DEPTH_BPS) -> BookSummary:  # fmt: skip
    """The top `depth` levels per side, mid, spread and depth within `depth_bps` of the whole book."""
    if depth < 1:
        raise AnalyticsError("depth must be at least 1")
    mid = mid_price(bids, asks)
    bid_depth: dict[int, Decimal] = {}
    ask_depth: dict[int, Decimal] = {}
    for bps in depth_bps:
        if mid is None:
            bid_depth[bps] = ask_depth[bps] = _ZERO
        else:
            bid_depth[bps], ask_depth[bps] = depth_within(bids, asks, mid, bps)
    return BookSummary(tuple(bids[:depth]), tuple(asks[:depth]), mid, spread(bids, asks), bid_depth, ask_depth)


def imbalance(bid_size: Decimal, ask_size: Decimal) -> Decimal | None:
    """(bid - ask) / (bid + ask), rounded in RATIO (28 significant digits, half even); None if both 0."""
    with decimal.localcontext(EXACT):
        total = bid_size + ask_size
        diff = bid_size - ask_size
    if total == 0:
        return None
    return RATIO.divide(diff, total)


def _top(levels: Sequence[Level], n: int) -> tuple[Decimal, Decimal]:
    """(summed size, summed price * size) of the top `n` levels, exact."""
    with decimal.localcontext(EXACT):
        size = notional = _ZERO
        for price, qty in levels[:n]:
            size += qty
            notional += price * qty
    return size, notional


def book_metrics(bids: Sequence[Level], asks: Sequence[Level], *, levels: Iterable[int] = IMBALANCE_LEVELS,
                 bps: Iterable[int] = IMBALANCE_BPS,
                 weighted_levels: int = WEIGHTED_MID_LEVELS) -> BookMetrics:  # fmt: skip
    """Imbalance over the top N levels and within N bps, the weighted mid and the microprice.

    - microprice (Stoikov): `(bid1 * ask_size1 + ask1 * bid_size1) / (bid_size1 + ask_size1)`, the
      mid pulled toward the side with less size at the touch;
    - weighted mid: the same weighting one level deeper in meaning, over the top `weighted_levels`
      (5) levels: `(vwap_bid * ask_size + vwap_ask * bid_size) / (bid_size + ask_size)` where
      `vwap_*` are the size-weighted prices and `*_size` the summed sizes of those levels.
    Each is one division rounded in RATIO (28 significant digits, half even); numerators are exact.
    Imbalances are rounded as `imbalance` says. None where a side is empty.
    """
    by_levels = {}
    for n in levels:
        by_levels[n] = imbalance(_top(bids, n)[0], _top(asks, n)[0])
    mid = mid_price(bids, asks)
    by_bps: dict[int, Decimal | None] = {}
    for b in bps:
        by_bps[b] = None if mid is None else imbalance(*depth_within(bids, asks, mid, b))
    if mid is None:
        return BookMetrics(by_levels, by_bps, None, None)
    with decimal.localcontext(EXACT):
        (bp, bq), (ap, aq) = bids[0], asks[0]
        micro_num = bp * aq + ap * bq
        micro_den = bq + aq
        bsize, bnotional = _top(bids, weighted_levels)
        asize, anotional = _top(asks, weighted_levels)
        # vwap_bid * asize + vwap_ask * bsize = (bnotional * asize^2 + anotional * bsize^2) / (bsize * asize)
        wm_num = bnotional * asize * asize + anotional * bsize * bsize
        wm_den = bsize * asize * (bsize + asize)
    return BookMetrics(by_levels, by_bps, RATIO.divide(wm_num, wm_den), RATIO.divide(micro_num, micro_den))


# --- buckets and the heatmap ------------------------------------------------------------------------


def bucket_of(price: Decimal, width: Decimal) -> Decimal:
    """The bucket `floor(price / width) * width` (module doc: an edge opens its bucket), exact."""
    if not width > 0:
        raise AnalyticsError(f"bucket width must be positive, not {width}")
    with decimal.localcontext(EXACT):
        return (price // width) * width  # prices are positive: truncation is floor


def price_buckets(levels: Iterable[Level], width: Decimal) -> tuple[Level, ...]:
    """Sizes summed per bucket, sorted by bucket price ascending; exact."""
    if not width > 0:
        raise AnalyticsError(f"bucket width must be positive, not {width}")
    sums: dict[Decimal, Decimal] = {}
    with decimal.localcontext(EXACT):
        for price, size in levels:
            key = (price // width) * width
            sums[key] = sums.get(key, _ZERO) + size
    return tuple(sorted(sums.items()))


def default_bucket_width(price: Decimal) -> Decimal:
    """A bucket width sized to the price: the power of ten at or below `price / 2000` (5 to 50 bps of
    the price), at least 1e-8. 60,000 -> 10 (BTC-USD), 3,000 -> 1 (ETH-USD), 150 -> 0.01."""
    if not price > 0:
        raise AnalyticsError("a bucket width needs a positive price")
    with decimal.localcontext(EXACT):
        exponent = (price / 2000).adjusted()
    return Decimal(10) ** max(exponent, -8)  # "10", "1", "0.01": no exponent in the text


@dataclass(frozen=True, slots=True)
class HeatmapPoint:
    """One cell of the heatmap: size in a price bucket on one side at one time slice."""

    ts_ns: int
    price: Decimal  # the bucket's lower edge
    side: str  # "bid" | "ask"
    size: Decimal
    intensity: Decimal  # size / the largest size of this slice (both sides), 0..1


def heatmap_slice(ts_ns: int, bids: Sequence[Level], asks: Sequence[Level]) -> list[HeatmapPoint]:
    """The points of one time slice from bucketed bids and asks; intensity normalized in this slice.

    intensity = size / max size over both sides of the slice, rounded to 6 decimal places, half up
    (`intensity`); the largest cell is exactly 1. An empty slice gives no points.
    """
    largest = max((s for _, s in (*bids, *asks)), default=_ZERO)
    if largest == 0:
        return []
    out = [HeatmapPoint(ts_ns, p, "bid", s, intensity(s, largest)) for p, s in bids]
    out += [HeatmapPoint(ts_ns, p, "ask", s, intensity(s, largest)) for p, s in asks]
    return out


# --- the consolidated cross-venue book ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VenueBook:
    """One venue's current book, as the consolidation sees it."""

    instrument: str  # venue id, e.g. "kraken:BTC-USD"
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    updated_ns: int  # book time of its last update
    verified: bool


@dataclass(frozen=True, slots=True)
class VenueContribution:
    instrument: str
    age_ns: int  # now_ns - updated_ns
    best_bid: Decimal | None
    best_ask: Decimal | None


@dataclass(frozen=True, slots=True)
class ConsolidatedBook:
    pair: str  # BASE-QUOTE
    ts_ns: int
    width: Decimal
    bids: tuple[Level, ...]  # (bucket, size summed over the included venues), best (highest) first
    asks: tuple[Level, ...]  # lowest first
    best_bid: tuple[Decimal, tuple[str, ...]] | None  # price and the venues quoting it
    best_ask: tuple[Decimal, tuple[str, ...]] | None
    venues: tuple[VenueContribution, ...]
    excluded: tuple[tuple[str, str], ...] = field(default=())  # (instrument, reason)


def parse_pair(pair: str) -> tuple[str, str]:
    """`BTC-USD` -> ("BTC", "USD"); AnalyticsError otherwise."""
    base, sep, quote = pair.strip().upper().partition("-")
    if not sep or not base.isalnum() or not quote.isalnum():
        raise AnalyticsError(f"invalid pair {pair!r}: expected BASE-QUOTE, e.g. BTC-USD")
    return base, quote


def pair_members(pair: str, instruments: Iterable[str], quote_map: Mapping[str, str] | None = None) -> list[str]:
    """Instruments whose BASE-QUOTE is `pair`, or whose quote `quote_map` maps to its quote.

    USD and USDT are different quotes: without `quote_map={"USDT": "USD"}` a USDT book never joins
    a USD pair. The mapping is one-way and explicit (quote -> the quote it counts as).
    """
    base, quote = parse_pair(pair)
    mapping = quote_map or {}
    out = []
    for iid in instruments:
        inst = Instrument.parse(iid)
        if inst.base == base and (inst.quote == quote or mapping.get(inst.quote) == quote):
            out.append(iid)
    return sorted(out)


def consolidate(pair: str, books: Iterable[VenueBook], *, now_ns: int, stale_ns: int, width: Decimal,
                quote_map: Mapping[str, str] | None = None) -> ConsolidatedBook:  # fmt: skip
    """The book of `pair` across venues: per-bucket sizes summed over the fresh, verified venues.

    A venue is excluded, and named with its reason, when its book is unverified, when it has had no
    update for more than `stale_ns` of book time (`now_ns - updated_ns > stale_ns`), or when a side
    is empty. Books of other pairs (including another quote not mapped by `quote_map`) are ignored.
    The cross-venue best bid is the highest bid of the included venues (best ask: lowest ask), with
    every venue quoting it; it may be crossed (an arbitrage), which is reported as it is.
    """
    by_id = {b.instrument: b for b in books}
    members = pair_members(pair, by_id, quote_map)
    base, quote = parse_pair(pair)
    bid_sums: dict[Decimal, Decimal] = {}
    ask_sums: dict[Decimal, Decimal] = {}
    venues: list[VenueContribution] = []
    excluded: list[tuple[str, str]] = []
    best_bid: tuple[Decimal, list[str]] | None = None
    best_ask: tuple[Decimal, list[str]] | None = None
    for iid in members:
        book = by_id[iid]
        age = now_ns - book.updated_ns
        if not book.verified:
            excluded.append((iid, "unverified"))
            continue
        if age > stale_ns:
            excluded.append((iid, f"stale: no update for {_seconds(age)} s (limit {_seconds(stale_ns)} s)"))
            continue
        if not book.bids or not book.asks:
            excluded.append((iid, "one side of the book is empty"))
            continue
        with decimal.localcontext(EXACT):
            for sums, levels in ((bid_sums, book.bids), (ask_sums, book.asks)):
                for price, size in price_buckets(levels, width):
                    sums[price] = sums.get(price, _ZERO) + size
        bb, ba = book.bids[0][0], book.asks[0][0]
        if best_bid is None or bb > best_bid[0]:
            best_bid = (bb, [iid])
        elif bb == best_bid[0]:
            best_bid[1].append(iid)
        if best_ask is None or ba < best_ask[0]:
            best_ask = (ba, [iid])
        elif ba == best_ask[0]:
            best_ask[1].append(iid)
        venues.append(VenueContribution(iid, age, bb, ba))
    return ConsolidatedBook(
        pair=f"{base}-{quote}", ts_ns=now_ns, width=width,
        bids=tuple(sorted(bid_sums.items(), reverse=True)), asks=tuple(sorted(ask_sums.items())),
        best_bid=None if best_bid is None else (best_bid[0], tuple(best_bid[1])),
        best_ask=None if best_ask is None else (best_ask[0], tuple(best_ask[1])),
        venues=tuple(venues), excluded=tuple(excluded),
    )  # fmt: skip


def _seconds(ns: int) -> str:
    return decimal_str(Decimal(ns).scaleb(-9).normalize(EXACT))


# --- one output of the books daemon -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BookOutput:
    """Everything the books daemon stores for one instrument at one output time (book time)."""

    instrument: str
    ts_ns: int
    sequence: int | None
    verified: bool
    source: str
    summary: BookSummary
    metrics: BookMetrics
    width: Decimal
    bid_buckets: tuple[Level, ...]  # ascending bucket price
    ask_buckets: tuple[Level, ...]


BUCKET_RANGE_BPS = 200


def book_output(instrument: str, ts_ns: int, bids: Sequence[Level], asks: Sequence[Level], *, sequence: int | None,
                verified: bool, source: str, width: Decimal, depth: int = 25,
                bucket_range_bps: int = BUCKET_RANGE_BPS) -> BookOutput:  # fmt: skip
    """The snapshot summary, metrics and buckets of one sorted book at `ts_ns`.

    Buckets cover the levels within `bucket_range_bps` (default 200 bps = 2 %) of the mid, edges
    included (the heatmap's band; a 1000-level book reaches far past what a heatmap shows); all
    levels when a side is empty (no mid).

    Exactly `summarize`, `book_metrics` and `price_buckets` over `within` (the books daemon calls it
    once per instrument and interval, so it is fused: one pass per side gives every depth sum and
    the band, each bucket's key is computed once, one decimal context), with the same additions in
    the same order, so the same Decimals, digit for digit (tests/candlekeep/test_book_analytics.py
    compares the two on recorded and simulated books)."""
    if depth < 1:
        raise AnalyticsError("depth must be at least 1")
    if not width > 0:
        raise AnalyticsError(f"bucket width must be positive, not {width}")
    if not bids or not asks:  # no mid: the general functions (a one-sided book is rare)
        summary = summarize(bids, asks, depth=depth)
        band_bids, band_asks = within(bids, asks, summary.mid, bucket_range_bps)
        return BookOutput(instrument, ts_ns, sequence, verified, source, summary, book_metrics(bids, asks), width,
                          price_buckets(band_bids, width), price_buckets(band_asks, width))  # fmt: skip
    reaches = sorted({*DEPTH_BPS, *IMBALANCE_BPS, bucket_range_bps})
    with decimal.localcontext(EXACT):
        best_bid, best_ask = bids[0][0], asks[0][0]
        mid = (best_bid + best_ask) / _TWO
        spread_ = best_ask - best_bid
        bounds = [(bps, mid * bps / _BPS) for bps in reaches]  # as depth_within computes them
        bid_depth, bid_band = _prefix_sums(bids, [(bps, mid - reach) for bps, reach in bounds], True)
        ask_depth, ask_band = _prefix_sums(asks, [(bps, mid + reach) for bps, reach in bounds], False)
        bid_buckets = _band_buckets(bids, bid_band[bucket_range_bps], width, True)
        ask_buckets = _band_buckets(asks, ask_band[bucket_range_bps], width, False)
        tops_b, tops_a = _tops(bids), _tops(asks)
        (bp, bq), (ap, aq) = bids[0], asks[0]
        micro_num = bp * aq + ap * bq
        micro_den = bq + aq
        bsize, bnotional = tops_b[WEIGHTED_MID_LEVELS]
        asize, anotional = tops_a[WEIGHTED_MID_LEVELS]
        wm_num = bnotional * asize * asize + anotional * bsize * bsize
        wm_den = bsize * asize * (bsize + asize)
    summary = BookSummary(tuple(bids[:depth]), tuple(asks[:depth]), mid, spread_,
                          {b: bid_depth[b] for b in DEPTH_BPS}, {b: ask_depth[b] for b in DEPTH_BPS})  # fmt: skip
    metrics = BookMetrics({n: imbalance(tops_b[n][0], tops_a[n][0]) for n in IMBALANCE_LEVELS},
                          {b: imbalance(bid_depth[b], ask_depth[b]) for b in IMBALANCE_BPS},
                          RATIO.divide(wm_num, wm_den), RATIO.divide(micro_num, micro_den))  # fmt: skip
    return BookOutput(instrument, ts_ns, sequence, verified, source, summary, metrics, width, bid_buckets, ask_buckets)


def _prefix_sums(levels: Sequence[Level], bounds: list[tuple[int, Decimal]],
                 is_bid: bool) -> tuple[dict[int, Decimal], dict[int, int]]:  # fmt: skip
    """For each (bps, price bound), widest last: the summed size of the levels from the best up to the
    bound, edges included (depth_within's `takewhile`), and how many levels that is. In EXACT."""
    sums: dict[int, Decimal] = {}
    counts: dict[int, int] = {}
    total = _ZERO
    k, n = 0, len(bounds)
    bps, bound = bounds[0]
    for i, (price, size) in enumerate(levels):
        while price < bound if is_bid else price > bound:
            sums[bps], counts[bps] = total, i
            k += 1
            if k == n:
                return sums, counts
            bps, bound = bounds[k]
        total += size
    for bps, _ in bounds[k:]:
        sums[bps], counts[bps] = total, len(levels)
    return sums, counts


def _band_buckets(levels: Sequence[Level], count: int, width: Decimal, is_bid: bool) -> tuple[Level, ...]:
    """price_buckets(levels[:count], width) for sorted levels: the next level stays in the current bucket
    while it is inside `[key, key + width)`, so a key is computed only where a bucket starts. In EXACT."""
    sums: dict[Decimal, Decimal] = {}
    key = low = high = None
    for price, size in levels[:count]:
        if key is None or price < low or price >= high:  # type: ignore[operator]
            key = (price // width) * width
            low, high = key, key + width
            sums[key] = sums.get(key, _ZERO) + size
        else:
            sums[key] += size
    return tuple(sorted(sums.items()))


def _tops(levels: Sequence[Level]) -> dict[int, tuple[Decimal, Decimal]]:
    """_top(levels, n) for every n of IMBALANCE_LEVELS and WEIGHTED_MID_LEVELS, in one pass. In EXACT."""
    wanted = {*IMBALANCE_LEVELS, WEIGHTED_MID_LEVELS}
    out: dict[int, tuple[Decimal, Decimal]] = {}
    size = notional = _ZERO
    for i, (price, qty) in enumerate(levels[: max(wanted)], 1):
        size += qty
        notional += price * qty
        if i in wanted:
            out[i] = (size, notional)
    for n in wanted:
        out.setdefault(n, (size, notional))
    return out


def width_for(instrument: str, widths: Mapping[str, Decimal], price: Decimal | None) -> Decimal:
    """The configured width of `instrument` (its id first, then its BASE-QUOTE), else one sized to
    `price` (default_bucket_width), else 1 when the book is empty."""
    inst = Instrument.parse(instrument)
    width = widths.get(inst.id) or widths.get(f"{inst.base}-{inst.quote}")
    if width is not None:
        return width
    return default_bucket_width(price) if price is not None and price > 0 else Decimal(1)


INTENSITY_PLACES = 6


def intensity(size: Decimal, largest: Decimal) -> Decimal:
    """size / largest rounded to 6 decimal places, half up (what the heatmap query computes in SQL
    as `div(2 * 10^6 * size + largest, 2 * largest) * 0.000001`, exactly the same digits)."""
    scale = 10**INTENSITY_PLACES
    with decimal.localcontext(EXACT):
        return ((2 * scale * size + largest) // (2 * largest)) * Decimal(1).scaleb(-INTENSITY_PLACES)


def intensity_texts(sizes: Sequence[Decimal]) -> list[str]:
    """`decimal_str(intensity(size, max(sizes)))` for every size of one slice (what book_buckets stores):
    the same integer division in one decimal context, its quotient written as `units.micros` (6 places)."""
    largest = max(sizes)
    scale = 10**INTENSITY_PLACES
    with decimal.localcontext(EXACT):
        twice = 2 * largest
        quotients = [int((2 * scale * size + largest) // twice) for size in sizes]
    return [f"{q // scale}.{q % scale:06d}" for q in quotients]


# --- the 1-minute roll-up (Dagster's book_metrics_1m) --------------------------------------------------

MINUTE_NS = 60 * 1_000_000_000
MetricSample = tuple[int, Decimal | None, Decimal | None, Decimal | None, Decimal | None, Decimal | None]
# (ts_ns, mid, spread, imbalance_5, bid_depth_50, ask_depth_50), as candlekeep.storage.books.metric_rows gives


@dataclass(frozen=True, slots=True)
class MinuteSummary:
    """OHLC-style summary of one UTC minute of stored outputs `[bucket, bucket + 60 s)`; exact (no division)."""

    instrument: str
    bucket_ns: int
    samples: int
    mid: tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]  # open, high, low, close
    spread: tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]
    imbalance_5: tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]
    bid_depth_50: tuple[Decimal | None, Decimal | None]  # min, max
    ask_depth_50: tuple[Decimal | None, Decimal | None]


def _ohlc(values: list[Decimal | None]) -> tuple[Decimal | None, Decimal | None, Decimal | None, Decimal | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, None, None
    return present[0], max(present), min(present), present[-1]


def rollup_minutes(instrument: str, samples: Iterable[MetricSample]) -> list[MinuteSummary]:
    """One summary per UTC minute holding samples (time order within each); minutes without any are absent."""
    minutes: dict[int, list[MetricSample]] = {}
    for sample in samples:
        minutes.setdefault(sample[0] // MINUTE_NS * MINUTE_NS, []).append(sample)
    out = []
    for bucket in sorted(minutes):
        rows = sorted(minutes[bucket], key=lambda r: r[0])
        o = _ohlc([r[4] for r in rows])
        a = _ohlc([r[5] for r in rows])
        out.append(MinuteSummary(instrument, bucket, len(rows), _ohlc([r[1] for r in rows]), _ohlc([r[2] for r in rows]),
                                 _ohlc([r[3] for r in rows]), (o[2], o[1]), (a[2], a[1])))  # fmt: skip
    return out
