"""CryptoCompare REST history: closed OHLCV bars, one page at a time (notes/cryptocompare.md).

Runs in the caller's thread (Dagster assets, the CLI, the coordinator); owns nothing but an HTTP
session and a reference to the shared `RateLimiter`. Two API flavours, picked by
`CANDLEKEEP_CRYPTOCOMPARE_FLAVOUR`:

- `min-api`: `GET /data/v2/histominute|histohour|histoday?fsym&tsym&e&limit&toTs`, paged backwards
  with `toTs = the earliest timestamp received` (so one bar repeats at each seam and is dropped);
  `limit=N` returns N+1 bars. Errors come as `"Response":"Error"` bodies, often with HTTP 200.
- `data-api` (CoinDesk Data API): `GET /spot/v1/historical/minutes|hours|days?market&instrument
  &limit&to_ts`, paged backwards with `to_ts = earliest - interval` (rows never repeat); `limit=N`
  returns N rows. Errors come as `{"Data":[],"Err":{...}}`; a 404 on `to_ts` before the first
  data point means the history is exhausted.

State: none between calls; `bars()` is a generator holding one page at a time.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import msgspec
import requests

from candlekeep.bar_block import BarBlock, blocks_from_bars
from candlekeep.bars import Bar, Interval
from candlekeep.instruments import Instrument
from candlekeep.settings import Settings
from candlekeep.sources.base import SourceError
from candlekeep.sources.ratelimit import RateLimiter

log = logging.getLogger(__name__)

Flavour = Literal["min-api", "data-api"]

SOURCE = "cryptocompare"
MIN_API_URL = "https://min-api.cryptocompare.com"
DATA_API_URL = "https://data-api.cryptocompare.com"
MAX_LIMIT = 2000  # both APIs: at most 2000 points per request
_READ_CHUNK = 1 << 20  # bytes per read of a body (a 2000-bar page is about 360 KB)

# Only these intervals exist at the source; coarser ones are rolled up from stored bars.
MIN_API_PATHS = {
    Interval.M1: "/data/v2/histominute",
    Interval.H1: "/data/v2/histohour",
    Interval.D1: "/data/v2/histoday",
}
DATA_API_PATHS = {
    Interval.M1: "/spot/v1/historical/minutes",
    Interval.H1: "/spot/v1/historical/hours",
    Interval.D1: "/spot/v1/historical/days",
}

# Our venue -> min-api `e`. Venues not listed are sent capitalized (`kraken` -> `Kraken`).
MIN_API_EXCHANGES = {"cccagg": "CCCAGG", "coinbase": "Coinbase", "binance": "Binance"}
# CCCAGG is a min-api index; the Data API's spot endpoints only know exchanges.
DATA_API_NOT_SPOT = {"cccagg"}

# Type 99 bodies report `calls_made` / `max_calls` per window; the longest exhausted window bounds
# how long the key stays blocked.
RATE_WINDOWS_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 31 * 86400}


class CryptoCompareError(SourceError):
    """CryptoCompare refused or failed a request."""


class UnsupportedInterval(CryptoCompareError, ValueError):
    """The interval is not served by the source (only 1m, 1h and 1d are)."""


class UnknownMarket(CryptoCompareError):
    """The venue does not list the pair; retrying cannot help."""


class RateLimited(CryptoCompareError):
    """Over the API key's call budget, longer than the retry budget allows to wait."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceUnavailable(CryptoCompareError):
    """Server errors, timeouts or connection failures outlasted the retry budget."""


class _Retryable(Exception):
    """One failed attempt worth retrying; `hint` is the server's own wait (Retry-After, Cooldown)."""

    def __init__(self, error: CryptoCompareError, hint: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.hint = hint


class CryptoCompareClient:
    name = SOURCE

    def __init__(
        self,
        *,
        base_url: str = MIN_API_URL,
        api_key: str | None = None,
        flavour: Flavour = "min-api",
        limiter: RateLimiter | None = None,
        session: requests.Session | None = None,
        page_size: int = MAX_LIMIT,
        max_attempts: int = 5,
        max_wait: float = 120.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        timeout: float | tuple[float, float] = (5.0, 30.0),
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """`clock` is wall time (unix s), used to tell closed bars from the forming one;
        `max_attempts` / `max_wait` bound retries per request (attempts, total seconds slept)."""
        if flavour not in ("min-api", "data-api"):
            raise ValueError(f"unknown CryptoCompare flavour {flavour!r}: expected 'min-api' or 'data-api'")
        if not 1 <= page_size <= MAX_LIMIT:
            raise ValueError(f"page_size must be within 1..{MAX_LIMIT}, got {page_size}")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.flavour: Flavour = flavour
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._api_key = api_key
        self._limiter = limiter
        self._session = session or requests.Session()
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()

    @classmethod
    def from_settings(cls, settings: Settings) -> CryptoCompareClient:
        base_url = settings.cryptocompare_base_url
        if settings.cryptocompare_flavour == "data-api" and base_url == MIN_API_URL:
            base_url = DATA_API_URL  # the default base URL names the min-api host
        key = settings.cryptocompare_api_key
        return cls(
            base_url=base_url,
            api_key=key.get_secret_value() if key else None,
            flavour=settings.cryptocompare_flavour,
            limiter=RateLimiter.from_settings(settings),
        )

    def bars(self, instrument: Instrument, interval: Interval, start: int, end: int) -> Iterator[list[Bar]]:
        """Closed bars with `start <= bar.start < end`, newest page first, each page ascending."""
        for page in self._pages(instrument, interval, start, end, blocks=False):
            assert not isinstance(page, BarBlock)
            yield page

    def bar_blocks(self, instrument: Instrument, interval: Interval, start: int, end: int) -> Iterator[BarBlock]:
        """The pages of `bars()` as BarBlocks: a min-api v2 page is parsed straight into one, with
        no `Bar` or `Decimal` per row (the backfill's bulk path); other pages are converted."""
        for page in self._pages(instrument, interval, start, end, blocks=True):
            if isinstance(page, BarBlock):
                yield page
            else:
                yield from blocks_from_bars(page)

    def _pages(
        self, instrument: Instrument, interval: Interval, start: int, end: int, *, blocks: bool
    ) -> Iterator[list[Bar] | BarBlock]:
        paths = MIN_API_PATHS if self.flavour == "min-api" else DATA_API_PATHS
        if interval not in paths:
            served = ", ".join(i.value for i in paths)
            raise UnsupportedInterval(f"CryptoCompare serves {served} bars, not {interval.value}; roll up finer bars")
        if self.flavour == "data-api" and instrument.venue in DATA_API_NOT_SPOT:
            raise UnknownMarket(f"{instrument.id}: the Data API has no spot market {instrument.venue!r}")
        step = interval.seconds
        first = interval.ceil(start)
        # The newest bucket still wanted: inside the range and already closed.
        wanted = min(interval.floor(end - 1), interval.floor(int(self._clock())) - step)
        seam: int | None = None  # min-api: the earliest bar received so far, asked for again as toTs
        while wanted >= first:
            if self.flavour == "min-api":
                to_ts = wanted if seam is None else seam
                limit = max(1, min(self.page_size, (to_ts - first) // step))
                payload = self._get(paths[interval], _min_api_params(instrument, limit, to_ts), instrument)
                if isinstance(payload, _MinApiV2Body):
                    block = _min_api_block(payload.Data.Data, instrument, interval) if blocks else None
                    if block is not None:  # ascending, unique, and without a pre-listing (all-zero) bar
                        block = block.between(first, wanted + 1)
                        if not block:
                            return
                        yield block
                        seam = block.starts[0]
                        wanted = seam - step
                        continue
                    page = _min_api_page(payload, instrument, interval)
                else:  # legacy v1 or an unusual body, read the general way
                    page = [min_api_bar(row, instrument, interval) for row in min_api_rows(payload or {})]
            else:
                limit = min(self.page_size, (wanted - first) // step + 1)
                payload = self._get(paths[interval], _data_api_params(instrument, limit, wanted), instrument)
                if payload is None:
                    return  # `to_ts` before the first data point: no older history
                page = [data_api_bar(row, instrument, interval) for row in data_api_rows(payload)]
            # Drops the seam bar, the forming bar, anything outside the range and repeats.
            fresh = sorted({b.start: b for b in page if first <= b.start <= wanted}.values(), key=lambda b: b.start)
            if not fresh:
                return
            listed = [b for b in fresh if not is_pre_listing(b)]
            if listed:
                yield listed
            if is_pre_listing(fresh[0]):
                return  # zero bars before the pair existed: nothing older
            seam = fresh[0].start
            wanted = seam - step

    # -- HTTP ---------------------------------------------------------------------------------

    def _get(
        self, path: str, params: Mapping[str, str | int], instrument: Instrument
    ) -> _MinApiV2Body | dict[str, Any] | None:
        """One request's body, retried within the budget; None when the history is exhausted."""
        url = self.base_url + path
        headers = {"authorization": f"Apikey {self._api_key}"} if self._api_key else {}
        waited = 0.0
        for attempt in range(1, self.max_attempts + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            try:
                try:
                    response = self._session.get(url, params=params, headers=headers, timeout=self._timeout,
                                                 stream=True)  # fmt: skip
                    # The body in one read: requests' own `.content` reads it 10 KB at a time, twice the CPU.
                    body = b"".join(response.iter_content(_READ_CHUNK))
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                    raise _Retryable(SourceUnavailable(f"{url}: {type(exc).__name__}: {exc}")) from exc
                return self._check(response, body, instrument)
            except _Retryable as failure:
                delay = self._backoff(attempt, failure.hint)
                if attempt == self.max_attempts or waited + delay > self.max_wait:
                    raise _give_up(failure, attempt, waited) from failure.__cause__
                log.warning("%s (attempt %d/%d); retrying in %.2fs", failure.error, attempt, self.max_attempts, delay)
                self._sleep(delay)
                waited += delay
        raise AssertionError("unreachable")

    def _backoff(self, attempt: int, hint: float | None) -> float:
        """Exponential with jitter in [d/2, d], capped; never shorter than the server's hint."""
        delay = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        delay = delay / 2 + self._rng.uniform(0, delay / 2)
        return max(delay, hint or 0.0)

    def _check(
        self, response: requests.Response, body: bytes, instrument: Instrument
    ) -> _MinApiV2Body | dict[str, Any] | None:
        where = f"{instrument.id}: {response.request.method} {response.url} -> HTTP {response.status_code}"
        if response.status_code == 429:
            raise _Retryable(RateLimited(where), _retry_after(response))
        if response.status_code >= 500:
            raise _Retryable(SourceUnavailable(f"{where}: {_text(body)}"), _retry_after(response))
        if self.flavour == "min-api" and response.ok:
            try:  # the common case, a v2 success body: its envelope checked, the bar array kept as JSON text
                return _MIN_API_V2.decode(body)
            except msgspec.MsgspecError:
                pass  # an error body, v1, or not JSON: the general path below says which
        try:
            payload = loads(body)
        except ValueError as exc:
            if response.ok:  # a truncated body or a proxy's HTML page
                raise _Retryable(SourceUnavailable(f"{where}: body is not JSON")) from exc
            raise CryptoCompareError(f"{where}: {_text(body)}") from exc
        if not isinstance(payload, dict):
            raise CryptoCompareError(f"{where}: unexpected body {_text(body)}")
        if self.flavour == "min-api":
            _check_min_api(payload, where, instrument)
        elif _check_data_api(payload, where, instrument):
            return None
        if not response.ok:
            raise CryptoCompareError(f"{where}: {_text(body)}")
        return payload


def _text(body: bytes) -> str:
    """The start of a body, for an error message."""
    return body[:200].decode("utf-8", "replace")


def _give_up(failure: _Retryable, attempts: int, waited: float) -> CryptoCompareError:
    budget = f"gave up after {attempts} attempt(s) and {waited:.1f}s of backoff"
    if isinstance(failure.error, RateLimited):
        return RateLimited(f"{failure.error} ({budget})", failure.hint)
    return SourceUnavailable(f"{failure.error} ({budget})")


def _retry_after(response: requests.Response) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# -- min-api ----------------------------------------------------------------------------------


def _min_api_params(instrument: Instrument, limit: int, to_ts: int) -> dict[str, str | int]:
    return {
        "fsym": instrument.base,
        "tsym": instrument.quote,
        "e": MIN_API_EXCHANGES.get(instrument.venue, instrument.venue.capitalize()),
        # Without it CryptoCompare quietly converts through BTC when the pair does not trade
        # directly: bars the venue never printed. Fail with UnknownMarket instead.
        "tryConversion": "false",
        "limit": limit,
        "toTs": to_ts,
    }


def _check_min_api(payload: Mapping[str, Any], where: str, instrument: Instrument) -> None:
    """Raise for an error body; min-api sends them with HTTP 200 as often as not.

    Real examples (fixtures/cryptocompare/errors, notes/cryptocompare.md):
        {"Response":"Error","Message":"You are over your rate limit please upgrade your account!",
         "HasWarning":false,"Type":99,"RateLimit":{"calls_made":{"second":1,"minute":11,"hour":485,
         "day":10973,"month":82758,"total_calls":82758},"max_calls":{"second":20,"minute":300,
         "hour":3000,"day":7500,"month":50000}},"Data":{}}
        {"Response":"Error","Message":"cccagg_or_exchange market does not exist for this coin pair
         (EZETH-USD)","HasWarning":false,"Type":2,"RateLimit":{},"Data":{},"Cooldown":0}
    """
    if payload.get("Response") != "Error":
        return
    message = str(payload.get("Message", ""))
    kind = payload.get("Type")
    if kind == 99:
        raise _Retryable(RateLimited(f"{where}: {message}"), _rate_limit_wait(payload))
    if "does not exist for this coin pair" in message or payload.get("ParamWithError") in ("fsym", "tsym", "e"):
        raise UnknownMarket(f"{instrument.id}: CryptoCompare has no such market ({message})")
    raise CryptoCompareError(f"{where}: Type {kind}: {message}")


def _rate_limit_wait(payload: Mapping[str, Any]) -> float | None:
    """How long a Type 99 blocks: `Cooldown` when given, else the longest exhausted window."""
    if cooldown := payload.get("Cooldown"):
        return float(cooldown)
    limits = payload.get("RateLimit") or {}
    made, allowed = limits.get("calls_made") or {}, limits.get("max_calls") or {}
    exhausted = [s for w, s in RATE_WINDOWS_S.items() if w in made and w in allowed and made[w] >= allowed[w]]
    return float(max(exhausted)) if exhausted else None


def min_api_rows(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The bar objects of a histo* body, v2 (`Data.Data`) or legacy v1 (`Data`).

    v2 (fixtures/cryptocompare/min_api_v2/histoday_BTC_USD_limit30.json):
        {"Response":"Success","Message":"","HasWarning":false,"Type":100,"RateLimit":{},"Data":{
         "Aggregated":false,"TimeFrom":1652140800,"TimeTo":1654732800,"Data":[{"time":1652140800,
         "high":32625.41,"low":29836.19,"open":30076.9,"volumefrom":103840.6,
         "volumeto":3244062170.09,"close":31013.12,"conversionType":"direct","conversionSymbol":""},
         ...]}}
    v1 (fixtures/cryptocompare/min_api_v1/btc_to_usd_histo_minute_with_limit_10...body.json):
        {"Response":"Success","Type":100,"Aggregated":false,"Data":[{"time":1502515740,
         "close":3707.03,"high":3707.58,"low":3702.68,"open":3702.79,"volumefrom":49.96,
         "volumeto":185558.67},...],"TimeTo":1502516340,"TimeFrom":1502515740,
         "FirstValueInArray":true,"ConversionType":{"type":"direct","conversionSymbol":""}}
    """
    data = payload.get("Data")
    if isinstance(data, dict):
        data = data.get("Data")
    if data is None:
        return []
    if not isinstance(data, list):
        raise CryptoCompareError(f"unexpected min-api body: Data is {type(data).__name__}")
    return data


class _MinApiV2Row(msgspec.Struct):
    """A v2 bar object; msgspec reads each number's text straight into a Decimal (every digit)."""

    time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volumefrom: Decimal
    volumeto: Decimal


class _MinApiV2Page(msgspec.Struct):
    Data: msgspec.Raw = msgspec.Raw(b"[]")  # the bar array's JSON text (msgspec has checked it is JSON)


class _MinApiV2Body(msgspec.Struct):
    Response: Literal["Success"]
    Data: _MinApiV2Page


_MIN_API_V2 = msgspec.json.Decoder(_MinApiV2Body)
_MIN_API_V2_ROWS = msgspec.json.Decoder(list[_MinApiV2Row])


def _min_api_page(body: _MinApiV2Body, instrument: Instrument, interval: Interval) -> list[Bar]:
    """The same bars `min_api_bar` makes, from typed rows."""
    iid, name = instrument.id, interval.value
    try:
        rows = _MIN_API_V2_ROWS.decode(body.Data.Data)
    except msgspec.MsgspecError:  # not the usual rows (null, odd fields): read the general way
        return [min_api_bar(row, instrument, interval) for row in min_api_rows({"Data": {"Data": loads(body.Data.Data)}})]
    return [
        Bar(iid, name, r.time, r.open, r.high, r.low, r.close, r.volumefrom, r.volumeto, None, SOURCE, True)
        for r in rows
    ]


# The min-api v2 bar object, as CryptoCompare writes it (keys in this order, no spaces, plain numbers):
#   {"time":1652140800,"high":32625.41,"low":29836.19,"open":30076.9,"volumefrom":103840.6,
#    "volumeto":3244062170.09,"close":31013.12,"conversionType":"direct","conversionSymbol":""}
_V2_KEYS = (b'{"time":', b',"high":', b',"low":', b',"open":', b',"volumefrom":', b',"volumeto":', b',"close":')
_V2_COLUMNS = ("high", "low", "open", "volume", "quote_volume", "close")  # the order of the values above
_PLAIN_NUMBER = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?"
_V2_FIRST_ROW = re.compile(
    rb'\{"time":[0-9]+' + b"".join(k + _PLAIN_NUMBER for k in _V2_KEYS[1:]) + rb'((?:,"[A-Za-z]+":"[A-Za-z]*")*)\}'
)
_NUMBER_CHARS = b"0123456789.+-"
# Number characters as 0, letters gone: a string holding a number character then shows as `"0`.
_NUMBERS_IN_STRINGS = (
    bytes.maketrans(_NUMBER_CHARS, b"0" * len(_NUMBER_CHARS)),
    bytes(c for c in range(256) if chr(c).isalpha()),
)
_ZERO_HIGH = re.compile(rb'"high":-?0(?:\.0+)?[,}]')
_KEY_CHARS = bytes(c for c in range(256) if chr(c).isalpha() or chr(c) in '":')
_COMMA_TO_TAB = bytes.maketrans(b",", b"\t")


def _min_api_block(array: bytes | msgspec.Raw, instrument: Instrument, interval: Interval) -> BarBlock | None:
    """A v2 bar array (JSON text) as a BarBlock, or None when it is not in the usual form.

    No per-row parsing: the page is checked whole and turned into tab-separated text with a few
    C-level byte operations, so each number reaches PostgreSQL as the digits CryptoCompare sent.
    The usual form is what `_V2_KEYS` shows, with the same string fields after `close` in every row;
    anything else (another key order, an exponent, whitespace, descending or repeated times, a
    pre-listing bar whose high is zero) returns None, and the page is read row by row instead.
    Why the checks suffice: msgspec has checked the text is JSON, so number characters outside
    strings can only be numbers in value positions. Removing the number characters leaves the first
    row's skeleton n times over (every row has its keys, order and fields, with only digits, `.`,
    `+`, `-` in its values: JSON numbers without exponent), and no string holds a number character
    (so every key and string field is exactly the first row's, which the strict pattern matched).
    """
    rows = bytes(array)
    if rows == b"[]":
        return BarBlock(instrument.id, interval.value, SOURCE, True, [], [], _V2_COLUMNS)
    first = _V2_FIRST_ROW.match(rows, 1)
    if first is None or rows[:1] != b"[" or rows[-1:] != b"]":
        return None
    tail = first.group(1)
    skeleton = first.group(0).translate(None, _NUMBER_CHARS)
    stripped = rows.translate(None, _NUMBER_CHARS)
    n, extra = divmod(len(stripped) - 1, len(skeleton) + 1)  # "[" + n skeletons joined by "," + "]"
    if extra or stripped != b"[" + b",".join([skeleton] * n) + b"]":
        return None
    if b'"0' in rows.translate(*_NUMBERS_IN_STRINGS):
        return None
    if _ZERO_HIGH.search(rows):
        return None  # maybe a pre-listing bar: the row-by-row path drops it
    # `T,"high":H,"low":L,...,"close":C` per row -> `T\nH\tL\t...\tC`, rows joined by newlines.
    body = rows[len(b"[" + _V2_KEYS[0]) : -len(tail + b"}]")]
    body = body.replace(tail + b"}," + _V2_KEYS[0], b"\n").replace(_V2_KEYS[1], b"\n")
    fields = body.translate(_COMMA_TO_TAB, _KEY_CHARS).decode("ascii").split("\n")
    if len(fields) != 2 * n:
        return None
    try:
        return BarBlock(instrument.id, interval.value, SOURCE, True, list(map(int, fields[0::2])), fields[1::2],
                        _V2_COLUMNS)  # fmt: skip
    except ValueError:  # a time that is no integer, or times out of order or off the boundaries
        return None


def min_api_bar(row: Mapping[str, Any], instrument: Instrument, interval: Interval) -> Bar:
    """`volumefrom` is base volume, `volumeto` quote volume; min-api has no trade count."""
    return Bar(
        instrument=instrument.id,
        interval=interval.value,
        start=int(row["time"]),
        open=_decimal(row["open"]),
        high=_decimal(row["high"]),
        low=_decimal(row["low"]),
        close=_decimal(row["close"]),
        volume=_decimal(row["volumefrom"]),
        quote_volume=_decimal(row["volumeto"]),
        trades=None,
        source=SOURCE,
        final=True,
    )


# -- data-api ---------------------------------------------------------------------------------


def _data_api_params(instrument: Instrument, limit: int, to_ts: int) -> dict[str, str | int]:
    return {
        "market": instrument.venue,
        "instrument": f"{instrument.base}-{instrument.quote}",
        "limit": limit,
        "to_ts": to_ts,
    }


def _check_data_api(payload: Mapping[str, Any], where: str, instrument: Instrument) -> bool:
    """True when the history is exhausted; raise for any other `Err`.

    Real example, HTTP 404 (fixtures/cryptocompare/errors/data_api_index_cc_v1_historical_hours_404...):
        {"Data":[],"Err":{"type":1,"message":"Invalid: to_ts parameter. According to our records,
         BTC-USD was not trading on cadli at 1279321200. Our earliest INDEX_UPDATE bucket timestamp
         is 1279324800, please check ...","other_info":{"param":"to_ts","values":[1279321200],
         "instrument_status":"ACTIVE","first":1279324800}}}
    """
    err = payload.get("Err")
    if not err:
        return False
    message = str(err.get("message", ""))
    info = err.get("other_info") or {}
    if info.get("param") == "to_ts" and "first" in info:
        return True
    if info.get("param") in ("market", "instrument"):
        raise UnknownMarket(f"{instrument.id}: the Data API has no such market ({message})")
    raise CryptoCompareError(f"{where}: type {err.get('type')}: {message}")


def data_api_rows(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of a `/spot/v1/historical/*` (or `/index/cc/v1/historical/*`) body.

    Real index payload (fixtures/cryptocompare/data_api/rotki_test_starknet.interaction0...json):
        {"Data":[{"UNIT":"DAY","TIMESTAMP":1708473600,"TYPE":"986","MARKET":"cadli",
         "INSTRUMENT":"STARK-EUR","OPEN":1.81857780506249,"HIGH":1.81857780506249,
         "LOW":1.55551572552116,"CLOSE":1.75404934188528,...,"TOTAL_INDEX_UPDATES":0,
         "VOLUME":143505626.862111,"QUOTE_VOLUME":243616067.111733,...}],"Err":{}}
    Spot rows have the same envelope and also `TOTAL_TRADES` (documented; no recording of one).
    """
    data = payload.get("Data")
    if data is None:
        return []
    if not isinstance(data, list):
        raise CryptoCompareError(f"unexpected data-api body: Data is {type(data).__name__}")
    return data


def data_api_bar(row: Mapping[str, Any], instrument: Instrument, interval: Interval) -> Bar:
    trades = row.get("TOTAL_TRADES")  # absent from index rows
    return Bar(
        instrument=instrument.id,
        interval=interval.value,
        start=int(row["TIMESTAMP"]),
        open=_decimal(row["OPEN"]),
        high=_decimal(row["HIGH"]),
        low=_decimal(row["LOW"]),
        close=_decimal(row["CLOSE"]),
        volume=_decimal(row["VOLUME"]),
        quote_volume=_decimal(row["QUOTE_VOLUME"]),
        trades=None if trades is None else int(trades),
        source=SOURCE,
        final=True,
    )


# -- numbers ----------------------------------------------------------------------------------


def loads(text: bytes | str) -> Any:
    """JSON with every decimal digit kept: floats become Decimal, never binary floats."""
    return json.loads(text, parse_float=Decimal)


def _decimal(value: object) -> Decimal:
    # bool is an int subclass and a float would already have lost digits: refuse both.
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    raise CryptoCompareError(f"expected a JSON number, got {value!r}")


def is_pre_listing(bar: Bar) -> bool:
    """CryptoCompare pads the time before a pair existed with all-zero bars; they are not data."""
    return not any((bar.open, bar.high, bar.low, bar.close, bar.volume, bar.quote_volume))
