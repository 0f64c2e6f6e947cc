"""GET /v1/ohlcv over a real PostgreSQL: ordering, exact decimals, derived intervals, gaps, 422s."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from candlekeep.bars import Interval, rollup_bars
from candlekeep.storage.bars import BarStore
from tests.utils.bars import make_bar
from tests.utils.net import LOOPBACK_PEER

T0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
BTC = "cccagg:BTC-USD"


def test_bars_come_back_ascending_with_every_digit(client: TestClient, engine: Engine) -> None:
    bars = [make_bar(BTC, T0 + 60 * i, f"42000.{i:02d}", volume="0.00000001") for i in (2, 0, 1)]
    BarStore(engine).upsert_bars(bars)

    response = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": T0, "end": T0 + 180})

    assert response.status_code == 200, response.text
    body = response.json()
    assert [b["time"] for b in body["bars"]] == [T0, T0 + 60, T0 + 120]
    assert [b["close"] for b in body["bars"]] == ["42000.00", "42000.01", "42000.02"]
    assert body["bars"][0]["volume"] == "0.00000001"
    assert body["bars"][0]["start"] == "2024-01-01T00:00:00Z"
    assert body["gaps"] == [] and body["complete"] is True


def test_missing_buckets_are_listed_as_gaps(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0, "1"), make_bar(BTC, T0 + 240, "2")])

    body = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": T0, "end": T0 + 300,
                                           "wait": 0}).json()

    assert body["gaps"] == [{"start": T0 + 60, "end": T0 + 240}]
    assert body["complete"] is False


def test_seed_style_symbol_resolves_and_says_so(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0, "1")])

    body = client.get("/v1/ohlcv", params={"instrument": "BTCUSD", "interval": "1m", "start": "2024-01-01T00:00:00Z",
                                           "end": "2024-01-01T00:01:00Z"}).json()

    assert body["instrument"] == BTC and body["requested"] == "BTCUSD"
    assert len(body["bars"]) == 1


def test_coarse_interval_is_the_exact_rollup_of_1m(client: TestClient, engine: Engine) -> None:
    minute_bars = [make_bar(BTC, T0 + 60 * i, f"{100 + (i * 7) % 13}.{i % 10}", volume=f"0.{i + 1:03d}") for i in range(30)]
    BarStore(engine).upsert_bars(minute_bars)

    body = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "5m", "start": T0, "end": T0 + 1800}).json()

    expected = list(rollup_bars(minute_bars, Interval.M5))
    assert [b["time"] for b in body["bars"]] == [b.start for b in expected]
    for got, want in zip(body["bars"], expected, strict=True):
        assert [Decimal(got[k]) for k in ("open", "high", "low", "close", "volume", "quote_volume")] == [
            want.open, want.high, want.low, want.close, want.volume, want.quote_volume]
        assert got["trades"] == want.trades


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"instrument": "not an id!", "interval": "1m", "start": "2024-01-01", "end": "2024-01-02"}, "instrument"),
        ({"instrument": BTC, "interval": "7m", "start": "2024-01-01", "end": "2024-01-02"}, "interval"),
        ({"instrument": BTC, "interval": "1m", "start": "yesterday", "end": "2024-01-02"}, "start"),
        ({"instrument": BTC, "interval": "1m", "start": "2024-01-02", "end": "2024-01-01"}, "after start"),
        ({"instrument": BTC, "interval": "1m", "start": "2000-01-01", "end": "2024-01-01"}, "outside"),
        ({"instrument": BTC, "interval": "1m", "start": "2020-01-01", "end": "2024-01-01"}, "at most"),
    ],
)
def test_bad_requests_get_422_naming_the_problem(client: TestClient, params: dict, names: str) -> None:
    response = client.get("/v1/ohlcv", params=params)

    assert response.status_code == 422
    assert names in response.json()["detail"]


def test_missing_parameter_is_422(client: TestClient) -> None:
    response = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": "2024-01-01"})

    assert response.status_code == 422
    assert "end" in response.text


# -- stitched read: CSV, limit / countback, seed route, on demand, Redis ---------------------------

from collections.abc import Iterator  # noqa: E402

import redis  # noqa: E402

from api.main import create_app  # noqa: E402
from candlekeep.cache import BarCache  # noqa: E402
from candlekeep.query import MAX_BARS_PER_QUERY  # noqa: E402
from candlekeep.serving import MAX_CSV_BARS  # noqa: E402
from candlekeep.settings import Settings  # noqa: E402


def test_csv_streams_a_header_and_every_digit(client: TestClient, engine: Engine) -> None:
    bars = [make_bar(BTC, T0 + 60 * i, f"42000.{i}0", volume="0.00000001") for i in range(3)]
    BarStore(engine).upsert_bars(bars)

    response = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": T0, "end": T0 + 180,
                                               "format": "csv"})

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    lines = response.text.splitlines()
    assert lines[0] == "time,open,high,low,close,volume,quote_volume,trades,source,final"
    assert lines[1] == f"{T0},42000.00,42001.00,41999.00,42000.00,0.00000001,0.0004200000,3,simulator,true"
    assert len(lines) == 4


@pytest.mark.parametrize("interval", ["1m", "5m"])
def test_an_incomplete_csv_says_so_in_its_headers_as_the_json_does(client: TestClient, engine: Engine,
                                                                    interval: str) -> None:  # fmt: skip
    minutes = [*range(0, 5), *range(12, 20), *range(27, 30)]
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 60 * i, "100") for i in minutes])
    params = {"instrument": BTC, "interval": interval, "start": T0, "end": T0 + 1800, "wait": 0}

    as_json = client.get("/v1/ohlcv", params=params).json()
    if interval == "1m":  # the minutes left out above
        assert [(g["start"], g["end"]) for g in as_json["gaps"]] == [(T0 + 300, T0 + 720), (T0 + 1200, T0 + 1620)]
    for extra in ({}, {"limit": 1000}):  # the streamed export, and the bounded one
        csv = client.get("/v1/ohlcv", params={**params, **extra, "format": "csv"})
        assert csv.status_code == 200
        assert csv.headers["x-candlekeep-complete"] == "false"
        gaps = [tuple(map(int, r.split("-"))) for r in csv.headers["x-candlekeep-gaps"].split(",")]
        assert gaps == [(g["start"], g["end"]) for g in as_json["gaps"]] and gaps
        assert int(csv.headers["x-candlekeep-gap-count"]) == len(gaps)
        assert int(csv.headers["retry-after"]) >= 1
    full = client.get("/v1/ohlcv", params={**params, "end": T0 + 300, "format": "csv"})
    assert full.headers["x-candlekeep-complete"] == "true" and "x-candlekeep-gaps" not in full.headers


def test_csv_of_a_derived_interval_matches_the_json(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 60 * i, f"{100 + i}.5") for i in range(12)])
    params = {"instrument": BTC, "interval": "5m", "start": T0, "end": T0 + 900}

    rows = [line.split(",") for line in client.get("/v1/ohlcv", params={**params, "format": "csv"}).text.splitlines()[1:]]
    bars = client.get("/v1/ohlcv", params=params).json()["bars"]

    assert [[int(r[0]), *r[1:7]] for r in rows] == [
        [b["time"], b["open"], b["high"], b["low"], b["close"], b["volume"], b["quote_volume"]] for b in bars]


def test_csv_may_span_a_year_of_minutes_but_no_more(client: TestClient) -> None:
    ok = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": "2023-01-01",
                                         "end": "2023-01-02", "format": "csv"})
    too_long = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": "2022-01-01",
                                               "end": "2023-06-01", "format": "csv"})
    assert ok.status_code == 200 and ok.text.count("\n") == 1
    assert too_long.status_code == 422 and str(MAX_CSV_BARS) in too_long.json()["detail"]


def test_limit_and_countback(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0 + 60 * i, str(i + 1)) for i in range(10)])
    base = {"instrument": BTC, "interval": "1m", "end": T0 + 600, "wait": 0}

    by_limit = client.get("/v1/ohlcv", params={**base, "start": T0, "limit": 3}).json()
    by_countback = client.get("/v1/ohlcv", params={**base, "countback": 4}).json()

    # limit: the FIRST N of the range, as SQL's LIMIT; countback: the last N.
    assert [b["close"] for b in by_limit["bars"]] == ["1", "2", "3"]
    assert by_limit["start"] == T0 and by_limit["end"] == T0 + 180 and by_limit["complete"]
    assert [b["close"] for b in by_countback["bars"]] == ["7", "8", "9", "10"] and by_countback["complete"]


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        ({"start": T0, "limit": MAX_BARS_PER_QUERY + 1}, str(MAX_BARS_PER_QUERY)),
        ({"countback": MAX_BARS_PER_QUERY + 1}, str(MAX_BARS_PER_QUERY)),
        ({"start": T0, "limit": 5, "countback": 5}, "not both"),
        ({}, "start is required"),
        ({"start": T0, "wait": 31}, "wait"),
        ({"start": T0, "format": "xml"}, "format"),
    ],
)
def test_bad_limits_get_422_naming_the_problem(client: TestClient, extra: dict, names: str) -> None:
    response = client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "end": T0 + 600, **extra})
    assert response.status_code == 422
    assert names in response.text


def test_seed_route_says_what_it_resolved(client: TestClient, engine: Engine) -> None:
    BarStore(engine).upsert_bars([make_bar(BTC, T0, "1"), make_bar(BTC, T0 + 60, "2")])

    body = client.get("/ohlcv", params={"symbol": "BTCUSD", "startDate": "2024-01-01T00:00:00Z",
                                        "endDate": "2024-01-01T00:02:00Z", "interval": "1m"}).json()

    assert body["resolved"] == BTC and body["requested"] == "BTCUSD"
    assert [b["close"] for b in body["bars"]] == ["1", "2"] and body["complete"] is True


def test_incomplete_answers_carry_retry_after_and_untracked_instruments_get_tracked(
    client: TestClient, engine: Engine
) -> None:
    from candlekeep.storage.instruments import InstrumentStore

    response = client.get("/v1/ohlcv", params={"instrument": "cccagg:ETH-USD", "interval": "1m", "start": T0,
                                               "end": T0 + 120, "wait": 0})
    assert response.status_code == 200
    assert response.json()["complete"] is False and int(response.headers["Retry-After"]) > 0
    assert "cccagg:ETH-USD" in InstrumentStore(engine).list_ids(tracked_only=True)

    complete = client.get("/v1/ohlcv", params={"instrument": "cccagg:ETH-USD", "interval": "1m", "start": T0,
                                               "end": T0 + 120, "wait": 0})
    assert complete.json()["complete"] is False  # still nothing stored

    BarStore(engine).upsert_bars([make_bar("cccagg:ETH-USD", T0 + 60 * i, "1") for i in (0, 1)])
    done = client.get("/v1/ohlcv", params={"instrument": "cccagg:ETH-USD", "interval": "1m", "start": T0,
                                           "end": T0 + 120, "wait": 0})
    assert done.json()["complete"] is True and "Retry-After" not in done.headers


@pytest.fixture
def redis_client(engine: Engine, database_url: str, redis_url: str) -> Iterator[TestClient]:
    redis.Redis.from_url(redis_url).flushdb()
    with TestClient(create_app(Settings(database_url=database_url, redis_url=redis_url)), client=LOOPBACK_PEER) as test_client:
        yield test_client


def test_with_redis_the_forming_bar_comes_last(redis_client: TestClient, engine: Engine, redis_url: str) -> None:
    import time
    from dataclasses import replace

    now_minute = int(time.time()) // 60 * 60
    BarStore(engine).upsert_bars([make_bar(BTC, now_minute - 60, "1")])
    BarCache.from_url(redis_url).put(forming=[replace(make_bar(BTC, now_minute, "2"), source="stream", final=False)])

    body = redis_client.get("/v1/ohlcv", params={"instrument": BTC, "interval": "1m", "start": now_minute - 60,
                                                 "end": now_minute + 60, "wait": 0}).json()

    assert [(b["close"], b["final"]) for b in body["bars"]] == [("1", True), ("2", False)]
    assert body["forming"] is True and body["complete"] is True


# -- the JSON body is encoded directly (no pydantic per bar); it must stay what the models say ------

from dataclasses import replace as _replace  # noqa: E402

from api.routes.ohlcv import _json  # noqa: E402
from api.schemas import BarPublic, GapPublic, OhlcvPublic, OhlcvSeedPublic  # noqa: E402
from candlekeep.query import build_query  # noqa: E402
from candlekeep.serving import Stitched  # noqa: E402


def _model_json(stitched: Stitched, *, requested: str, seed: bool) -> bytes:
    q = stitched.query
    fields = dict(instrument=q.instrument.id, requested=requested, interval=q.interval.value, start=q.start, end=q.end,
                  bars=[BarPublic.from_bar(b, forming=b is stitched.forming) for b in stitched.bars],
                  gaps=[GapPublic(start=s, end=e) for s, e in stitched.gaps],
                  complete=stitched.complete, forming=stitched.forming is not None)  # fmt: skip
    model = OhlcvSeedPublic(**fields, resolved=q.instrument.id) if seed else OhlcvPublic(**fields)
    return model.model_dump_json().encode()


def _awkward_stitched() -> Stitched:
    query = build_query(instrument="BTCUSD", interval="1m", start=str(T0), end=str(T0 + 600))
    forming = _replace(make_bar(BTC, T0 + 540, "42000.5"), source="stream", final=False)
    bars = [
        make_bar(BTC, T0, "42283.58", volume="0.00000001"),  # str() would write 1E-8
        _replace(make_bar(BTC, T0 + 60, "1E+3", volume="0"), trades=None, quote_volume=Decimal("0E-10")),
        make_bar(BTC, T0 + 120, "0.000000000123456789", volume="12345678901234567890.123456789"),
        forming,
    ]
    return Stitched(query=query, bars=bars, gaps=[(T0 + 180, T0 + 540)], complete=False, forming=forming)


@pytest.mark.parametrize("seed", [False, True])
def test_fast_json_is_byte_for_byte_the_pydantic_model(seed: bool) -> None:
    stitched = _awkward_stitched()

    fast = _json(stitched, requested="BTCUSD", seed=seed)

    assert fast == _model_json(stitched, requested="BTCUSD", seed=seed)
    model = OhlcvSeedPublic if seed else OhlcvPublic
    assert model.model_validate_json(fast).model_dump_json().encode() == fast  # and it validates as the model
    states = [b["state"] for b in msgspec.json.decode(fast)["bars"]]
    assert states == ["final", "final", "final", "forming"]  # the forming bar is told apart


def test_fast_json_of_nothing_matches_the_model() -> None:
    query = build_query(instrument=BTC, interval="1h", start=str(T0), end=str(T0 + 7200))
    stitched = Stitched(query=query, bars=[], gaps=[(T0, T0 + 7200)], complete=False, forming=None)

    assert _json(stitched, requested=BTC, seed=False) == _model_json(stitched, requested=BTC, seed=False)


@pytest.mark.parametrize(("path", "params", "seed"), [
    ("/v1/ohlcv", {"instrument": "BTCUSD", "interval": "1m", "start": T0, "end": T0 + 300, "wait": 0}, False),
    ("/ohlcv", {"symbol": "BTCUSD", "interval": "1m", "startDate": T0, "endDate": T0 + 300, "wait": 0}, True),
])  # fmt: skip
def test_http_body_is_the_model_of_the_same_answer(client: TestClient, engine: Engine, path: str, params: dict,
                                                   seed: bool) -> None:  # fmt: skip
    BarStore(engine).upsert_bars([make_bar(BTC, T0, "42283.58", volume="0.00000001"), make_bar(BTC, T0 + 120, "7")])

    response = client.get(path, params=params)

    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert int(response.headers["Retry-After"]) > 0  # gaps: the answer is incomplete
    stitched = client.app.state.ohlcv.read(build_query(instrument="BTCUSD", interval="1m", start=str(T0),
                                                       end=str(T0 + 300)))  # fmt: skip
    assert response.content == _model_json(stitched, requested="BTCUSD", seed=seed)
    assert [b["volume"] for b in response.json()["bars"]][0] == "0.00000001"


def test_openapi_still_documents_the_response_models(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    for path, model in (("/v1/ohlcv", "OhlcvPublic"), ("/ohlcv", "OhlcvSeedPublic")):
        ok = paths[path]["get"]["responses"]["200"]["content"]
        assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "text/csv" in ok


def test_encoded_bar_times_match_the_schema_iso() -> None:
    import random

    from api.schemas import iso
    from candlekeep.bars import BarRows

    rng = random.Random(7)
    stamps = [0, 59, 86399, 86400, 951782400, 1709164800, 4102444799] + [rng.randrange(0, 4_102_444_800) for _ in range(5000)]
    rows = [(t, "1", "1", "1", "1", "0", "0", None, "test", True, 0) for t in stamps + stamps]
    query = build_query(instrument=BTC, interval="1m", start=str(T0), end=str(T0 + 60))
    stitched = Stitched(query=query, bars=BarRows(BTC, "1m", rows), gaps=[], complete=True, forming=None)
    starts = [b["start"] for b in msgspec.json.decode(_json(stitched, requested=BTC, seed=False))["bars"]]
    assert starts == [iso(t) for t in stamps + stamps]


def test_an_encoded_answer_is_served_until_a_write_or_an_outage_changes_it(client: TestClient, engine: Engine) -> None:
    from candlekeep.storage.instruments import InstrumentStore
    from candlekeep.storage.outages import OutageStore

    InstrumentStore(engine).register([BTC], tracked=True)  # nothing asked for on its behalf: cacheable
    store = BarStore(engine)
    store.upsert_bars([make_bar(BTC, T0 + 60 * i, "42000.5") for i in range(5)])
    params = {"instrument": BTC, "interval": "1m", "start": T0, "end": T0 + 300, "wait": 0}
    responses = client.app.state.responses

    first = client.get("/v1/ohlcv", params=params)
    assert client.get("/v1/ohlcv", params=params).content == first.content
    assert responses.hits == 1  # the second answer was the cached one

    store.upsert_bars([make_bar(BTC, T0 + 120, "42001.25")])  # a revision
    revised = client.get("/v1/ohlcv", params=params).json()
    assert [b["close"] for b in revised["bars"]] == ["42000.5", "42000.5", "42001.25", "42000.5", "42000.5"]
    assert revised["bars"][2]["final"] is True

    store.upsert_bars([make_bar(BTC, T0 + 60 * i, "42000.5", source="stream", final=False) for i in range(5, 10)])
    params_10 = {**params, "end": T0 + 600}
    assert client.get("/v1/ohlcv", params=params_10).json()["complete"] is True
    OutageStore(engine).record(source="stream", started_at=datetime.fromtimestamp(T0 + 390, UTC),
                               ended_at=datetime.fromtimestamp(T0 + 450, UTC), instruments=[BTC], reason="test")
    after = client.get("/v1/ohlcv", params=params_10).json()
    assert after["complete"] is False and after["gaps"]  # provisional minutes of the outage are gaps now
