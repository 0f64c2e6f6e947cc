"""OhlcvService and OnDemand on a real PostgreSQL and Redis: stitching, the cache rules, single flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

import pytest
import redis
from sqlalchemy import Engine

from candlekeep.bars import Interval, rollup_bars
from candlekeep.cache import BarCache, bar_key
from candlekeep.query import QueryError, build_query
from candlekeep.serving import OhlcvService, OnDemand
from candlekeep.storage.bars import BarStore
from candlekeep.storage.instruments import InstrumentStore
from tests.utils.bars import make_bar
from tests.utils.net import free_port

BTC = "cccagg:BTC-USD"
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z
NOW = T0 + 3600 + 30  # 01:00:30: the 01:00 minute is open


@pytest.fixture
def cache(redis_url: str) -> Iterator[BarCache]:
    redis.Redis.from_url(redis_url).flushdb()
    c = BarCache.from_url(redis_url)
    yield c
    c.close()


def service(engine: Engine, cache: BarCache | None, now: float = NOW) -> OhlcvService:
    return OhlcvService(bar_store=BarStore(engine), cache=cache, clock=lambda: now)


def q(start: int, end: int, interval: str = "1m"):
    return build_query(instrument=BTC, interval=interval, start=str(start), end=str(end))


def stream_bar(start: int, close: str, *, revision: int = 0, **kw):
    return replace(make_bar(BTC, start, close, source="stream", final=False, **kw), revision=revision)


def closes(bars) -> list[str]:
    return [str(b.close) for b in bars]


def test_forming_bar_comes_last_once_and_final_stored_bars_win(engine: Engine, cache: BarCache) -> None:
    store = BarStore(engine)
    open_minute = T0 + 3600
    store.upsert_bars([make_bar(BTC, open_minute - 120, "10"), stream_bar(open_minute - 60, "11")])
    store.upsert_bars([stream_bar(open_minute - 120, "99")])  # refused: a final bar is stored
    cache.put(forming=[stream_bar(open_minute, "12")])

    got = service(engine, cache).read(q(open_minute - 120, open_minute + 60))

    assert [b.start for b in got.bars] == [open_minute - 120, open_minute - 60, open_minute]
    assert closes(got.bars) == ["10", "11", "12"]
    assert got.forming == got.bars[-1] and got.bars[-1].final is False
    assert got.complete and got.gaps == []


def test_forming_replaces_a_provisional_bar_of_its_bucket_but_not_a_final_one(engine: Engine, cache: BarCache) -> None:
    store = BarStore(engine)
    open_minute = T0 + 3600
    store.upsert_bars([stream_bar(open_minute, "11")])  # the aggregator's last flush of the open minute
    cache.put(forming=[stream_bar(open_minute, "12")])
    got = service(engine, cache).read(q(open_minute, open_minute + 60))
    assert closes(got.bars) == ["12"] and got.forming is not None

    store.upsert_bars([make_bar(BTC, open_minute, "13")])  # final
    got = service(engine, cache).read(q(open_minute, open_minute + 60))
    assert closes(got.bars) == ["13"] and got.bars[0].final and got.forming is None


def test_without_redis_the_last_provisional_bar_is_the_forming_one(engine: Engine) -> None:
    open_minute = T0 + 3600
    BarStore(engine).upsert_bars([make_bar(BTC, open_minute - 60, "10"), stream_bar(open_minute, "11")])

    got = service(engine, None).read(q(open_minute - 60, open_minute + 60))

    assert closes(got.bars) == ["10", "11"] and got.forming == got.bars[-1]


def test_forming_minute_is_folded_into_its_coarse_bucket(engine: Engine, cache: BarCache) -> None:
    open_minute = T0 + 3600 + 120  # 01:02 forming; 01:00 and 01:01 stored
    minutes = [make_bar(BTC, T0 + 3300 + 60 * i, f"{100 + i}.5", volume=f"0.{i + 1}") for i in range(5)]
    minutes += [stream_bar(T0 + 3600, "90.25", volume="2"), stream_bar(T0 + 3660, "120.75", volume="0.5")]
    BarStore(engine).upsert_bars(minutes)
    forming = stream_bar(open_minute, "95.5", volume="0.125")
    cache.put(forming=[forming])

    got = service(engine, cache, now=open_minute + 10).read(q(T0 + 3300, T0 + 3900, "5m"))

    expected = list(rollup_bars([*minutes, forming], Interval.M5))
    assert [b.start for b in got.bars] == [T0 + 3300, T0 + 3600]
    last = got.bars[-1]
    assert (last.open, last.high, last.low, last.close, last.volume, last.quote_volume, last.trades) == (
        expected[-1].open, expected[-1].high, expected[-1].low, expected[-1].close, expected[-1].volume,
        expected[-1].quote_volume, expected[-1].trades)
    assert last.final is False and got.forming == last
    assert got.bars[0].volume == Decimal("1.5")


def test_recent_bars_are_read_through_redis_and_a_revision_is_seen(engine: Engine, cache: BarCache) -> None:
    store = BarStore(engine)
    starts = [T0 + 3000 + 60 * i for i in range(5)]
    store.upsert_bars([stream_bar(s, "10") for s in starts])
    svc = service(engine, cache)

    first = svc.read(q(starts[0], starts[-1] + 60))
    assert closes(first.bars) == ["10"] * 5
    assert cache.read_bar(BTC, "1m", starts[2]) == first.bars[2]  # written back on the miss

    revised = stream_bar(starts[2], "11", revision=1)
    store.upsert_bars([revised])
    cache.put(closed=[revised])  # the aggregator: database, then the same key
    assert closes(svc.read(q(starts[0], starts[-1] + 60)).bars) == ["10", "10", "11", "10", "10"]

    only_in_redis = stream_bar(starts[3], "12", revision=2)  # the aggregator wrote Redis before its flush
    cache.put(closed=[only_in_redis])
    assert closes(svc.read(q(starts[0], starts[-1] + 60)).bars)[3] == "12"


def test_a_backfill_refresh_wins_over_what_redis_still_holds(engine: Engine, cache: BarCache) -> None:
    store = BarStore(engine)
    starts = [T0 + 3000 + 60 * i for i in range(5)]
    provisional = [stream_bar(s, "10") for s in starts]
    store.upsert_bars(provisional)
    cache.put(closed=provisional)
    svc = service(engine, cache)
    assert closes(svc.read(q(starts[0], starts[-1] + 60)).bars) == ["10"] * 5

    store.upsert_bars([make_bar(BTC, s, "20", source="cryptocompare") for s in starts[:4]])  # final, DB only

    got = svc.read(q(starts[0], starts[-1] + 60))
    assert closes(got.bars) == ["20", "20", "20", "20", "10"]
    assert [b.final for b in got.bars] == [True, True, True, True, False]


def test_redis_down_reads_the_database_alone(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([stream_bar(T0 + 3000 + 60 * i, f"1{i}") for i in range(3)])
    dead = BarCache.from_url(f"redis://127.0.0.1:{free_port()}/0")

    got = service(engine, dead).read(q(T0 + 3000, T0 + 3180))

    assert closes(got.bars) == ["10", "11", "12"] and got.complete


def test_countback_gives_the_most_recent_bars_even_across_gaps(engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 60 * i, str(i + 1)) for i in (0, 1, 2, 7, 9)])
    svc = service(engine, None)

    got = svc.read(q(T0, T0 + 600), countback=3)
    assert closes(got.bars) == ["3", "8", "10"]
    assert got.query.start == T0 + 120 and got.gaps == [(T0 + 180, T0 + 420), (T0 + 480, T0 + 540)]

    assert closes(svc.read(q(T0, T0 + 600), countback=2).bars) == ["8", "10"]
    assert closes(svc.read(q(T0, T0 + 600), countback=50).bars) == ["1", "2", "3", "8", "10"]


def test_limit_gives_the_first_bars_of_the_range_as_sql_does(engine: Engine) -> None:
    rows = [(i, str(i + 1)) for i in (0, 1, 2, 7, 9)]
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 60 * i, c) for i, c in rows])
    svc = service(engine, None)
    truth = [c for _, c in sorted(rows)]  # ORDER BY start LIMIT n

    for n in (1, 2, 3, 4, 5, 50):
        got = svc.read(q(T0, T0 + 600), limit=n)
        assert closes(got.bars) == truth[:n], n
    four = svc.read(q(T0, T0 + 600), limit=4)
    assert four.query.start == T0 and four.query.end == T0 + 480
    assert four.gaps == [(T0 + 180, T0 + 420)]  # gaps within the answered window only
    with pytest.raises(QueryError, match="not both"):
        svc.read(q(T0, T0 + 600), limit=2, countback=2)


def test_gaps_are_closed_buckets_only(engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 3480, "1")])

    got = service(engine, None).read(q(T0 + 3480, T0 + 3720))  # 00:58 .. 01:02, open minute 01:00

    assert got.gaps == [(T0 + 3540, T0 + 3600)] and not got.complete


def test_concurrent_requests_for_a_missing_range_send_one_fetch(engine: Engine) -> None:
    InstrumentStore(engine).register([BTC], tracked=True)
    store = BarStore(engine)
    store.upsert_bars([make_bar(BTC, T0, "1")])
    calls: list[tuple] = []
    lock = threading.Lock()

    def request_fetch(instrument: str, start: int | None, end: int | None) -> None:
        with lock:
            calls.append((instrument, start, end))
        time.sleep(0.2)  # the coordinator's answer arrives later, on its own
        threading.Timer(0.3, lambda: store.upsert_bars([make_bar(BTC, T0 + 60 * i, "2") for i in (1, 2, 3)])).start()

    od = OnDemand(request_fetch=request_fetch, service=service(engine, None),
                  tracked=lambda: InstrumentStore(engine).list_ids(tracked_only=True), poll_s=0.05)
    results: list = []
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait()
        results.append(od.read(q(T0, T0 + 240), wait=5))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert calls == [(BTC, T0 + 60, T0 + 240)]
    assert len(results) == 8 and all(s.complete and len(s.bars) == 4 and asked for s, asked in results)


def test_untracked_instrument_is_tracked_once_and_incomplete_answers_say_so(engine: Engine) -> None:
    calls: list[tuple] = []
    od = OnDemand(request_fetch=lambda i, s, e: calls.append((i, s, e)), service=service(engine, None),
                  tracked=lambda: [], poll_s=0.05)

    started = time.monotonic()
    stitched, asked = od.read(q(T0, T0 + 120), wait=0.3)
    od.read(q(T0, T0 + 120), wait=0)

    assert asked and not stitched.complete and stitched.gaps == [(T0, T0 + 120)]
    assert 0.2 <= time.monotonic() - started < 2
    assert calls == [(BTC, None, None), (BTC, T0, T0 + 120)]


def test_a_failed_request_is_not_waited_for(engine: Engine) -> None:
    def refuse(instrument: str, start: int | None, end: int | None) -> None:
        raise RuntimeError("no broker")

    od = OnDemand(request_fetch=refuse, service=service(engine, None), tracked=lambda: [BTC])
    started = time.monotonic()
    stitched, asked = od.read(q(T0, T0 + 120), wait=10)
    assert not asked and not stitched.complete and time.monotonic() - started < 1


def test_limit_over_the_cap_names_it(engine: Engine) -> None:
    from candlekeep.query import MAX_BARS_PER_QUERY

    with pytest.raises(QueryError, match=str(MAX_BARS_PER_QUERY)):
        service(engine, None).read(q(T0, T0 + 60), limit=MAX_BARS_PER_QUERY + 1)


def test_latest_start_sees_the_forming_bar(engine: Engine, cache: BarCache) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 3540, "1")])
    svc = service(engine, cache)
    assert svc.latest_start(BTC, Interval.M1) == T0 + 3540
    cache.put(forming=[stream_bar(T0 + 3600, "2")])
    assert svc.latest_start(BTC, Interval.M1) == T0 + 3600
    assert svc.latest_start(BTC, Interval.H1) == T0 + 3600
    assert bar_key(BTC, "1m", T0) == "ohlcv:cccagg:BTC-USD:1m:2024-01-01T00:00:00Z"


# --- the seam on the log's clock (issue: bars from the log's own clock) ----------------------------


def test_a_bucket_still_closing_is_no_gap_and_is_never_fetched(engine: Engine) -> None:
    store = BarStore(engine)
    minute = T0 + 3600
    store.upsert_bars([stream_bar(minute - 120, "10"), stream_bar(minute - 60, "11")])
    requested: list[tuple] = []
    for at, gaps in ((minute + 2, []), (minute + 4.9, []), (minute + 5, [])):
        got = service(engine, None, now=at).read(q(minute - 120, minute + 60))
        assert got.gaps == gaps and got.complete, at
    # 1:01:02 the aggregator has not closed 1:00 yet: closing; by 1:01:05 it should have: a gap.
    closing = service(engine, None, now=minute + 62).read(q(minute - 120, minute + 120))
    assert closing.gaps == [] and closing.complete
    late = service(engine, None, now=minute + 65)
    assert late.read(q(minute - 120, minute + 120)).gaps == [(minute, minute + 60)]
    on_demand = OnDemand(request_fetch=lambda *a: requested.append(a), service=service(engine, None, now=minute + 62),
                         tracked=lambda: [BTC], sleep=lambda s: None)  # fmt: skip
    on_demand.read(q(minute - 120, minute + 120), wait=0)
    assert requested == []  # nothing to fetch while the live feed is closing the minute


def test_gaps_are_fetched_each_on_its_own_never_the_live_minutes_between(engine: Engine) -> None:
    store = BarStore(engine)
    store.upsert_bars([stream_bar(T0 + m * 60, "10") for m in (0, 2, 3, 6)])
    requested: list[tuple] = []
    on_demand = OnDemand(request_fetch=lambda *a: requested.append(a), service=service(engine, None),
                         tracked=lambda: [BTC], sleep=lambda s: None)  # fmt: skip
    on_demand.read(q(T0, T0 + 420), wait=0)
    assert requested == [(BTC, T0 + 60, T0 + 120), (BTC, T0 + 240, T0 + 360)]


def test_minutes_of_an_outage_are_gaps_until_final_bars_replace_them(engine: Engine) -> None:
    from datetime import UTC, datetime

    from candlekeep.storage.outages import OutageStore

    store, outages = BarStore(engine), OutageStore(engine)
    # The feed died at 00:02:30 and came back at 00:05:10: minutes 2 and 5 hold part of their
    # trades (partial stream bars), 3 and 4 none.
    store.upsert_bars([stream_bar(T0 + m * 60, "10") for m in (0, 1, 2, 5, 6, 7)])
    outages.record(source="simulator", instruments=[BTC], reason="producer started",
                   started_at=datetime.fromtimestamp(T0 + 150, UTC), ended_at=datetime.fromtimestamp(T0 + 310, UTC))
    svc = OhlcvService(bar_store=store, cache=None, outages=outages, clock=lambda: NOW)
    got = svc.read(q(T0, T0 + 480))
    assert got.gaps == [(T0 + 120, T0 + 360)] and not got.complete
    assert got.bars and [b.start for b in got.bars] == [T0 + m * 60 for m in (0, 1, 2, 5, 6, 7)]
    coarse = svc.read(q(T0, T0 + 600, "5m"))
    assert coarse.gaps == [(T0, T0 + 600)]  # both 5m buckets hold part of the outage
    # The refill writes final bars for the outage's minutes: the gap is gone.
    store.upsert_bars([make_bar(BTC, T0 + m * 60, "10") for m in (2, 3, 4, 5)])
    assert svc.read(q(T0, T0 + 480)).gaps == [] and svc.read(q(T0, T0 + 480)).complete


def test_a_coarse_bucket_with_missing_minutes_is_incomplete_and_a_stored_complete_bar_wins(engine: Engine) -> None:
    store = BarStore(engine)
    hour = T0
    store.upsert_bars([stream_bar(hour + m * 60, "10") for m in range(0, 60) if m not in (17, 18)])
    svc = service(engine, None, now=hour + 7200 + 30)
    got = svc.read(q(hour, hour + 3600, "1h"))
    assert got.gaps == [(hour, hour + 3600)] and not got.complete
    assert got.bars[0].source == "stream"  # derived from the 58 minutes there are
    # A stored complete 1h bar (deep history, as the source gave it) serves the bucket instead.
    store.upsert_bars([replace(make_bar(BTC, hour, "12"), interval="1h")])
    got = svc.read(q(hour, hour + 3600, "1h"))
    assert got.gaps == [] and str(got.bars[0].close) == "12" and got.bars[0].final
    # Once every minute is stored, the derivation from them wins again.
    store.upsert_bars([stream_bar(hour + m * 60, "10") for m in (17, 18)])
    got = svc.read(q(hour, hour + 3600, "1h"))
    assert got.gaps == [] and str(got.bars[0].close) == "10" and got.bars[0].source == "stream"
