"""The simulator's books: pure in (instrument, time, seed), bracketing its trades, deltas that rebuild them."""

from __future__ import annotations

from decimal import Decimal

from candlekeep.bars import NS_PER_S
from candlekeep.books import BookDelta, BookSnapshot
from candlekeep.instruments import Instrument
from candlekeep.sources.simulator import Simulator
from candlekeep.sources.simulator_book import SimulatorBooks

S = 1_700_000_000
BTC = Instrument.parse("cccagg:BTC-USD")


def _sim(seed: int = 5) -> SimulatorBooks:
    return SimulatorBooks(Simulator(seed, now=lambda: 2e9), levels=25, snapshot_every_s=60)


def test_best_bid_and_ask_bracket_every_trade_of_their_second() -> None:
    sim = _sim()
    checked = 0
    for s in range(S, S + 300):
        bids, asks = sim.book_at(BTC, s)
        assert bids[0][0] < asks[0][0], "never crossed"
        assert all(bids[i][0] > bids[i + 1][0] for i in range(len(bids) - 1))
        assert all(asks[i][0] < asks[i + 1][0] for i in range(len(asks) - 1))
        for trade in sim.simulator.trades(BTC, s * NS_PER_S, (s + 1) * NS_PER_S):
            assert bids[0][0] <= trade.price <= asks[0][0]
            checked += 1
    assert checked > 50


def test_deltas_applied_to_the_snapshot_rebuild_every_book() -> None:
    sim = _sim()
    book: dict[str, dict[Decimal, Decimal]] = {}
    updates = list(sim.updates(BTC, (S + 30) * NS_PER_S, (S + 150) * NS_PER_S))
    assert [u.ts_ns for u in updates] == [s * NS_PER_S for s in range(S + 30, S + 150)]
    assert isinstance(updates[0], BookSnapshot)  # the start of any range
    snapshots = [S + 30] + [s for s in range(S + 31, S + 150) if s % 60 == 0]
    assert len(snapshots) == 3
    assert [u.sequence for u in updates if isinstance(u, BookSnapshot)] == snapshots
    for update in updates:
        if isinstance(update, BookSnapshot):
            book = {"bids": dict(update.bids), "asks": dict(update.asks)}
        else:
            assert isinstance(update, BookDelta) and update.prev_sequence == update.sequence - 1
            assert update.bids or update.asks
            for side, levels in (("bids", update.bids), ("asks", update.asks)):
                for price, size in levels:
                    if size == 0:
                        del book[side][price]  # only levels that exist are removed
                    else:
                        book[side][price] = size
        bids, asks = sim.book_at(BTC, update.sequence)
        assert sorted(book["bids"].items(), reverse=True) == list(bids)
        assert sorted(book["asks"].items()) == list(asks)


def test_a_pure_function_of_instrument_time_and_seed() -> None:
    whole = list(_sim().updates(BTC, S * NS_PER_S, (S + 120) * NS_PER_S))
    late = list(_sim().updates(BTC, (S + 40) * NS_PER_S, (S + 120) * NS_PER_S))
    assert (S + 40) % 60 == 0 and whole[40:] == late  # a snapshot second either way
    assert _sim(6).book_at(BTC, S) != _sim(5).book_at(BTC, S)
    eth = Instrument.parse("cccagg:ETH-USD")
    assert _sim().book_at(eth, S) != _sim().book_at(BTC, S)
