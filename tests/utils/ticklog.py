"""A `ticks` log made from real recorded trades, as a producer would publish it, and the bars the
contract says it gives, computed independently with pandas.

    log, gaps = make_log(seed=7)          # trades + heartbeats + one producer death, in log order
    truth = pandas_bars(log)              # {(instrument, start): Bar}, by DESIGN.md's rules

The log: Tardis Binance-futures BTCUSDT and freqtrade ETH/USDT trades (../shared/fixtures/trades),
times truncated to the microsecond (as `ticks` stores them), a heartbeat at every 5 s of event time
without a trade, some trades arriving late (up to 40 records after their place) and some twice.
BTC's producer dies for 3 minutes in the middle: its trades of that span never reach the log, and
its restart begins with a disconnect.

The reference shares nothing with candlekeep.live: pandas resamples the unique trades; a quiet
minute is flat at the previous close only when no gap overlaps [the time of the trade that set
that close, the minute's end); a gap runs from the instrument's clock at the disconnect (the
largest time of its trades and heartbeats so far) to the time of its next trade or heartbeat; a
minute is closed when the final clock has passed its end + lateness.
"""

from __future__ import annotations

import decimal
import random
from dataclasses import replace
from decimal import Decimal

import pandas as pd

from candlekeep.bars import EXACT, NS_PER_S, Bar, Disconnect, Heartbeat, TickRecord, Trade
from tests.utils.trades import load_freqtrade, load_tardis

MIN_NS = 60 * NS_PER_S
BEAT_NS = 5 * NS_PER_S
LATENESS_NS = 2 * NS_PER_S


def _micro(trade: Trade) -> Trade:
    return replace(trade, ts_ns=trade.ts_ns - trade.ts_ns % 1000, received_ns=None)


def _with_beats(trades: list[Trade], instrument: str, end_ns: int) -> list[TickRecord]:
    """Trades in time order with a heartbeat at each 5 s step that had no trade, up to `end_ns`."""
    out: list[TickRecord] = []
    t = trades[0].ts_ns // BEAT_NS * BEAT_NS
    i = 0
    while t <= end_ns:
        traded = False
        while i < len(trades) and trades[i].ts_ns <= t:
            out.append(trades[i])
            i += 1
            traded = True
        if not traded:
            out.append(Heartbeat(instrument, t, "test"))
        t += BEAT_NS
    return out


def make_log(seed: int = 7) -> tuple[list[TickRecord], dict[str, tuple[int, int]]]:
    """The log, and per instrument the gap (start_ns, end_ns) the contract says it holds."""
    rng = random.Random(seed)
    btc = [_micro(t) for t in load_tardis("binance:BTC-USDT")[:1400]]
    eth = [_micro(t) for t in load_freqtrade("binance:ETH-USDT")]
    logs = {}
    gaps = {}
    # BTC: the producer dies at `dead` and restarts 3 minutes later, knowing nothing of the gap.
    span = btc[-1].ts_ns - btc[0].ts_ns
    dead = btc[0].ts_ns + span // 2
    back = dead + 3 * MIN_NS
    end = btc[-1].ts_ns // MIN_NS * MIN_NS + 3 * MIN_NS
    before = _with_beats([t for t in btc if t.ts_ns < dead], btc[0].instrument, dead)
    after = _with_beats([t for t in btc if t.ts_ns >= back], btc[0].instrument, end)
    after = [r for r in after if r.ts_ns >= back]
    logs[btc[0].instrument] = [*before, Disconnect(btc[0].instrument, back, "test", "producer started"), *after]
    eth_end = eth[-1].ts_ns // MIN_NS * MIN_NS + 2 * MIN_NS
    logs[eth[0].instrument] = _with_beats(eth, eth[0].instrument, eth_end)
    for instrument, log in logs.items():
        gap = _gap_of(log)
        if gap is not None:
            gaps[instrument] = gap
        logs[instrument] = _perturb(log, rng)
    # One log, the instruments interleaved (each keeps its own order).
    merged: list[TickRecord] = []
    queues = [list(reversed(v)) for v in logs.values()]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        merged.append(q.pop())
    return merged, gaps


def _perturb(log: list[TickRecord], rng: random.Random) -> list[TickRecord]:
    """Some trades move up to 40 records later (late arrivals), some come twice; nothing moves
    across a disconnect (its neighbours define the gap)."""
    cut = next((k for k, r in enumerate(log) if isinstance(r, Disconnect)), None)
    pieces = [log] if cut is None else [log[:cut], [log[cut]], log[cut + 1:]]
    out: list[TickRecord] = []
    for piece in pieces:
        piece = list(piece)
        if len(piece) > 1:
            for k in range(len(piece) - 2, 0, -1):
                if isinstance(piece[k], Trade) and rng.random() < 0.03:
                    dest = min(len(piece) - 1, k + rng.randint(1, 40))
                    piece.insert(dest, piece.pop(k))
            for k in range(len(piece) - 1, 0, -1):
                if isinstance(piece[k], Trade) and rng.random() < 0.05:
                    piece.insert(min(len(piece), k + rng.randint(1, 20)), piece[k])
        out += piece
    return out


def _gap_of(log: list[TickRecord]) -> tuple[int, int] | None:
    clock = None
    for k, r in enumerate(log):
        if isinstance(r, Disconnect):
            nxt = next(x for x in log[k + 1:] if not isinstance(x, Disconnect))
            start = clock if clock is not None else r.ts_ns
            return start, max(nxt.ts_ns, start)
        clock = r.ts_ns if clock is None else max(clock, r.ts_ns)
    return None


def pandas_bars(log: list[TickRecord], lateness_ns: int = LATENESS_NS) -> dict[tuple[str, int], Bar]:
    """The bars the contract says `log` gives (see the module docstring)."""
    out: dict[tuple[str, int], Bar] = {}
    for instrument in sorted({r.instrument for r in log}):
        mine = [r for r in log if r.instrument == instrument]
        trades = [r for r in mine if isinstance(r, Trade)]
        clock = max(r.ts_ns for r in mine if not isinstance(r, Disconnect))
        gaps = []
        for k, r in enumerate(mine):
            if isinstance(r, Disconnect):
                gaps.append(_gap_of(mine[: k + 1] + [x for x in mine[k + 1:] if not isinstance(x, Disconnect)][:1]))
        frame = pd.DataFrame({
            "time": pd.to_datetime([t.ts_ns for t in trades], unit="ns", utc=True),
            "ts": [t.ts_ns for t in trades], "id": [int(t.trade_id) for t in trades],
            "price": [t.price for t in trades], "size": [t.size for t in trades],
        }).drop_duplicates("id")  # fmt: skip
        frame = frame.sort_values(["ts", "id"], kind="stable").set_index("time")
        with decimal.localcontext(EXACT):
            frame["quote"] = [p * s for p, s in zip(frame["price"], frame["size"], strict=True)]
            g = frame.resample("1min")
            bars = pd.DataFrame({
                "open": g["price"].first(), "high": g["price"].max(), "low": g["price"].min(),
                "close": g["price"].last(), "volume": g["size"].sum(), "quote": g["quote"].sum(),
                "n": g["price"].count(), "last_ts": g["ts"].max(),
            })  # fmt: skip
        closed_until = (clock - lateness_ns) // MIN_NS * 60  # every minute before it is closed
        index = pd.date_range(bars.index[0], pd.Timestamp(closed_until - 60, unit="s", tz="UTC"), freq="1min")
        bars = bars.reindex(index)
        ref_close, ref_ts = None, None
        for when, row in bars.iterrows():
            start = int(when.timestamp())
            if row["n"] > 0:
                ref_close, ref_ts = row["close"], int(row["last_ts"])
                out[(instrument, start)] = Bar(instrument, "1m", start, row["open"], row["high"], row["low"],
                                               row["close"], row["volume"], row["quote"], int(row["n"]), "stream",
                                               False)  # fmt: skip
                continue
            end_ns = (start + 60) * NS_PER_S
            if ref_close is None or any(gs < end_ns and ge > ref_ts and ge > gs for gs, ge in gaps):
                ref_close = None  # after a gap nothing is flat until the next trade
                continue
            zero = Decimal(0)
            out[(instrument, start)] = Bar(instrument, "1m", start, ref_close, ref_close, ref_close, ref_close, zero,
                                           zero, 0, "stream", False)  # fmt: skip
    return out
