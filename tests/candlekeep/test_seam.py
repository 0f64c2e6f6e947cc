"""The seam contract: history backfilled up to a minute, live bars after it, one stitched answer.

The simulator is both sources, as in `candlekeep up`: its bars are backfilled (final) up to minute M,
and its trades after M are played live through the aggregator's bar builder into the stores and
Redis (provisional bars, the forming bar), in simulated time. The range across M is queried again
after every few seconds of play, across several minute boundaries: never a gap among closed buckets,
never a bucket twice, always ascending, and every bar equal to the simulator's truth (the forming
bar to the aggregate of the minute's trades so far).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine

from candlekeep.backfill import backfill
from candlekeep.bars import NS_PER_S, Bar, Interval, aggregate_trades
from candlekeep.cache import BarCache
from candlekeep.instruments import Instrument
from candlekeep.live import BarBuilder
from candlekeep.query import build_query
from candlekeep.serving import OhlcvService
from candlekeep.sources.simulator import Simulator
from candlekeep.storage.bars import BarStore
from candlekeep.storage.coverage import CoverageStore

INST = Instrument.parse("cccagg:BTC-USD")
SEAM = int(datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp())  # history ends, live begins
STEP_S = 7  # live play advances this much between queries (not a divisor of 60: queries land mid-minute)
LIVE_S = 4 * 60 + 30


def values(bar: Bar) -> tuple:
    return (bar.start, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.quote_volume, bar.trades)


def test_history_then_live_is_one_gapless_truthful_series(engine: Engine, redis_url: str) -> None:
    end = SEAM + LIVE_S
    sim = Simulator(seed=7, now=lambda: end + 3600)
    store = BarStore(engine)
    backfill(source=sim, bar_store=store, coverage_store=CoverageStore(engine), instrument=INST,
             interval=Interval.M1, start=SEAM - 3600, end=SEAM, now=SEAM)  # fmt: skip
    cache = BarCache.from_url(redis_url)
    builder = BarBuilder(INST.id)
    # The live side saw the minute before the seam too (as the aggregator's ticks would have it): its
    # closed bar is upserted like any other, and the backfilled final bar of that minute must win.
    trades = list(sim.trades(INST, (SEAM - 60) * NS_PER_S, end * NS_PER_S))
    prev_close = [b for page in sim.bars(INST, Interval.M1, SEAM - 60, SEAM) for b in page][-1].close
    history_truth = [b for page in sim.bars(INST, Interval.M1, SEAM - 600, SEAM) for b in page]
    checked_boundaries = set()

    played = 0
    for now in range(SEAM + STEP_S, end, STEP_S):
        closed = []
        while played < len(trades) and trades[played].ts_ns < now * NS_PER_S:
            closed += builder.add(trades[played])  # a trade moves the log's clock, closing buckets
            played += 1
        closed += builder.heartbeat(now * NS_PER_S)  # the source vouches for everything up to now
        if closed:
            store.upsert_bars(closed)
        cache.put(closed=closed, forming=[builder.forming] if builder.forming else [])

        minute = Interval.M1.floor(now)
        service = OhlcvService(bar_store=store, cache=cache, clock=lambda now=now: now)
        query = build_query(instrument=INST.id, interval="1m", start=str(SEAM - 600), end=str(now + 60))
        answer = service.read(query)

        starts = [b.start for b in answer.bars]
        assert starts == sorted(set(starts)), f"disorder or duplicate at {now}"
        assert answer.gaps == [] and starts[0] == SEAM - 600, f"gap at {now}: {answer.gaps}"
        assert starts[-1] == minute, f"the forming minute is missing at {now}"  # flat until its first trade
        history = [b for b in answer.bars if b.start < SEAM]
        assert all(b.final for b in history) and all(not b.final for b in answer.bars if b.start >= SEAM)

        # Truth: the simulator's bars up to the seam, then the aggregate of the trades played so far.
        so_far = [t for t in trades if SEAM * NS_PER_S <= t.ts_ns < now * NS_PER_S]
        live_truth = aggregate_trades(so_far, Interval.M1, SEAM, minute + 60, instrument=INST.id, source="truth",
                                      prev_close=prev_close)  # fmt: skip
        assert [values(b) for b in answer.bars] == [values(b) for b in history_truth + live_truth], (
            f"answer differs from the truth at {now}")
        if now % 60 < STEP_S:
            checked_boundaries.add(minute)

    assert len(checked_boundaries) >= 4  # the answer was checked right after several minute boundaries
