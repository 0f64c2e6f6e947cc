"""TickStore on a real PostgreSQL: idempotent batched writes, exact decimals, microsecond times, reads."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Engine, text

from candlekeep.bars import NS_PER_S, Trade, decimal_str
from candlekeep.storage.ticks import TickStore
from tests.utils.backend import backend
from tests.utils.trades import load_tardis

BTC = "coinbase:BTC-USD"
T0 = int(datetime(2024, 3, 10, 23, 59, tzinfo=UTC).timestamp())  # a minute before midnight


def tick(offset_ns: int, price: str, trade_id: str, size: str = "1", instrument: str = BTC) -> Trade:
    return Trade(instrument, T0 * NS_PER_S + offset_ns, Decimal(price), Decimal(size), "sell", trade_id, "test")


def count(engine: Engine, instrument: str | None = None) -> int:
    with engine.connect() as conn:
        sql = "SELECT count(*) FROM ticks" + (" WHERE instrument = :i" if instrument else "")
        return conn.execute(text(sql), {"i": instrument}).scalar_one()


def as_stored(trade: Trade) -> Trade:
    """What a read gives back: time truncated to the microsecond, no receipt time."""
    return replace(trade, ts_ns=trade.ts_ns - trade.ts_ns % 1000, received_ns=None)


def test_round_trip_keeps_every_digit_and_truncates_to_microseconds(engine: Engine) -> None:
    store = TickStore(engine)
    trades = [
        tick(1, "29234.50", "1", size="0.00000001"),
        tick(59 * NS_PER_S + 999_999_999, "1E-8", "2", size="1.50"),  # 23:59:59.999999999 stays in its minute
        tick(60 * NS_PER_S + 1500, "0.1000", "tab\there\\and\nnewline"),  # next day, escaped id
    ]
    assert store.insert_trades(trades) == 3
    back = store.read_trades(BTC, T0 * NS_PER_S, (T0 + 120) * NS_PER_S)
    assert back == [as_stored(t) for t in trades]
    assert [(decimal_str(t.price), decimal_str(t.size)) for t in back] == [
        ("29234.50", "0.00000001"), ("0.00000001", "1.50"), ("0.1000", "1"),
    ]  # fmt: skip
    assert back[1].ts_ns == (T0 + 59) * NS_PER_S + 999_999_000
    with engine.connect() as conn:  # the two days went to their own partitions (or 1-day chunks)
        parts = conn.execute(text("SELECT tableoid::regclass::text FROM ticks ORDER BY ts")).scalars().all()
    if backend(engine) == "native":
        assert parts == ["ticks_p20240310", "ticks_p20240310", "ticks_p20240311"]
    else:
        assert parts[0] == parts[1] != parts[2]


def test_inserting_again_stores_nothing_twice(engine: Engine) -> None:
    store = TickStore(engine)
    first = [tick(i * NS_PER_S, "100", str(i)) for i in range(10)]
    assert store.insert_trades(first) == 10
    assert store.insert_trades(first) == 0  # replayed batch: the merge path, nothing new
    overlapping = first[5:] + [tick(i * NS_PER_S, "101", str(i)) for i in range(10, 15)]
    assert store.insert_trades(overlapping, batch_size=3) == 5
    assert count(engine) == 15
    # Same id at another time is another row of the unique key (instrument, ts, trade_id).
    assert store.insert_trades([tick(30 * NS_PER_S, "100", "0")]) == 1


def test_real_trades_round_trip_in_exchange_order(engine: Engine) -> None:
    store = TickStore(engine)
    trades = load_tardis()
    assert store.insert_trades(reversed(trades), batch_size=4096) == len(trades)
    assert count(engine, trades[0].instrument) == len(trades)
    start, end = trades[0].ts_ns, trades[-1].ts_ns + 1
    back = store.read_trades(trades[0].instrument, start, end)
    assert back == sorted((as_stored(t) for t in trades), key=lambda t: t.sort_key)
    # Bounds: [start, end) on the stored (microsecond) times.
    middle = trades[5000].ts_ns
    assert all(t.ts_ns >= middle for t in store.read_trades(trades[0].instrument, middle, end))
    assert len(store.read_trades(trades[0].instrument, start, middle)) == sum(t.ts_ns < middle for t in trades)


def test_last_trade_before_is_the_last_in_exchange_order(engine: Engine) -> None:
    store = TickStore(engine)
    assert store.last_trade_before(BTC, (T0 + 60) * NS_PER_S) is None
    store.insert_trades([
        tick(1 * NS_PER_S, "10", "9"), tick(2 * NS_PER_S, "11", "10"), tick(2 * NS_PER_S, "12", "9"),
        tick(5 * NS_PER_S, "13", "11"), tick(3 * NS_PER_S, "99", "1", instrument="coinbase:ETH-USD"),
    ])  # fmt: skip
    last = store.last_trade_before(BTC, (T0 + 5) * NS_PER_S)
    assert (last.price, last.trade_id) == (Decimal("11"), "10")  # at 2 s: ids 9 < 10 numerically
    assert store.last_trade_before(BTC, (T0 + 1) * NS_PER_S) is None
