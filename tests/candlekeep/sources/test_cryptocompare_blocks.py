"""CryptoCompareClient.bar_blocks: min-api v2 pages parsed whole into BarBlocks, over loopback.

The truth for every number is the recorded JSON text (tokens read with test_cryptocompare's regex,
independently of the client). A page in CryptoCompare's usual v2 form takes the block path; any
other form must be read row by row, with exactly the bars `bars()` gives.
"""

from __future__ import annotations

import re

import pytest

from candlekeep.bars import Bar, Interval
from candlekeep.sources.cryptocompare import _MIN_API_V2, _min_api_block
from tests.candlekeep.sources.test_cryptocompare import (
    BTC_USD,
    FULL_MINUTES,
    HISTODAY,
    HISTOMINUTE,
    MIN_API_FIELDS,
    V2_DAY_30,
    assert_exact,
    make_client,
    raw_rows,
    server,  # noqa: F401 (fixture)
)
from tests.utils.fixture_server import FixtureServer, PagedHistory, Reply, fixture_bytes

V2_KEYS = ("time", "high", "low", "open", "volumefrom", "volumeto", "close")


def v2_object(row: dict[str, str], tail: str = ',"conversionType":"direct","conversionSymbol":""') -> str:
    return "{" + ",".join(f'"{k}":{row[k]}' for k in V2_KEYS) + tail + "}"


def v2_body(objects: list[str]) -> bytes:
    return (
        '{"Response":"Success","Message":"","HasWarning":false,"Type":100,"RateLimit":{},"Data":{"Aggregated":false,'
        f'"TimeFrom":0,"TimeTo":0,"Data":[{",".join(objects)}]}}}}'
    ).encode()


def minute_rows() -> list[dict[str, str]]:
    """The 1441 recorded minutes (v1), their number tokens as written; the last was still forming."""
    return raw_rows(fixture_bytes(FULL_MINUTES))


def array_of(body: bytes) -> bytes:
    return bytes(_MIN_API_V2.decode(body).Data.Data)


def flat(pages: list) -> list[Bar]:
    return sorted((b for p in pages for b in (p.bars() if hasattr(p, "bars") else p)), key=lambda b: b.start)


@pytest.mark.parametrize("source", ["histoday", "histominute"])
def test_the_usual_v2_page_takes_the_block_path_and_keeps_every_digit(source: str) -> None:
    if source == "histoday":
        body, interval = fixture_bytes(V2_DAY_30), Interval.D1
    else:
        body, interval = v2_body([v2_object(r) for r in minute_rows()]), Interval.M1
    rows = raw_rows(body)
    block = _min_api_block(array_of(body), BTC_USD, interval)
    assert block is not None and len(block) == len(rows)
    assert list(block.starts) == [int(r["time"]) for r in rows]
    for bar, row in zip(block.bars(), rows, strict=True):
        assert_exact(bar, row, MIN_API_FIELDS)
        assert (bar.instrument, bar.interval, bar.trades, bar.source, bar.final) == (
            "cccagg:BTC-USD", interval.value, None, "cryptocompare", True)


def _unusual(kind: str) -> list[str]:
    rows = minute_rows()[:300]
    objects = [v2_object(r) for r in rows]
    if kind == "v1 key order":  # the recording's own objects: close second, no string fields
        return PagedHistory(fixture_bytes(FULL_MINUTES), 60).raw_bars[:300]
    elif kind == "an exponent":
        objects[5] = objects[5].replace(f'"volumefrom":{rows[5]["volumefrom"]}', '"volumefrom":1.5e-7')
    elif kind == "whitespace":
        objects[9] = objects[9].replace(',"low":', ', "low":')
    elif kind == "a digit in a string":
        objects[7] = objects[7].replace('"conversionSymbol":""', '"conversionSymbol":"B2"')
    elif kind == "a digit in a key":
        objects[3] = objects[3].replace('"conversionType"', '"conversion2Type"')
    elif kind == "another tail":
        objects[4] = objects[4].replace('"direct"', '"multiply"')
    elif kind == "an extra number":
        objects[11] = objects[11].replace('"close":', '"trades":5,"close":')
    elif kind == "a repeated time":
        objects[20] = objects[19]
    elif kind == "descending":
        objects[30], objects[31] = objects[31], objects[30]
    elif kind == "a pre-listing bar":
        objects.insert(0, '{"time":%d,"high":0,"low":0,"open":0,"volumefrom":0,"volumeto":0,"close":0,'
                          '"conversionType":"direct","conversionSymbol":""}' % (int(rows[0]["time"]) - 60))
    return objects


@pytest.mark.parametrize("kind", ["v1 key order", "an exponent", "whitespace", "a digit in a string", "a digit in a key",
                                  "another tail", "an extra number", "a repeated time", "descending", "a pre-listing bar"])
def test_an_unusual_page_is_read_row_by_row_with_the_same_bars(server: FixtureServer, kind: str) -> None:  # noqa: F811
    body = v2_body(_unusual(kind))
    assert _min_api_block(array_of(body), BTC_USD, Interval.M1) is None
    server.add(HISTOMINUTE, Reply(200, body))
    rows = [r for r in raw_rows(body) if r["high"] != "0"]
    first, last = min(int(r["time"]) for r in rows), max(int(r["time"]) for r in rows)
    client = make_client(server, now=last + 120, page_size=2000)

    by_blocks = flat(list(client.bar_blocks(BTC_USD, Interval.M1, first, last + 60)))
    by_bars = flat(list(client.bars(BTC_USD, Interval.M1, first, last + 60)))

    assert by_blocks == by_bars
    truth = {int(r["time"]): r for r in rows}  # a repeated time: its last object wins
    assert [b.start for b in by_blocks] == sorted(truth)
    for bar in by_blocks:
        assert_exact(bar, truth[bar.start], MIN_API_FIELDS)


def test_blocks_page_backwards_exactly_as_bars_do(server: FixtureServer) -> None:  # noqa: F811
    rows = minute_rows()
    times = [int(r["time"]) for r in rows]
    history = PagedHistory(v2_body([v2_object(r) for r in rows]), 60, pad_before_listing=True)
    server.add_handler(HISTOMINUTE, history)
    client = make_client(server, now=times[-1] + 30, page_size=500)

    blocks = list(client.bar_blocks(BTC_USD, Interval.M1, times[0] - 86_400, times[-1] + 60))
    block_queries = [r.query for r in server.requests]
    pages = list(client.bars(BTC_USD, Interval.M1, times[0] - 86_400, times[-1] + 60))

    assert len(block_queries) == 3  # 1441 minutes in pages of 500; the third reaches the zero padding
    assert block_queries == [r.query for r in server.requests][3:]  # the same toTs seams, the same end
    assert flat(blocks) == flat(pages)
    assert [b.start for b in flat(blocks)] == times[:-1]  # the forming minute and the zero padding dropped
    for bar, row in zip(flat(blocks), rows, strict=False):
        assert_exact(bar, row, MIN_API_FIELDS)
    assert all(len(b) <= 501 for b in blocks)


def test_a_day_page_through_bar_blocks(server: FixtureServer) -> None:  # noqa: F811
    body = fixture_bytes(V2_DAY_30)
    rows = raw_rows(body)
    server.add(HISTODAY, Reply(200, body))
    time_from, time_to = int(rows[0]["time"]), int(rows[-1]["time"])
    (block,) = make_client(server, now=time_to + 3600).bar_blocks(BTC_USD, Interval.D1, time_from, time_to + 86400)
    assert list(block.starts) == [int(r["time"]) for r in rows[:-1]]  # the forming day dropped
    for bar, row in zip(block.bars(), rows, strict=False):
        assert_exact(bar, row, MIN_API_FIELDS)


@pytest.mark.parametrize("key", ["lo9w", "vol2umeto", "op.en", "clo-se"])
def test_a_look_alike_key_holding_a_number_character_is_not_the_usual_form(key: str) -> None:
    # Such a row no longer has its field (the row-by-row path refuses it); the block path must not
    # glue the key's number character onto the value.
    objects = [v2_object(r) for r in minute_rows()[:50]]
    real = re.sub(r"[0-9.+-]", "", key)
    objects[10] = objects[10].replace(f'"{real}":', f'"{key}":')
    assert _min_api_block(array_of(v2_body(objects)), BTC_USD, Interval.M1) is None
