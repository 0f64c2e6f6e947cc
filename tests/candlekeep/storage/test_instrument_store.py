"""InstrumentStore round trips."""

from __future__ import annotations

from sqlalchemy import Engine, text

from candlekeep.instruments import Instrument
from candlekeep.storage.instruments import InstrumentStore


def test_register_is_idempotent(engine: Engine) -> None:
    store = InstrumentStore(engine)
    btc, eth = Instrument.parse("coinbase:BTC-USD"), Instrument.parse("binance:ETH-USDT")
    assert store.register([btc, eth]) == ["binance:ETH-USDT", "coinbase:BTC-USD"]
    assert store.register([btc, eth, btc]) == []
    assert store.list_ids() == ["binance:ETH-USDT", "coinbase:BTC-USD"]
    assert store.list_ids(tracked_only=True) == []
    with engine.connect() as conn:
        row = conn.execute(text("SELECT venue, base, quote FROM instruments WHERE id = 'binance:ETH-USDT'")).one()
    assert tuple(row) == ("binance", "ETH", "USDT")


def test_tracking(engine: Engine) -> None:
    store = InstrumentStore(engine)
    store.register([Instrument.parse("cccagg:BTC-USD")])
    assert store.register(["cccagg:BTC-USD", "cccagg:SOL-USD"], tracked=True) == ["cccagg:SOL-USD"]
    assert store.list_ids(tracked_only=True) == ["cccagg:BTC-USD", "cccagg:SOL-USD"]
    store.register(["cccagg:BTC-USD"])  # registering untracked does not untrack
    assert store.list_ids(tracked_only=True) == ["cccagg:BTC-USD", "cccagg:SOL-USD"]
    assert store.set_tracked("cccagg:BTC-USD", False)
    assert store.list_ids(tracked_only=True) == ["cccagg:SOL-USD"]
    assert not store.set_tracked("cccagg:XRP-USD", True)
    assert store.register([]) == []
