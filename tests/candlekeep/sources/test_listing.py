"""candlekeep.sources.listing: whether a source knows an instrument, asked before anything is created.

CryptoCompare over the loopback fixture server: the real recorded 30-day histoday body (a known pair),
the unknown-pair error bodies quoted from public issues (see test_cryptocompare.py), and the real
recorded rate-limit error (could not ask: raises, never "unknown").
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from candlekeep.instruments import Instrument
from candlekeep.settings import Settings
from candlekeep.sources.cryptocompare import RateLimited
from candlekeep.sources.listing import SIMULATOR_UNIVERSE, VENUE_LISTINGS, SourceListing, make_listing
from tests.candlekeep.sources.test_cryptocompare import (
    HISTODAY,
    TYPE99_MONTH,
    UNKNOWN_PAIR_TYPE1,
    UNKNOWN_PAIR_TYPE2,
    V2_DAY_30,
    make_client,
)
from tests.utils.fixture_server import FixtureServer, Reply

NOW = 1_654_819_200  # 2022-06-10, the day after the recording's last bar


@pytest.fixture
def server() -> Iterator[FixtureServer]:
    with FixtureServer() as s:
        yield s


def test_a_pair_with_recorded_daily_bars_is_known(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(V2_DAY_30))
    listing = SourceListing(make_client(server, now=NOW), clock=lambda: NOW)
    assert listing.unknown(Instrument.parse("cccagg:BTC-USD")) is None
    assert len(server.requests) == 1  # one call decides


@pytest.mark.parametrize(("body", "instrument"), [(UNKNOWN_PAIR_TYPE2, "cccagg:EZETH-USD"),
                                                  (UNKNOWN_PAIR_TYPE1, "binance:ETH-USD")])
def test_an_unknown_pair_is_unknown_with_the_sources_reason(server: FixtureServer, body: str, instrument: str) -> None:
    server.add(HISTODAY, Reply.json(body))
    reason = SourceListing(make_client(server, now=NOW), clock=lambda: NOW).unknown(Instrument.parse(instrument))
    assert reason is not None
    assert instrument in reason and "market does not exist for this coin pair" in reason


def test_a_pair_without_recent_trades_is_unknown(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(V2_DAY_30))
    later = NOW + 60 * 86_400  # the recording holds nothing in the 7 days before this
    reason = SourceListing(make_client(server, now=later), clock=lambda: later).unknown(Instrument.parse("cccagg:BTC-USD"))
    assert reason == "cryptocompare has no trades of cccagg:BTC-USD in the last 7 days"


def test_a_rate_limited_source_raises_instead_of_answering(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(TYPE99_MONTH))
    with pytest.raises(RateLimited):
        SourceListing(make_client(server, now=NOW), clock=lambda: NOW).unknown(Instrument.parse("cccagg:BTC-USD"))


def test_the_simulator_serves_its_universe_only() -> None:
    listing = make_listing(Settings(source="simulator", instruments=["kraken:DOT-EUR"]))
    assert listing.unknown(Instrument.parse("kraken:DOT-EUR")) is None  # configured
    assert listing.unknown(Instrument.parse("coinbase:ETH-USD")) is None  # in the documented universe
    assert "coinbase:ETH-USD" in SIMULATOR_UNIVERSE
    reason = listing.unknown(Instrument.parse("cccagg:FOO-BAR"))
    assert reason is not None and "cccagg:FOO-BAR" in reason


def test_an_exchange_listing_is_asked_before_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(VENUE_LISTINGS, "kraken", lambda i: None if i.base == "DOT" else f"kraken lists no {i.base}")
    listing = make_listing(Settings(source="simulator"))
    assert listing.unknown(Instrument.parse("kraken:DOT-EUR")) is None
    assert listing.unknown(Instrument.parse("kraken:BTC-USD")) == "kraken lists no BTC"
