"""The `/v1/ohlcv` JSON of a stitched answer, encoded in one pass, and a cache of encoded answers.

    body = encode_ohlcv_json(stitched, requested="BTCUSD", seed=False)      # bytes, the OhlcvPublic shape
    cache = ResponseCache(max_bytes=64 << 20)
    stamp = service.answer_stamp(query)           # candlekeep.serving: None when it cannot be known
    cache.get(key, stamp) or cache.put(key, stamp, body)

Encoding: the rows of a BarRows (candlekeep.bars) already hold the decimals as plain text, so a bar
is one f-string: no Decimal, no dict, no model per bar. Byte for byte what pydantic writes of
api.schemas.OhlcvPublic (tests/api/routes/test_ohlcv.py holds them to it).

The cache maps a key (the question: query, limit, countback, how the instrument was asked for) to
(stamp, body). A body is served only while the stamp it was made under is still the current one; the
stamp is what makes the answer stale (OhlcvService.answer_stamp: the instrument's bar version and
outages, and Redis's closed-bar version, the forming bar and the clock when they take part). Bounded
in bytes, least recently used out first; one lock (reads run in worker threads).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import msgspec

from candlekeep.bars import Bar, BarRows, bar_row, iso_utc

if TYPE_CHECKING:
    from candlekeep.serving import Stitched


def encode_ohlcv_json(stitched: Stitched, *, requested: str, seed: bool) -> bytes:
    """The OhlcvPublic (seed: OhlcvSeedPublic) JSON of `stitched`."""
    q = stitched.query
    bars: Sequence[Bar] = stitched.bars
    rows = bars.rows if isinstance(bars, BarRows) else [bar_row(b) for b in bars]
    forming_at = len(rows) - 1 if stitched.forming is not None else -1  # the forming bar is the last
    parts = []
    for i, (s, o, h, lo, c, v, qv, trades, source, final, _) in enumerate(rows):
        day, sec = divmod(s, 86400)
        prefix = _day_prefix(day)
        hours, rest = divmod(sec, 3600)
        state = "final" if final else "forming" if i == forming_at else "provisional"
        parts.append(
            f'{{"time":{s},"start":"{prefix}{hours:02d}:{rest // 60:02d}:{rest % 60:02d}Z","open":"{o}","high":"{h}",'
            f'"low":"{lo}","close":"{c}","volume":"{v}","quote_volume":"{qv}",'
            f'"trades":{"null" if trades is None else trades},"source":{_string(source)},'
            f'"final":{"true" if final else "false"},"state":"{state}"}}'
        )
    gaps = ",".join(f'{{"start":{a},"end":{b}}}' for a, b in stitched.gaps)
    tail = f',"resolved":{_string(q.instrument.id)}' if seed else ""
    return (
        f'{{"instrument":{_string(q.instrument.id)},"requested":{_string(requested)},'
        f'"interval":"{q.interval.value}","start":{q.start},"end":{q.end},"bars":[{",".join(parts)}],'
        f'"gaps":[{gaps}],"complete":{"true" if stitched.complete else "false"},'
        f'"forming":{"true" if stitched.forming is not None else "false"}{tail}}}'
    ).encode()


@lru_cache(maxsize=1 << 14)
def _day_prefix(day: int) -> str:
    """"YYYY-MM-DDT" of a UTC day number (a 1d answer has a new day per bar: formatting each costs
    more than the rest of the bar)."""
    return iso_utc(day * 86400)[:11]


@lru_cache(maxsize=1024)
def _string(text: str) -> str:
    """A JSON string (sources and instrument ids: few distinct values)."""
    return msgspec.json.encode(text).decode()


class ResponseCache:
    """Encoded answers by key, each valid under the stamp it was made with (see the module doc).

    State: `_entries` (key -> (stamp, body), least recently used first) and `_bytes`, under `_lock`;
    `hits` / `misses` count lookups.
    """

    def __init__(self, *, max_bytes: int, max_entry_bytes: int | None = None) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes or max_bytes // 4  # one huge answer does not flush the rest
        self._entries: OrderedDict[Hashable, tuple[Hashable, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable, stamp: Hashable) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != stamp:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: Hashable, stamp: Hashable, body: bytes) -> None:
        if len(body) > self.max_entry_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old[1])
            self._entries[key] = (stamp, body)
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._entries)
