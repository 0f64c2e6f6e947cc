"""What the order-book routes answer: parameter checks with their caps, and the response bodies.

    current_book(store=..., instrument="kraken:BTC-USD", depth=10, now_ns=...)   # GET /v1/book
    consolidated(store=..., pair="BTC-USD", bucket=None, stale_ns=..., widths=..., quote_map=...)
    metrics_history(store=..., instrument=..., start=..., end=..., interval="1m")  # GET /v1/book/metrics
    heatmap(store=..., instrument=..., start=..., end=..., bucket=None, resolution="1s")
    book_diff(old, new)                                                            # WS diffs

Keyword-only functions over a BookStore; each raises BookQueryError (a 4xx, the message says
why) or BookNotFound (404). Bodies are plain dicts with every price and size a decimal string (the
heatmap's slices come as JSON, built by the query: msgspec.Raw).
The live views read the latest stored output of the books daemon (at most one output interval
old). Consolidated staleness is measured in book time: a venue is stale when its latest output is
more than `stale_ns` older than the freshest venue's of the pair (the wall clock is not the log's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from candlekeep.bars import NS_PER_S, decimal_str
from candlekeep.book_analytics import AnalyticsError, VenueBook, consolidate, default_bucket_width, pair_members, parse_pair
from candlekeep.books import Level
from candlekeep.instruments import InstrumentError, resolve_instrument
from candlekeep.query import QueryError, parse_timestamp
from candlekeep.storage.books import BookStore, StoredSnapshot

MAX_DEPTH = 1000
MAX_METRIC_ROWS = 10_000  # rows of /v1/book/metrics per request
MAX_HEATMAP_SLICES = 86_400  # one day at 1 s
SLICE_COLUMNS = ["t_ms", "side", "prices", "sizes", "intensities"]  # of each heatmap slice, in price order
MAX_RANGE_S = 31 * 86_400
RESOLUTIONS = {"1s": 1, "5s": 5, "10s": 10, "15s": 15, "30s": 30, "1m": 60, "5m": 300, "15m": 900, "1h": 3600,
               "4h": 14_400, "1d": 86_400}  # fmt: skip


class BookQueryError(ValueError):
    """A book query that cannot be answered as asked (HTTP 422); the message says why."""


class BookNotFound(LookupError):
    """Nothing stored for what was asked (HTTP 404)."""


def instrument_id(text: str) -> str:
    try:
        return resolve_instrument(text).id
    except InstrumentError as exc:
        raise BookQueryError(str(exc)) from None


def _levels(levels: Sequence[Level]) -> list[list[str]]:
    return [[decimal_str(p), decimal_str(s)] for p, s in levels]


def _num(value: Decimal | None) -> str | None:
    return None if value is None else decimal_str(value)


def snapshot_body(snap: StoredSnapshot, depth: int, now_ns: int) -> dict[str, Any]:
    return {
        "instrument": snap.instrument,
        "ts_ns": snap.ts_ns,
        "sequence": snap.sequence,
        "age_ms": max(0, (now_ns - snap.ts_ns) // 1_000_000),
        "verified": snap.verified,
        "source": snap.source,
        "mid": _num(snap.mid),
        "spread": _num(snap.spread),
        "bids": _levels(snap.bids[:depth]),
        "asks": _levels(snap.asks[:depth]),
        "depth_bps": {str(b): {"bid": _num(snap.bid_depth[b]), "ask": _num(snap.ask_depth[b])} for b in (10, 50, 100)},
    }


def _depth(depth: int) -> int:
    if not 1 <= depth <= MAX_DEPTH:
        raise BookQueryError(f"depth must be between 1 and {MAX_DEPTH}, not {depth}")
    return depth


def current_book(*, store: BookStore, instrument: str, depth: int, now_ns: int) -> dict[str, Any]:
    """The latest stored top-N of `instrument` with its sequence, age (wall clock) and verified flag."""
    iid = instrument_id(instrument)
    depth = _depth(depth)
    snap = store.latest(iid)
    if snap is None:
        raise BookNotFound(f"no book stored for {iid} (is the books daemon running and {iid} on the books topic?)")
    return snapshot_body(snap, depth, now_ns)


def _positive_decimal(text: str | None, name: str) -> Decimal | None:
    if text is None:
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise BookQueryError(f"{name} must be a positive decimal number, not {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise BookQueryError(f"{name} must be a positive decimal number, not {text!r}")
    return value


def consolidated(*, store: BookStore, pair: str, bucket: str | None, stale_ns: int, widths: Mapping[str, Decimal],
                 quote_map: Mapping[str, str]) -> dict[str, Any]:  # fmt: skip
    """The cross-venue book of `pair` from every venue's latest stored output (module doc)."""
    try:
        base, quote = parse_pair(pair)
    except AnalyticsError as exc:
        raise BookQueryError(str(exc)) from None
    width = _positive_decimal(bucket, "bucket")
    members = pair_members(f"{base}-{quote}", store.snapshot_ids(), quote_map)
    latest = store.latest_many(members)
    if not latest:
        raise BookNotFound(f"no venue's book of {base}-{quote} is stored")
    now_ns = max(s.ts_ns for s in latest.values())
    if width is None:
        width = widths.get(f"{base}-{quote}")
    if width is None:
        fresh = max(latest.values(), key=lambda s: s.ts_ns)
        width = default_bucket_width(fresh.mid) if fresh.mid else Decimal(1)
    books = [VenueBook(s.instrument, s.bids, s.asks, s.ts_ns, s.verified) for s in latest.values()]
    book = consolidate(f"{base}-{quote}", books, now_ns=now_ns, stale_ns=stale_ns, width=width, quote_map=quote_map)
    return {
        "pair": book.pair,
        "ts_ns": book.ts_ns,
        "bucket": decimal_str(book.width),
        "quote_map": {k: v for k, v in quote_map.items() if v == quote},
        "best_bid": None if book.best_bid is None else {"price": decimal_str(book.best_bid[0]),
                                                        "venues": list(book.best_bid[1])},  # fmt: skip
        "best_ask": None if book.best_ask is None else {"price": decimal_str(book.best_ask[0]),
                                                        "venues": list(book.best_ask[1])},  # fmt: skip
        "bids": _levels(book.bids),
        "asks": _levels(book.asks),
        "venues": [{"instrument": v.instrument, "age_ms": v.age_ns // 1_000_000, "best_bid": _num(v.best_bid),
                    "best_ask": _num(v.best_ask)} for v in book.venues],  # fmt: skip
        "excluded": [{"instrument": i, "reason": r} for i, r in book.excluded],
    }


def _range(start: str, end: str) -> tuple[int, int]:
    try:
        start_s, end_s = parse_timestamp(start, name="start"), parse_timestamp(end, name="end")
    except QueryError as exc:
        raise BookQueryError(str(exc)) from None
    if end_s <= start_s:
        raise BookQueryError("end must be after start")
    if end_s - start_s > MAX_RANGE_S:
        raise BookQueryError(f"the range is over the cap of {MAX_RANGE_S // 86_400} days")
    return start_s, end_s


def _resolution(text: str, name: str) -> int:
    if text not in RESOLUTIONS:
        raise BookQueryError(f"invalid {name} {text!r}: expected one of {', '.join(RESOLUTIONS)}")
    return RESOLUTIONS[text]


def metrics_history(*, store: BookStore, instrument: str, start: str, end: str, interval: str) -> dict[str, Any]:
    """Per `interval`: the last sample of each metric in it (exact), the spread range, the sample count."""
    iid = instrument_id(instrument)
    step = _resolution(interval, "interval")
    start_s, end_s = _range(start, end)
    start_s, end_s = start_s // step * step, -(-end_s // step) * step
    if (end_s - start_s) // step > MAX_METRIC_ROWS:
        raise BookQueryError(f"{(end_s - start_s) // step} intervals of {interval} are over the cap of "
                             f"{MAX_METRIC_ROWS} per request")  # fmt: skip
    rows = store.metrics(iid, start_s * NS_PER_S, end_s * NS_PER_S, step)
    return {
        "instrument": iid, "start": start_s, "end": end_s, "interval": interval,
        "rows": [{"t": r.ts_ns // NS_PER_S, "mid": _num(r.mid), "spread": _num(r.spread),
                  "spread_min": _num(r.spread_min), "spread_max": _num(r.spread_max),
                  "imbalance": {k: _num(v) for k, v in r.imbalance.items()}, "weighted_mid": _num(r.weighted_mid),
                  "microprice": _num(r.microprice), "samples": r.samples} for r in rows],
    }  # fmt: skip


def heatmap(*, store: BookStore, instrument: str, start: str, end: str, bucket: str | None,
            resolution: str) -> dict[str, Any]:  # fmt: skip
    """Heatmap slices: per `resolution` slot the last stored output's buckets, re-bucketed to `bucket`
    (a multiple of the stored width; default the stored width), intensity 0..1 per slot (6 places);
    one slice per slot and side, its cells as three aligned arrays in price order (SLICE_COLUMNS)."""
    iid = instrument_id(instrument)
    step = _resolution(resolution, "resolution")
    start_s, end_s = _range(start, end)
    start_s, end_s = start_s // step * step, -(-end_s // step) * step
    if (end_s - start_s) // step > MAX_HEATMAP_SLICES:
        raise BookQueryError(f"{(end_s - start_s) // step} slices of {resolution} are over the cap of "
                             f"{MAX_HEATMAP_SLICES} per request")  # fmt: skip
    width = _positive_decimal(bucket, "bucket")
    stored = store.stored_widths(iid, start_s * NS_PER_S, end_s * NS_PER_S)
    if width is None:
        width = max(stored, default=None)
    if width is None:
        return {"instrument": iid, "start": start_s, "end": end_s, "resolution": resolution, "bucket": None,
                "columns": SLICE_COLUMNS, "slices": []}  # fmt: skip
    if any(width % w != 0 for w in stored):
        raise BookQueryError(f"bucket {decimal_str(width)} is not a multiple of the stored bucket width "
                             f"{', '.join(decimal_str(w) for w in stored)}")  # fmt: skip
    slices = store.heatmap_json(iid, start_s * NS_PER_S, end_s * NS_PER_S, step, width,
                                stored_width=stored == [width])  # fmt: skip
    return {"instrument": iid, "start": start_s, "end": end_s, "resolution": resolution, "bucket": decimal_str(width),
            "columns": SLICE_COLUMNS, "slices": msgspec.Raw(slices)}  # fmt: skip


def book_diff(old: StoredSnapshot, new: StoredSnapshot, depth: int) -> dict[str, list[list[str]]]:
    """The levels of `new`'s top `depth` that differ from `old`'s, absolute sizes, "0" where gone."""
    out: dict[str, list[list[str]]] = {}
    for side in ("bids", "asks"):
        before, after = dict(getattr(old, side)[:depth]), dict(getattr(new, side)[:depth])
        changed = [(p, s) for p, s in after.items() if before.get(p) != s] + [(p, Decimal(0)) for p in before
                                                                               if p not in after]  # fmt: skip
        out[side] = _levels(sorted(changed, reverse=side == "bids"))
    return out
