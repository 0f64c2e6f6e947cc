"""candlekeep.replay, the pure rules: states, the replay clock, the event-time stream and seeks.
Expectations are written out here (tables, hand-built streams) or come from the real trades of
../shared/fixtures/trades; the stream's own functions never judge themselves."""

from __future__ import annotations

import functools
import random
from dataclasses import replace
from decimal import Decimal

import pytest

from candlekeep.bars import NS_PER_S, Trade, decimal_str
from candlekeep.messages import encode_stored_trade, encode_tick
from candlekeep.replay import (
    Outage,
    Position,
    ReplayClock,
    SessionState,
    StoredTrade,
    TransitionNotAllowed,
    after,
    instrument_stream,
    merge,
    next_state,
    parse_speed,
    parse_time_ns,
    progress,
)
from tests.utils.trades import load_freqtrade, load_tardis

S = SessionState
# (state, action) -> new state; every pair not listed is refused.
ALLOWED = {
    (S.CREATED, "start"): S.RUNNING, (S.CREATED, "stop"): S.STOPPED,
    (S.RUNNING, "pause"): S.PAUSED, (S.RUNNING, "stop"): S.STOPPED,
    (S.PAUSED, "resume"): S.RUNNING, (S.PAUSED, "stop"): S.STOPPED,
    (S.ERROR, "resume"): S.RUNNING, (S.ERROR, "stop"): S.STOPPED,
}  # fmt: skip


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("action", ["start", "pause", "resume", "stop"])
def test_every_state_and_action(state: SessionState, action: str) -> None:
    if (state, action) in ALLOWED:
        assert next_state(state, action) == ALLOWED[(state, action)]
    else:
        with pytest.raises(TransitionNotAllowed, match=f"cannot {action} a session that is {state}"):
            next_state(state, action)


@pytest.mark.parametrize("text, speed", [("max", None), ("MAX", None), (None, None), (1, 1.0), ("60", 60.0), (0.5, 0.5)])
def test_speeds(text, speed) -> None:
    assert parse_speed(text) == speed


@pytest.mark.parametrize("bad", [0, -1, "0", "nan", "inf", "fast", float("inf")])
def test_bad_speeds(bad) -> None:
    with pytest.raises(ValueError, match="positive number or 'max'"):
        parse_speed(bad)


def test_times_are_exact_nanoseconds() -> None:
    assert parse_time_ns("1582329700.000000001") == 1582329700 * NS_PER_S + 1
    assert parse_time_ns("2020-02-22T00:01:40.138Z") == 1582329700 * NS_PER_S + 138_000_000
    assert parse_time_ns("2020-02-22T01:01:40+01:00") == 1582329700 * NS_PER_S
    with pytest.raises(ValueError, match="invalid seek"):
        parse_time_ns("soon", name="seek")


@pytest.mark.parametrize("huge", [2.7107347474130206e183, "9223372036.854775808", "-9223372036.854775809",
                                  "9999-12-31T00:00:00Z"])  # fmt: skip
def test_times_past_a_bigint_of_nanoseconds_are_refused(huge) -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_time_ns(huge, name="start")
    assert parse_time_ns("9223372036.854775807") == (1 << 63) - 1  # the last one that fits


def test_the_clock_runs_at_its_speed_holds_resumes_and_changes_speed() -> None:
    wall0, sim0 = 1_000 * NS_PER_S, 1_582_329_600 * NS_PER_S
    clock = ReplayClock(sim0, wall0, 10.0)
    assert clock.read(wall0 + NS_PER_S // 2) == sim0 + 5 * NS_PER_S  # half a wall second = 5 simulated
    assert clock.due_ns(sim0 + 5 * NS_PER_S) == wall0 + NS_PER_S // 2
    held = clock.hold(wall0 + NS_PER_S)
    assert held.held and held.read(wall0 + 99 * NS_PER_S) == sim0 + 10 * NS_PER_S
    with pytest.raises(ValueError):
        held.due_ns(sim0)
    resumed = held.run(wall0 + 60 * NS_PER_S)  # paused for 59 s: the clock continues where it held
    assert resumed.read(wall0 + 61 * NS_PER_S) == sim0 + 20 * NS_PER_S
    slower = resumed.with_speed(1.0, wall0 + 61 * NS_PER_S)
    assert slower.read(wall0 + 63 * NS_PER_S) == sim0 + 22 * NS_PER_S
    at_max = ReplayClock(sim0, wall0, None)
    assert at_max.due_ns(sim0 + 10**15) is None and at_max.sent(sim0 + 7).read(wall0 + 10**12) == sim0 + 7
    assert progress(sim0 + 25, sim0, sim0 + 100) == 25.0


def stored(trades: list[Trade]) -> list[StoredTrade]:
    return [StoredTrade(t.ts_ns, t.trade_id, decimal_str(t.price), decimal_str(t.size), t.side) for t in trades]


def test_one_instrument_stream_beats_every_second_outside_outages_and_closes_at_end_plus_lateness() -> None:
    s = NS_PER_S
    trades = [StoredTrade(1 * s, "1", "10", "1", "buy"), StoredTrade(2 * s + 5, "2", "11", "1", "buy"),
              StoredTrade(6 * s, "3", "12", "1", "sell")]  # fmt: skip
    got = list(instrument_stream("x:A-B", trades, start_ns=0, end_ns=8 * s, from_ns=0, lateness_ns=2 * s,
                                 outages=[Outage(3 * s + 1, 5 * s, "dropped")]))  # fmt: skip
    assert [(i.ts_ns, i.kind) for i in got] == [
        (0, "heartbeat"), (1 * s, "trade"), (1 * s, "heartbeat"), (2 * s, "heartbeat"), (2 * s + 5, "trade"),
        (3 * s, "heartbeat"), (3 * s + 1, "disconnect"),  # no heartbeat at 4 s: inside [3 s + 1, 5 s)
        (5 * s, "heartbeat"), (6 * s, "trade"), (6 * s, "heartbeat"), (7 * s, "heartbeat"), (8 * s, "heartbeat"),
        (10 * s, "heartbeat"),
    ]  # fmt: skip
    assert got[6].data == "dropped"


@functools.cache
def recordings() -> tuple[list[Trade], list[Trade]]:
    """BTC as recorded; ETH moved by a constant onto BTC's first minutes, so the two interleave."""
    eth = [replace(t, ts_ns=t.ts_ns - 1_675_329_600 * NS_PER_S + 1_582_329_600 * NS_PER_S) for t in load_freqtrade()]
    return load_tardis(), eth


def real_streams(start_ns: int, end_ns: int, from_ns: int) -> list:
    btc_all, eth_all = recordings()
    btc = [t for t in btc_all if from_ns <= t.ts_ns < end_ns]
    eth = [t for t in eth_all if from_ns <= t.ts_ns < end_ns]
    outage = [Outage(1_582_329_630 * NS_PER_S, 1_582_329_660 * NS_PER_S, "gap")]
    return [
        instrument_stream("b:BTC-USDT", stored(sorted(btc, key=lambda t: t.sort_key)), start_ns=start_ns,
                          end_ns=end_ns, from_ns=from_ns, lateness_ns=2 * NS_PER_S),
        instrument_stream("a:ETH-USDT", stored(sorted(eth, key=lambda t: t.sort_key)), start_ns=start_ns,
                          end_ns=end_ns, from_ns=from_ns, lateness_ns=2 * NS_PER_S, outages=outage),
    ]  # fmt: skip


START, END = 1_582_329_600 * NS_PER_S, 1_582_329_900 * NS_PER_S


def test_merged_stream_is_in_event_time_order_and_keeps_each_instruments_own_order() -> None:
    merged = list(merge(real_streams(START, END, START)))
    assert [(i.ts_ns, i.instrument) for i in merged] == sorted((i.ts_ns, i.instrument) for i in merged)
    for inst in ("a:ETH-USDT", "b:BTC-USDT"):
        own = [i for i in merged if i.instrument == inst]
        trades = [i.data.trade_id for i in own if i.kind == "trade"]
        assert trades == sorted(trades, key=int)  # numeric ids in exchange order
    in_range = [t for t in load_tardis() if START <= t.ts_ns < END]
    assert sum(1 for i in merged if i.kind == "trade" and i.instrument == "b:BTC-USDT") == len(in_range)


def test_any_position_or_seek_time_resumes_with_exactly_the_rest() -> None:
    full = list(merge(real_streams(START, END, START)))
    rng = random.Random(9)
    for index in rng.sample(range(len(full)), 60) + [0, len(full) - 1]:
        position = Position.of(full[index])
        resumed = list(after(merge(real_streams(START, END, position.ts_ns)), position))
        assert resumed == full[index + 1:], f"after item {index} ({position})"
    for ts in rng.sample(range(START, END), 30) + [full[40].ts_ns]:
        resumed = list(after(merge(real_streams(START, END, ts)), Position.before(ts)))
        assert resumed == [i for i in full if i.ts_ns >= ts]


def test_stored_trades_encode_to_the_very_bytes_of_encode_tick() -> None:
    for t in load_tardis()[:3000] + load_freqtrade():
        trade = replace(t, ts_ns=t.ts_ns // 1000 * 1000, source="replay", received_ns=None)
        assert encode_stored_trade(trade.instrument, trade.ts_ns, decimal_str(trade.price), decimal_str(trade.size),
                                   trade.side, trade.trade_id, "replay") == encode_tick(trade)  # fmt: skip
    odd = Trade("x:A-B", 5, Decimal("1.50"), Decimal("0.00000001"), "unknown", 'id "with" quotes\\é', "replay")
    assert encode_stored_trade("x:A-B", 5, "1.50", "0.00000001", "unknown", odd.trade_id, "replay") == encode_tick(odd)

