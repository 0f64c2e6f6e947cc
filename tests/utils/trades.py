"""Real recorded trades from ../shared/fixtures/trades, parsed with exact decimals."""

from __future__ import annotations

import csv
from dataclasses import replace
from decimal import Decimal

from candlekeep.bars import Bar, Interval, Trade, aggregate_trades
from tests.utils.fixture_server import fixtures_dir

TARDIS = fixtures_dir() / "trades" / "tardis_binance-futures_BTCUSDT_trades.csv"
FREQTRADE = fixtures_dir() / "trades" / "freqtrade_orderflow_public_trades_list.csv"


def load_tardis(instrument: str = "binance_futures:BTC-USDT") -> list[Trade]:
    """Tardis CSV: exchange,symbol,timestamp(us),local_timestamp(us),id,side,price,amount."""
    with TARDIS.open(newline="") as f:
        return [
            Trade(instrument, int(row["timestamp"]) * 1000, Decimal(row["price"]), Decimal(row["amount"]),
                  row["side"], row["id"], "tardis", int(row["local_timestamp"]) * 1000)
            for row in csv.DictReader(f)
        ]  # fmt: skip


def load_freqtrade(instrument: str = "binance:ETH-USDT") -> list[Trade]:
    """freqtrade (pandas export): ,timestamp(ms),id,type,side,price,amount,cost,date."""
    with FREQTRADE.open(newline="") as f:
        return [
            Trade(instrument, int(row["timestamp"]) * 1_000_000, Decimal(row["price"]), Decimal(row["amount"]),
                  row["side"], row["id"], "freqtrade")
            for row in csv.DictReader(f)
        ]  # fmt: skip


def reference(trades: list[Trade], start: int, end: int, prev_close: Decimal | None = None) -> list[Bar]:
    """What the aggregator must write: aggregate_trades of the trades, as provisional stream bars."""
    inst = trades[0].instrument if trades else "binance:BTC-USDT"
    bars = aggregate_trades(trades, Interval.M1, start, end, instrument=inst, source="stream", prev_close=prev_close)
    return [replace(b, final=False) for b in bars]
