"""CryptoCompareClient against recorded payloads served over loopback (tests/utils/fixture_server.py).

The truth for every number is the recorded JSON text itself: each bar field must equal, digit for
digit, the token in the payload (read here with a regex, independently of the client's parser).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal

import pytest

from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument
from candlekeep.settings import Settings
from candlekeep.sources import make_source
from candlekeep.sources.cryptocompare import (
    DATA_API_URL,
    CryptoCompareClient,
    RateLimited,
    SourceUnavailable,
    UnknownMarket,
    UnsupportedInterval,
    data_api_bar,
    data_api_rows,
    loads,
    min_api_bar,
    min_api_rows,
)
from candlekeep.sources.ratelimit import RateLimiter, Window
from tests.utils.fixture_server import FixtureServer, PagedHistory, Reply, cassette_interactions, fixture_bytes
from tests.utils.net import free_port

HISTOMINUTE = "/data/v2/histominute"
HISTODAY = "/data/v2/histoday"
SPOT_HOURS = "/spot/v1/historical/hours"
SPOT_DAYS = "/spot/v1/historical/days"

FULL_MINUTES = "ohlcv/cryptocompare_min_api_v1_histominute_BTC_USD.body.json"  # 1441 bars
V1_MINUTE_10 = "cryptocompare/min_api_v1/btc_to_usd_histo_minute_with_limit_10.interaction0.status200.body.json"
V1_HOUR_10 = "cryptocompare/min_api_v1/btc_to_usd_histo_hour_with_limit_10.interaction0.status200.body.json"
V1_DAY_10 = "cryptocompare/min_api_v1/btc_to_usd_histo_day_with_limit_10.interaction0.status200.body.json"
V2_DAY_30 = "cryptocompare/min_api_v2/histoday_BTC_USD_limit30.json"
TYPE99_SECOND = "cryptocompare/errors/min_api_rate_limit_error_type99_api-guides_pr3.json"  # 53/50 calls this second
TYPE99_MONTH = "cryptocompare/errors/min_api_rate_limit_error_type99_telliot_pr388.json"  # day and month spent
DATA_API_404 = "cryptocompare/errors/data_api_index_cc_v1_historical_hours_404_to_ts_before_first.json"
ROTKI_PAGING = "cryptocompare/data_api/rotki_test_cryptocompare_histohour_data_going_forward[True].vcr.yaml"
ROTKI_STARK = "cryptocompare/data_api/rotki_test_starknet.interaction0.status200.body.json"
ROTKI_SPECIAL = [
    f"cryptocompare/data_api/rotki_test_special_cases.interaction{i}.status200.body.json" for i in (2, 3, 4, 5)
]

# Unknown-pair bodies are not in shared/fixtures. The first is the body logged in
# https://github.com/status-im/status-app/issues/17703 (its Message lists many pairs; one kept);
# the second is the 2018 body printed in https://github.com/ttsteiger/cryptocompy/issues/12, as JSON.
UNKNOWN_PAIR_TYPE2 = (
    '{"Response":"Error","Message":"cccagg_or_exchange market does not exist for this coin pair (EZETH-USD)",'
    '"HasWarning":false,"Type":2,"RateLimit":{},"Data":{},"Cooldown":0}'
)
UNKNOWN_PAIR_TYPE1 = (
    '{"Response":"Error","Message":"Binance market does not exist for this coin pair (ETH-USD)",'
    '"Type":1,"Aggregated":false,"Data":[]}'
)

BTC_USD = Instrument("cccagg", "BTC", "USD")
CADLI_BTC_USD = Instrument("cadli", "BTC", "USD")

# -- the independent truth: numbers read straight from the payload text ------------------------

_OBJECT = re.compile(r"\{[^{}]*\}")
_NUMBER = re.compile(r'"(\w+)":(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=[,}])')


def raw_rows(body: bytes | str) -> list[dict[str, str]]:
    """The number tokens of each bar object in the (last) `"Data":[` array, as written."""
    text = body.decode() if isinstance(body, bytes) else body
    array = text[text.rindex('"Data":[') + len('"Data":[') :]
    array = array[: array.index("]")]
    return [dict(_NUMBER.findall(obj)) for obj in _OBJECT.findall(array)]


MIN_API_FIELDS = {"open": "open", "high": "high", "low": "low", "close": "close", "volume": "volumefrom",
                  "quote_volume": "volumeto"}
DATA_API_FIELDS = {"open": "OPEN", "high": "HIGH", "low": "LOW", "close": "CLOSE", "volume": "VOLUME",
                   "quote_volume": "QUOTE_VOLUME"}


def assert_exact(bar: Bar, row: dict[str, str], fields: dict[str, str]) -> None:
    for attr, key in fields.items():
        value = getattr(bar, attr)
        assert isinstance(value, Decimal)
        # as_tuple compares sign, every digit and the exponent: 3341.10 != 3341.1 here.
        assert value.as_tuple() == Decimal(row[key]).as_tuple(), f"{bar.start} {attr}: {value} != {row[key]}"


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FixtureServer]:
    with FixtureServer() as s:
        yield s


class Sleeps(list[float]):
    """Records the backoff the client asks for, without waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_client(server: FixtureServer, *, now: float, **kwargs: object) -> CryptoCompareClient:
    options: dict[str, object] = {
        "base_url": server.url,
        "api_key": "test-key",
        "clock": lambda: now,
        "sleep": Sleeps(),
        "max_attempts": 4,
        "max_wait": 5.0,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "timeout": 2.0,
    }
    options.update(kwargs)
    return CryptoCompareClient(**options)  # type: ignore[arg-type]


def fetch(client: CryptoCompareClient, instrument: Instrument, interval: Interval, start: int, end: int) -> list[Bar]:
    return [bar for page in client.bars(instrument, interval, start, end) for bar in page]


# -- min-api: paging over the real 1441-minute recording ----------------------------------------


def test_pages_backwards_through_real_history_without_gaps_or_repeats(server: FixtureServer) -> None:
    body = fixture_bytes(FULL_MINUTES)
    rows = raw_rows(body)
    times = [int(r["time"]) for r in rows]
    assert len(rows) == 1441
    server.add_handler(HISTOMINUTE, PagedHistory(body, 60))
    # The recording's last bar (time == TimeTo, volumefrom 0) was still forming when recorded.
    now = times[-1] + 30
    client = make_client(server, now=now, page_size=500)

    pages = client.bars(BTC_USD, Interval.M1, times[0], times[-1] + 60)
    first_page = next(pages)
    assert len(server.requests) == 1  # lazy: one page fetched per page consumed
    all_pages = [first_page, *pages]

    bars = sorted((b for page in all_pages for b in page), key=lambda b: b.start)
    assert [b.start for b in bars] == times[:-1]  # every closed bucket once, the forming one dropped
    for bar, row in zip(bars, rows, strict=False):
        assert_exact(bar, row, MIN_API_FIELDS)
        assert (bar.instrument, bar.interval, bar.trades, bar.source, bar.final) == (
            "cccagg:BTC-USD", "1m", None, "cryptocompare", True)
    assert all(len(page) <= 501 for page in all_pages)
    assert all(page == sorted(page, key=lambda b: b.start) for page in all_pages)

    # Page seams follow the documented recipe: the next toTs is the earliest time received.
    queries = [r.query for r in server.requests]
    assert len(queries) == 3
    assert queries[0]["toTs"] == str(times[-2])
    for query, page in zip(queries[1:], all_pages, strict=False):
        assert query["toTs"] == str(page[0].start)
    assert all(int(q["limit"]) <= 500 for q in queries)
    assert {(q["fsym"], q["tsym"], q["e"]) for q in queries} == {("BTC", "USD", "CCCAGG")}


def test_paging_stops_at_the_zero_bars_before_the_pair_existed(server: FixtureServer) -> None:
    body = fixture_bytes(FULL_MINUTES)
    times = [int(r["time"]) for r in raw_rows(body)]
    server.add_handler(HISTOMINUTE, PagedHistory(body, 60, pad_before_listing=True))
    client = make_client(server, now=times[-1] + 30, page_size=500)

    day_before = times[0] - 86400
    bars = fetch(client, BTC_USD, Interval.M1, day_before, times[-1] + 60)

    assert sorted(b.start for b in bars) == times[:-1]
    assert not any(b.volume == 0 and b.open == 0 for b in bars)
    # The third page reached the zero padding; no request went further back.
    assert len(server.requests) == 3
    assert min(int(r.query["toTs"]) for r in server.requests) > times[0]


def test_nothing_closed_in_range_makes_no_request(server: FixtureServer) -> None:
    client = make_client(server, now=1_502_421_270)
    assert fetch(client, BTC_USD, Interval.M1, 1_502_421_240, 1_502_421_300) == []  # only the forming bar
    assert fetch(client, BTC_USD, Interval.M1, 1_502_421_000, 1_502_421_000) == []  # empty range
    assert server.requests == []


# -- min-api: envelopes and recorded bodies -----------------------------------------------------


def test_v1_body_parses_and_the_forming_bar_is_dropped(server: FixtureServer) -> None:
    body = fixture_bytes(V1_MINUTE_10)
    rows = raw_rows(body)
    time_from, time_to = int(rows[0]["time"]), int(rows[-1]["time"])
    server.add(HISTOMINUTE, Reply(200, body))  # served whatever the query, like a stale proxy
    client = make_client(server, now=time_to + 59)

    bars = fetch(client, BTC_USD, Interval.M1, time_from, time_to + 60)

    assert [b.start for b in bars] == [int(r["time"]) for r in rows[:-1]]
    for bar, row in zip(bars, rows, strict=False):
        assert_exact(bar, row, MIN_API_FIELDS)
    assert len(server.requests) == 1


def test_v2_histoday_parses_every_digit(server: FixtureServer) -> None:
    body = fixture_bytes(V2_DAY_30)
    rows = raw_rows(body)
    assert len(rows) == 31
    server.add(HISTODAY, Reply(200, body))
    time_from, time_to = int(rows[0]["time"]), int(rows[-1]["time"])

    closed = fetch(make_client(server, now=time_to + 86400), BTC_USD, Interval.D1, time_from, time_to + 86400)
    assert [b.start for b in closed] == [int(r["time"]) for r in rows]
    for bar, row in zip(closed, rows, strict=True):
        assert_exact(bar, row, MIN_API_FIELDS)
        assert bar.interval == "1d" and not bar.problems()

    forming = fetch(make_client(server, now=time_to + 3600), BTC_USD, Interval.D1, time_from, time_to + 86400)
    assert [b.start for b in forming] == [int(r["time"]) for r in rows[:-1]]


@pytest.mark.parametrize("relative", [FULL_MINUTES, V1_MINUTE_10, V1_HOUR_10, V1_DAY_10, V2_DAY_30])
def test_every_recorded_min_api_body_parses_exactly(relative: str) -> None:
    body = fixture_bytes(relative)
    rows = raw_rows(body)
    parsed = min_api_rows(loads(body))
    assert len(parsed) == len(rows) > 0
    for obj, row in zip(parsed, rows, strict=True):
        assert_exact(min_api_bar(obj, BTC_USD, Interval.M1), row, MIN_API_FIELDS)


def test_api_key_goes_in_the_authorization_header(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(V2_DAY_30))
    fetch(make_client(server, now=1_654_819_200), BTC_USD, Interval.D1, 1_654_646_400, 1_654_732_800)
    fetch(make_client(server, now=1_654_819_200, api_key=None), BTC_USD, Interval.D1, 1_654_646_400, 1_654_732_800)
    with_key, without_key = server.requests
    assert with_key.headers["authorization"] == "Apikey test-key"
    assert "authorization" not in without_key.headers
    assert "api_key" not in with_key.query  # the key stays out of URLs (and so out of logs)


@pytest.mark.parametrize(
    ("venue", "e"), [("cccagg", "CCCAGG"), ("coinbase", "Coinbase"), ("binance", "Binance"), ("kraken", "Kraken")]
)
def test_venue_maps_to_the_exchange_parameter(server: FixtureServer, venue: str, e: str) -> None:
    server.add(HISTODAY, Reply.fixture(V2_DAY_30))
    instrument = Instrument(venue, "BTC", "USD")
    fetch(make_client(server, now=1_654_819_200), instrument, Interval.D1, 1_654_646_400, 1_654_732_800)
    (request,) = server.requests
    assert (request.query["e"], request.query["fsym"], request.query["tsym"]) == (e, "BTC", "USD")


@pytest.mark.parametrize("interval", [Interval.M5, Interval.M15, Interval.M30, Interval.H4])
@pytest.mark.parametrize("flavour", ["min-api", "data-api"])
def test_intervals_the_source_does_not_serve_are_refused(server: FixtureServer, interval: Interval,
                                                         flavour: str) -> None:
    client = make_client(server, now=1_654_819_200, flavour=flavour)
    with pytest.raises(UnsupportedInterval, match=interval.value):
        fetch(client, CADLI_BTC_USD, interval, 1_654_000_000, 1_654_732_800)
    assert server.requests == []


# -- min-api: errors, retries and budgets --------------------------------------------------------


def test_rate_limit_body_with_http_200_is_retried_then_succeeds(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(TYPE99_SECOND), Reply.fixture(V2_DAY_30))
    sleeps = Sleeps()
    client = make_client(server, now=1_654_819_200, sleep=sleeps)

    bars = fetch(client, BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)

    assert len(bars) == 31
    assert len(server.requests) == 2
    # Only the per-second window was exhausted (53 of 50): wait at least that second.
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 5.0


def test_exhausted_monthly_budget_fails_fast_as_rate_limited(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(TYPE99_MONTH))
    sleeps = Sleeps()
    client = make_client(server, now=1_654_819_200, sleep=sleeps)

    with pytest.raises(RateLimited, match="rate limit") as caught:
        fetch(client, BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)

    # 10973 of 7500 calls today, 82758 of 50000 this month: no point waiting within a fetch.
    assert caught.value.retry_after == 31 * 86400
    assert len(server.requests) == 1 and sleeps == []


def test_http_429_honours_retry_after(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply(429, b"", {"Retry-After": "2"}), Reply.fixture(V2_DAY_30))
    sleeps = Sleeps()
    bars = fetch(make_client(server, now=1_654_819_200, sleep=sleeps), BTC_USD, Interval.D1, 1_652_140_800,
                 1_654_819_200)
    assert len(bars) == 31
    assert sleeps == [2.0]


def test_persistent_429_ends_as_rate_limited(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply(429, b""))
    with pytest.raises(RateLimited):
        fetch(make_client(server, now=1_654_819_200), BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)
    assert len(server.requests) == 4


@pytest.mark.parametrize(("body", "instrument"), [
    (UNKNOWN_PAIR_TYPE2, Instrument("cccagg", "EZETH", "USD")),
    (UNKNOWN_PAIR_TYPE1, Instrument("binance", "ETH", "USD")),
])
def test_unknown_pair_fails_fast_naming_the_instrument(server: FixtureServer, body: str,
                                                       instrument: Instrument) -> None:
    server.add(HISTODAY, Reply.json(body))
    with pytest.raises(UnknownMarket, match=re.escape(instrument.id)):
        fetch(make_client(server, now=1_654_819_200), instrument, Interval.D1, 1_652_140_800, 1_654_819_200)
    assert len(server.requests) == 1


def test_server_errors_are_retried_then_succeed(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply(500, b"oops"), Reply(502, b"<html>bad gateway</html>"), Reply.fixture(V2_DAY_30))
    sleeps = Sleeps()
    bars = fetch(make_client(server, now=1_654_819_200, sleep=sleeps), BTC_USD, Interval.D1, 1_652_140_800,
                 1_654_819_200)
    assert len(bars) == 31
    assert len(server.requests) == 3 and len(sleeps) == 2


def test_repeated_500_becomes_source_unavailable_after_the_budget(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply(500, b"internal error"))
    sleeps = Sleeps()
    client = make_client(server, now=1_654_819_200, sleep=sleeps, backoff_base=0.01, backoff_cap=0.03)

    with pytest.raises(SourceUnavailable, match="4 attempt"):
        fetch(client, BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)

    assert len(server.requests) == 4
    # Exponential with jitter in [d/2, d], capped at backoff_cap.
    for attempt, slept in enumerate(sleeps, start=1):
        full = min(0.03, 0.01 * 2 ** (attempt - 1))
        assert full / 2 <= slept <= full


def test_the_total_wait_budget_bounds_retries(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply(503, b""))
    sleeps = Sleeps()
    client = make_client(server, now=1_654_819_200, sleep=sleeps, max_attempts=10, backoff_base=1.0,
                         backoff_cap=100.0, max_wait=5.0)
    with pytest.raises(SourceUnavailable):
        fetch(client, BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)
    assert sum(sleeps) <= 5.0
    assert len(server.requests) < 10


def test_a_timeout_is_retried(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(V2_DAY_30, delay=1.0), Reply.fixture(V2_DAY_30))
    client = make_client(server, now=1_654_819_200, timeout=0.2)
    assert len(fetch(client, BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)) == 31
    assert len(server.requests) == 2


def test_connection_refused_becomes_source_unavailable() -> None:
    client = CryptoCompareClient(base_url=f"http://127.0.0.1:{free_port()}", max_attempts=2,
                                 backoff_base=0.001, sleep=Sleeps(), clock=lambda: 1_654_819_200)
    with pytest.raises(SourceUnavailable, match="ConnectionError"):
        fetch(client, BTC_USD, Interval.D1, 1_652_140_800, 1_654_819_200)


def test_calls_go_through_the_rate_limiter(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(TYPE99_SECOND), Reply.fixture(V2_DAY_30))
    waits = Sleeps()
    limiter = RateLimiter([Window(1, 60)], clock=lambda: 1000.0 + sum(waits), sleep=waits)
    fetch(make_client(server, now=1_654_819_200, limiter=limiter), BTC_USD, Interval.D1, 1_652_140_800,
          1_654_819_200)
    assert len(server.requests) == 2
    assert waits == [60.0]  # the retry is a call too, and waited for the limiter's window


# -- data-api (CoinDesk) -------------------------------------------------------------------------


def test_data_api_pages_real_recording_until_the_404_before_first_data(server: FixtureServer) -> None:
    # rotki's recording of /index/cc/v1/historical/hours, served at the spot path (no spot recording exists).
    server.add_cassette(ROTKI_PAGING, path=SPOT_HOURS, match=("market", "instrument", "to_ts"))
    recorded = cassette_interactions(ROTKI_PAGING)
    rows = raw_rows(recorded[1]["response"]["body"]["string"]) + raw_rows(recorded[0]["response"]["body"]["string"])
    times = [int(r["TIMESTAMP"]) for r in rows]
    assert times == list(range(1_279_324_800, 1_287_964_800 + 1, 3600))  # 2401 contiguous hours

    client = make_client(server, now=1_758_240_000, flavour="data-api")
    pages = list(client.bars(CADLI_BTC_USD, Interval.H1, 1_279_324_800 - 10 * 3600, 1_287_964_800 + 3600))

    bars = sorted((b for page in pages for b in page), key=lambda b: b.start)
    assert [b.start for b in bars] == times
    for bar, row in zip(bars, rows, strict=True):
        assert_exact(bar, row, DATA_API_FIELDS)
        assert bar.trades is None  # index rows count index updates, not trades
    assert [len(page) for page in pages] == [2000, 401]
    # Rows never repeat: to_ts steps to one interval before the earliest row; the 404 ends paging.
    assert [r.query["to_ts"] for r in server.requests] == ["1287964800", "1280764800", "1279321200"]
    assert [(r.query["market"], r.query["instrument"]) for r in server.requests] == [("cadli", "BTC-USD")] * 3
    assert all(r.path == SPOT_HOURS and r.headers["authorization"] == "Apikey test-key" for r in server.requests)


def test_data_api_404_before_first_data_is_the_end_not_an_error(server: FixtureServer) -> None:
    server.add(SPOT_HOURS, Reply.fixture(DATA_API_404, status=404))
    client = make_client(server, now=1_758_240_000, flavour="data-api")
    assert fetch(client, CADLI_BTC_USD, Interval.H1, 1_279_000_000, 1_279_324_800) == []
    assert len(server.requests) == 1


def test_data_api_day_bar(server: FixtureServer) -> None:
    body = fixture_bytes(ROTKI_STARK)
    server.add(SPOT_DAYS, Reply(200, body))
    client = make_client(server, now=1_758_240_000, flavour="data-api")
    (bar,) = fetch(client, Instrument("cadli", "STARK", "EUR"), Interval.D1, 1_708_473_600, 1_708_560_000)
    assert_exact(bar, raw_rows(body)[0], DATA_API_FIELDS)
    assert bar.close == Decimal("1.75404934188528")
    assert server.requests[0].query == {"market": "cadli", "instrument": "STARK-EUR", "limit": "1",
                                        "to_ts": "1708473600"}


@pytest.mark.parametrize("relative", [*ROTKI_SPECIAL, ROTKI_STARK, "cryptocompare/data_api/"
                                      "rotki_histohour_forward.interaction1.status200.body.json"])
def test_every_recorded_data_api_body_parses_exactly(relative: str) -> None:
    body = fixture_bytes(relative)
    rows = raw_rows(body)
    parsed = data_api_rows(loads(body))
    assert len(parsed) == len(rows) > 0
    for obj, row in zip(parsed, rows, strict=True):
        assert_exact(data_api_bar(obj, CADLI_BTC_USD, Interval.H1), row, DATA_API_FIELDS)


def test_data_api_refuses_cccagg_without_a_request(server: FixtureServer) -> None:
    client = make_client(server, now=1_758_240_000, flavour="data-api")
    with pytest.raises(UnknownMarket, match="cccagg:BTC-USD"):
        fetch(client, BTC_USD, Interval.H1, 1_279_000_000, 1_279_324_800)
    assert server.requests == []


# -- construction from settings ------------------------------------------------------------------


def test_make_source_builds_the_client_from_settings(server: FixtureServer) -> None:
    server.add(HISTODAY, Reply.fixture(V2_DAY_30))
    settings = Settings(source="cryptocompare", cryptocompare_base_url=server.url + "/",
                        cryptocompare_api_key="from-settings", cryptocompare_flavour="min-api")
    source = make_source(settings)
    assert isinstance(source, CryptoCompareClient) and source.name == "cryptocompare"

    bars = fetch(source, BTC_USD, Interval.D1, 1_652_140_800, 1_654_732_800)  # real clock: all closed

    assert len(bars) == 30
    assert server.requests[0].headers["authorization"] == "Apikey from-settings"


def test_data_api_flavour_defaults_to_the_data_api_host() -> None:
    client = CryptoCompareClient.from_settings(Settings(cryptocompare_flavour="data-api"))
    assert client.base_url == DATA_API_URL and client.flavour == "data-api"
