"""The offline simulator: a deterministic synthetic market (`CANDLEKEEP_SOURCE=simulator`).

Runs in-process with no I/O and owns nothing but its seed. Every trade is a pure function of
(seed, instrument, minute index), so any range can be generated on its own, in any order, and gives
the same answer every time: a backfill of yesterday and a live replay of `trades()` line up exactly.
Bars are the DESIGN.md "Bar semantics" aggregation of those same trades (a quiet minute is a flat bar
at the previous close), computed in integers and turned into `Decimal` once per bar.

How one minute `m` of one instrument is made (`_Market.minute`):
- price: log mid = log(base price) + a multi-scale value-noise path (hashed Gaussian anchors every
  `s` seconds for s = 2 min ... ~1 year, amplitude ~ sqrt(s), so returns scale like a random walk)
  evaluated at the minute's two edges, plus a Brownian bridge inside the minute that is pinned to
  zero at both edges; any instant is evaluated in O(1), without generating history from an origin;
- arrivals: a Poisson process (exponential gaps) whose rate follows the UTC day, the week and a slow
  hashed noise; each arrival is a taker order filling 1-5 trades at one timestamp, buys at the ask,
  sells at the bid (half a basis point from mid), rounded to the instrument's tick;
- a few percent of minutes are quiet (no trade: a flat bar); a minute whose index is divisible by
  `_ANCHOR_EVERY` always trades, so the previous close is found within that many minutes;
- trade ids are `minute index * 10_000 + k`, so ids increase with time and are unique.

Randomness is a counter-based generator (the splitmix64 finalizer over plain ints) keyed by
blake2b(seed, instrument) and the minute index: never global random state. The price path of a
pair is keyed by (seed, BASE-QUOTE) only, so one pair on two venues moves together, while each
venue's trades differ. Prices go through `math.exp`/`math.log`; IEEE-754 platforms agree on them
except in the last ulp, which moves a price by one tick with negligible probability.

Speed (CPython 3.11, one core): ~3.5 us a trade; 30 days of 1m bars of cccagg:BTC-USD (43,200 bars,
~0.9 M trades) take ~3.3 s of CPU. Times are from the Unix epoch on.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal

from candlekeep.bars import EXACT, NS_PER_S, Bar, Interval, Trade, flat_bar
from candlekeep.instruments import Instrument

NAME = "simulator"

NS_PER_MIN = 60 * NS_PER_S
SIZE_DECIMALS = 8
IDS_PER_MINUTE = 10_000  # trade id = minute index * IDS_PER_MINUTE + k
_ANCHOR_EVERY = 60  # every minute with index % _ANCHOR_EVERY == 0 has at least one trade
_MAX_PER_MINUTE = IDS_PER_MINUTE - 10  # keeps ids unique whatever the rate (+ up to 5 fills)
_PAGE_BARS = 1440  # one day of 1m bars per page
_DAY_S = 86_400

# Typical USD value of a symbol; symbols not listed get a hash-derived price between 0.05 and 500.
_USD_PRICE = {
    "BTC": 60_000.0, "ETH": 3_000.0, "SOL": 150.0, "BNB": 550.0, "XRP": 0.55, "ADA": 0.45,
    "DOGE": 0.12, "LTC": 80.0, "USD": 1.0, "USDT": 1.0, "USDC": 1.0, "BUSD": 1.0, "FDUSD": 1.0,
    "DAI": 1.0, "EUR": 1.08, "GBP": 1.27, "JPY": 1 / 150, "KRW": 1 / 1350,
}  # fmt: skip
# Volatility relative to BTC (~55 % a year); fiat and stablecoins barely move against each other.
_REL_VOL = {"BTC": 1.0, "ETH": 1.2, "SOL": 1.7, "BNB": 1.1, "XRP": 1.5, "ADA": 1.5, "DOGE": 2.0, "LTC": 1.3}
_FIAT_LIKE = {"USD", "USDT", "USDC", "BUSD", "FDUSD", "DAI", "EUR", "GBP", "JPY", "KRW"}
# Trade arrivals per minute at average activity (before multi-fill orders).
_RATE = {"BTC": 21.0, "ETH": 17.0, "SOL": 13.0}
# Decimal places of the quote currency; a cheap base gets more, up to five significant digits.
_QUOTE_DECIMALS = {"JPY": 0, "KRW": 0, "BTC": 8, "ETH": 8}
_FIAT_DECIMALS = 2

_SIGMA = 1.0e-4  # BTC's volatility per sqrt(second): ~0.03 a day, ~0.55 a year
_SCALES = (120, 360, 1_080, 3_240, 9_720, 29_160, 87_480, 262_440, 787_320, 2_361_960, 7_085_880, 21_257_640)
_HALF_SPREAD = 0.5e-4  # buys at mid * (1 + h), sells at mid * (1 - h)
_MEDIAN_NOTIONAL_USD = 400.0

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_U53 = 2.0**-53
_SQRT3 = math.sqrt(3.0)
_IH4 = _SQRT3 / 65535.0  # scales a sum of four 16-bit uniforms, minus its mean, to unit variance


def _mix(z: int) -> int:
    """The splitmix64 finalizer: a bijective scramble of 64-bit ints."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def _key(*parts: object) -> int:
    """A 64-bit key for a tuple of values (stable across processes, unlike `hash`)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _normal(h: int) -> float:
    """An approximately standard normal from four 16-bit chunks of `h` (Irwin-Hall, |z| <= 3.46)."""
    s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48)
    return (s / 65535.0 - 2.0) * _SQRT3


def _dec(units: int, decimals: int) -> Decimal:
    """`units * 10**-decimals` exactly, with exponent `-decimals` (as a decimal string would have)."""
    return Decimal(units).scaleb(-decimals, EXACT)


class _ValueNoise:
    """Hashed Gaussian anchors every `scale` seconds, smoothstep-interpolated; remembers the last cell."""

    __slots__ = ("key", "scale", "cell", "g0", "g1")

    def __init__(self, key: int, scale: int) -> None:
        self.key, self.scale, self.cell, self.g0, self.g1 = key, scale, None, 0.0, 0.0

    def anchor(self, i: int) -> float:
        return _normal(_mix((self.key + i * _GOLDEN) & _MASK))

    def at(self, t: int) -> float:
        cell, rest = divmod(t, self.scale)
        if cell != self.cell:
            if self.cell is not None and cell == self.cell + 1:
                self.g0 = self.g1
            else:
                self.g0 = self.anchor(cell)
            self.g1 = self.anchor(cell + 1)
            self.cell = cell
        f = rest / self.scale
        return self.g0 + (self.g1 - self.g0) * f * f * (3.0 - 2.0 * f)


@dataclass(frozen=True, slots=True)
class _Profile:
    """The constants of one simulated instrument."""

    id: str
    decimals: int  # price decimals; the tick is 10**-decimals
    log_base: float  # log of the base price in ticks
    sigma: float  # volatility per sqrt(second)
    rate: float  # arrivals per minute at activity 1
    notional_ticks: float  # median trade notional, in price ticks x base units
    key: int  # (seed, instrument): arrivals, sizes, sides, intraminute noise
    path_key: int  # (seed, BASE-QUOTE): the price path shared by all venues of a pair


def _usd_price(symbol: str, seed_free_key: int) -> float:
    if symbol in _USD_PRICE:
        return _USD_PRICE[symbol]
    return 0.05 * 10.0 ** (4.0 * ((seed_free_key >> 11) * _U53))  # 0.05 .. 500


def _profile(instrument: Instrument, seed: int) -> _Profile:
    """Base price, tick, volatility and activity of an instrument: tables for the majors, hashes else."""
    base, quote = instrument.base, instrument.quote
    base_key, quote_key, venue_key = _key("symbol", base), _key("symbol", quote), _key("venue", instrument.id)
    price = _usd_price(base, base_key) / _usd_price(quote, quote_key)
    quote_decimals = _QUOTE_DECIMALS.get(quote, _FIAT_DECIMALS if quote in _FIAT_LIKE else 6)
    significant = 5 - 1 - math.floor(math.log10(price))  # decimals giving five significant digits
    decimals = min(max(quote_decimals, significant), max(quote_decimals, 8))

    def rel_vol(symbol: str, key: int) -> float:
        if symbol in _FIAT_LIKE:
            return 0.02
        return _REL_VOL.get(symbol, 1.3 + 1.2 * ((key >> 20) & 0xFFFF) / 65535.0)

    rate = _RATE.get(base, 3.0 + 7.0 * ((base_key >> 40) & 0xFFFF) / 65535.0)
    rate *= 0.8 + 0.4 * (venue_key & 0xFFFF) / 65535.0  # venues differ a little
    return _Profile(
        id=instrument.id,
        decimals=decimals,
        log_base=math.log(price * 10**decimals),
        sigma=_SIGMA * max(rel_vol(base, base_key), rel_vol(quote, quote_key)),
        rate=rate,
        notional_ticks=_MEDIAN_NOTIONAL_USD / _usd_price(quote, quote_key) * 10**decimals,
        key=_key("trades", seed, instrument.id),
        path_key=_key("path", seed, base, quote),
    )


class _Market:
    """One instrument's generator. Holds only per-scale anchor memos (O(1) memory); not thread-safe."""

    def __init__(self, profile: _Profile) -> None:
        p = self.p = profile
        self.layers = [
            (0.5 * p.sigma * math.sqrt(scale), _ValueNoise(_mix((p.path_key + i) & _MASK), scale))
            for i, scale in enumerate(_SCALES)
        ]
        self.activity_noise = _ValueNoise(_mix(p.key ^ 0xA5A5A5A5A5A5A5A5), 3 * 3600)
        self._edge_t: int | None = None
        self._edge_v = 0.0

    def log_path(self, t: int) -> float:
        """The slow part of log(mid in ticks) at unix second `t`."""
        total = self.p.log_base
        for amplitude, noise in self.layers:
            total += amplitude * noise.at(t)
        return total

    def activity(self, m: int) -> float:
        """Trading activity of minute `m` relative to average: UTC day, week, slow noise."""
        t = m * 60
        hour = (t % _DAY_S) / 3600.0
        day = 1.0 + 0.45 * math.cos(2.0 * math.pi * (hour - 15.0) / 24.0)  # busiest 15:00 UTC
        week = 0.7 if (t // _DAY_S + 3) % 7 >= 5 else 1.08  # 1970-01-01 was a Thursday
        return day * week * math.exp(0.35 * self.activity_noise.at(t))

    def edge(self, t: int) -> float:
        """`log_path(t)`, remembering the last edge (a minute's end is the next minute's start)."""
        if t != self._edge_t:
            self._edge_t, self._edge_v = t, self.log_path(t)
        return self._edge_v

    def minute(self, m: int) -> tuple[list[int], list[int], list[int], list[bool]]:
        """Trades of minute `m` in exchange order: (ts_ns, price in ticks, size in 1e-8, is buy).

        The hot loop: plain ints for hashing (splitmix64 inlined), floats for the path, one pass.
        """
        p = self.p
        ctr = _mix((p.key ^ ((m * _GOLDEN) & _MASK)) & _MASK)
        activity = self.activity(m)
        anchor = m % _ANCHOR_EVERY == 0
        if not anchor and _mix(ctr) * 2.0**-64 < min(0.15, 0.03 / activity):
            return [], [], [], []
        t0 = m * 60
        c0 = self.edge(t0)
        drift = (self.edge(t0 + 60) - c0) / 60.0
        rate_s = p.rate * activity / 60.0
        sigma = p.sigma
        notional = p.notional_ticks * 10**SIZE_DECIMALS
        base_ns = m * NS_PER_MIN
        log, sqrt, exp, ceil, floor = math.log, math.sqrt, math.exp, math.ceil, math.floor
        golden, mask, m1, m2, u53, ih4 = _GOLDEN, _MASK, _M1, _M2, _U53, _IH4  # locals: no dict lookups
        last_ns, cap = NS_PER_MIN - 1, _MAX_PER_MINUTE
        up, down = 1.0 + _HALF_SPREAD, 1.0 - _HALF_SPREAD
        out_ts: list[int] = []
        out_px: list[int] = []
        out_sz: list[int] = []
        out_buy: list[bool] = []
        t = 0.0  # seconds into the minute of the previous arrival
        bridge = 0.0  # Brownian bridge (pinned to 0 at 0 s and 60 s) at `t`
        while True:
            # Arrival: an exponential gap (Poisson process) and the taker's side.
            ctr = (ctr + golden) & mask
            z = ctr
            z = ((z ^ (z >> 30)) * m1) & mask
            z = ((z ^ (z >> 27)) * m2) & mask
            h = z ^ (z >> 31)
            gap = -log(((h >> 11) + 1) * u53) / rate_s
            if t + gap >= 60.0 or len(out_ts) > cap:
                if out_ts or not anchor:
                    break
                gap %= 60.0  # an anchor minute always trades
            # The bridge moves from `t` to `t + gap`: mean-reverting to 0 at 60 s.
            ctr = (ctr + golden) & mask
            z = ctr
            z = ((z ^ (z >> 30)) * m1) & mask
            z = ((z ^ (z >> 27)) * m2) & mask
            g = z ^ (z >> 31)
            r = (60.0 - t - gap) / (60.0 - t)
            normal = ((g & 0xFFFF) + ((g >> 16) & 0xFFFF) + ((g >> 32) & 0xFFFF) + (g >> 48) - 131070.0) * ih4
            bridge = bridge * r + sigma * sqrt(gap * r) * normal
            t += gap
            mid = exp(c0 + drift * t + bridge)
            buy = h & 1 == 1
            price = ceil(mid * up) if buy else max(1, floor(mid * down))
            ts = base_ns + min(int(t * 1e9), last_ns)
            step = 1 if buy else -1
            fills = 1
            while True:  # the order's fills: one timestamp, same side, walking into the book
                ctr = (ctr + golden) & mask
                z = ctr
                z = ((z ^ (z >> 30)) * m1) & mask
                z = ((z ^ (z >> 27)) * m2) & mask
                s = z ^ (z >> 31)
                # bits 0-47: size; 48-57: another fill?; 58: walk a level; 59-63: block trade (1/32)
                size_z = ((s & 0xFFFF) + ((s >> 16) & 0xFFFF) + ((s >> 32) & 0xFFFF) - 98302.5) * (2.0 / 65535.0)
                size = int(notional * (20.0 if s >> 59 == 0 else 1.0) * exp(1.3 * size_z) / price)
                out_ts.append(ts)
                out_px.append(price)
                out_sz.append(size if size > 0 else 1)
                out_buy.append(buy)
                if fills >= 5 or (s >> 48) & 0x3FF >= 154:  # P(another fill) = 154/1024 ~ 15 %
                    break
                fills += 1
                if (s >> 58) & 1:
                    price = max(1, price + step)
        return out_ts, out_px, out_sz, out_buy

    def last_before(self, ts_ns: int) -> tuple[int, int, int, bool, int] | None:
        """(ts_ns, price, size, buy, trade id) of the last trade before `ts_ns`; None only past the
        search bound, which `_ANCHOR_EVERY` makes unreachable."""
        m = (ts_ns - 1) // NS_PER_MIN
        for mm in range(m, m - _ANCHOR_EVERY - 2, -1):
            ts, px, sz, buy = self.minute(mm)
            for k in range(len(ts) - 1, -1, -1):
                if ts[k] < ts_ns:
                    return ts[k], px[k], sz[k], buy[k], mm * IDS_PER_MINUTE + k
        return None


class Simulator:
    """A deterministic synthetic market: trades and bars as a pure function of (instrument, time, seed).

    `now` (unix seconds, default `time.time`) bounds the output: no trade after `now`, no bar for a
    bucket that has not closed by `now`.
    """

    name = NAME

    def __init__(self, seed: int = 0, *, now: Callable[[], float] | None = None) -> None:
        self.seed = seed
        self._now = now or time.time
        self._profiles: dict[str, _Profile] = {}

    def _market(self, instrument: Instrument) -> _Market:
        profile = self._profiles.get(instrument.id)
        if profile is None:
            profile = self._profiles[instrument.id] = _profile(instrument, self.seed)
        return _Market(profile)

    def _now_ns(self) -> int:
        return int(Decimal(self._now()) * NS_PER_S)

    def price_decimals(self, instrument: Instrument) -> int:
        """Decimal places of this instrument's prices (its tick is 10**-decimals)."""
        return self._market(instrument).p.decimals

    def trades(self, instrument: Instrument, start_ns: int, end_ns: int) -> Iterator[Trade]:
        """Trades with `start_ns <= ts_ns < end_ns` and `ts_ns <= now`, in exchange order."""
        market = self._market(instrument)
        end_ns = min(end_ns, self._now_ns() + 1)
        decimals, iid = market.p.decimals, instrument.id
        prices: dict[int, Decimal] = {}
        for m in range(start_ns // NS_PER_MIN, -(-end_ns // NS_PER_MIN)):
            ts, px, sz, buy = market.minute(m)
            first_id = m * IDS_PER_MINUTE
            for k, (t, p, s, b) in enumerate(zip(ts, px, sz, buy, strict=True)):
                if start_ns <= t < end_ns:
                    price = prices.get(p)
                    if price is None:
                        if len(prices) > 4096:
                            prices.clear()
                        price = prices[p] = _dec(p, decimals)
                    side = "buy" if b else "sell"
                    yield Trade(iid, t, price, _dec(s, SIZE_DECIMALS), side, str(first_id + k), NAME, t)

    def last_trade_before(self, instrument: Instrument, ts_ns: int) -> Trade:
        """The last trade with `ts_ns` earlier than the given one (and not after `now`)."""
        market = self._market(instrument)
        found = market.last_before(min(ts_ns, self._now_ns() + 1))
        if found is None:  # pragma: no cover - `_ANCHOR_EVERY` guarantees a trade within reach
            raise RuntimeError(f"no simulated trade of {instrument.id} before {ts_ns}")
        t, p, s, b, trade_id = found
        return Trade(
            instrument.id, t, _dec(p, market.p.decimals), _dec(s, SIZE_DECIMALS), "buy" if b else "sell",
            str(trade_id), NAME, t,
        )  # fmt: skip

    def bars(self, instrument: Instrument, interval: Interval, start: int, end: int) -> Iterator[list[Bar]]:
        """Closed bars with `start <= bar.start < end` (unix s), in pages of at most a day of 1m bars.

        Equal to `aggregate_trades` of `trades()` over the same buckets, with the first bucket's
        previous close taken from the last trade before it (quiet buckets are flat at that close).
        """
        market = self._market(instrument)
        interval = Interval(interval)
        step = interval.seconds
        first = interval.ceil(start)
        stop = min(interval.ceil(end), interval.floor(self._now_ns() // NS_PER_S))
        if first >= stop:
            return
        found = market.last_before(first * NS_PER_S)
        assert found is not None  # `_ANCHOR_EVERY` guarantees a trade within reach
        decimals, iid, ivalue = market.p.decimals, instrument.id, interval.value
        qdecimals = decimals + SIZE_DECIMALS
        prev_dec = _dec(found[1], decimals)
        page: list[Bar] = []
        for bucket in range(first, stop, step):
            o = h = lo = c = 0
            vol = qv = n = 0
            for m in range(bucket // 60, (bucket + step) // 60):
                _, px, sz, _ = market.minute(m)
                if not px:
                    continue
                if not n:
                    o, h, lo = px[0], max(px), min(px)
                else:
                    h, lo = max(h, max(px)), min(lo, min(px))
                c = px[-1]
                vol += sum(sz)
                qv += sum(map(int.__mul__, px, sz))
                n += len(px)
            if n:
                bar = Bar(
                    iid, ivalue, bucket, _dec(o, decimals), _dec(h, decimals), _dec(lo, decimals),
                    _dec(c, decimals), _dec(vol, SIZE_DECIMALS), _dec(qv, qdecimals), n, NAME,
                )  # fmt: skip
                prev_dec = bar.close
            else:
                bar = flat_bar(iid, interval, bucket, prev_dec, NAME)
            page.append(bar)
            if len(page) >= _PAGE_BARS:
                yield page
                page = []
        if page:
            yield page
