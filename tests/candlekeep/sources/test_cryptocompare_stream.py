"""CryptoCompare streamer v2 client: frame parsing against the real recorded trade, and whole sessions
against a real loopback WebSocket server (tests/utils/ws_server.py) speaking the documented frames.

Outages the client yields are written to a real PostgreSQL through OutageStore, the way the producer
daemon does it (the source itself never touches storage).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, text

from candlekeep.bars import Disconnect, Heartbeat, Trade
from candlekeep.sources.cryptocompare_stream import (
    BadFrame,
    StreamError,
    StreamerClient,
    StreamStatus,
    SubscriptionFailed,
    loads,
    parse_trade,
    side_from_flags,
    trade_sub,
)
from candlekeep.storage.outages import OutageStore, from_ns
from tests.utils.fixture_server import fixture_bytes
from tests.utils.net import free_port
from tests.utils.ws_server import StreamerServer, StreamerSession, trade_frame

TRADE_DUMP = "cryptocompare/streamer_v2/trade_type0_console_dump_tradingview_tutorial.txt"
BTC, ETH, FOO = "coinbase:BTC-USD", "binance:ETH-USDT", "coinbase:FOO-USD"


def dump_as_json() -> str:
    """The fixture is a browser console dump (`// KEY:VALUE` lines), not JSON: rebuild the frame's JSON
    text from its exact field values, in its order, without retyping any of them."""
    fields = []
    for line in fixture_bytes(TRADE_DUMP).decode().splitlines():
        body = line.strip().removeprefix("//").strip()
        if body.startswith("example "):
            body = body.removeprefix("example ").strip()
        key, _, value = body.partition(":")
        fields.append(f'"{key}":{value}')
    return "{" + ",".join(fields) + "}"


REAL_TRADE = Trade(
    instrument=BTC,
    ts_ns=1753190418_654000000,
    price=Decimal("119283.1"),
    size=Decimal("0.34637342"),
    side="sell",
    trade_id="852793745",
    source="cryptocompare",
    received_ns=1753190418_708000000,
)


# --- parsing ---------------------------------------------------------------------------------------


def test_real_trade_console_dump_parses_to_the_exact_trade() -> None:
    raw = dump_as_json()
    assert raw.startswith('{"TYPE":"0","M":"Coinbase","FSYM":"BTC","TSYM":"USD","F":"1","ID":"852793745"')
    frame = loads(raw)
    assert frame["P"] * frame["Q"] == frame["TOTAL"]  # the rebuild kept every digit: TOTAL = Q * P exactly
    assert parse_trade(frame, instrument=BTC, local_ns=1) == REAL_TRADE


@pytest.mark.parametrize(
    ("flags", "side"),
    [("1", "sell"), ("2", "buy"), ("4", "unknown"), ("9", "sell"), ("10", "buy"), (1, "sell"), (2, "buy"),
     (12, "unknown"), (3, "unknown")],
)  # fmt: skip
def test_side_from_the_f_bitmask(flags: object, side: str) -> None:
    assert side_from_flags(flags) == side
    frame = loads(trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=flags, trade_id=7, ts=1, q="1", p="2"))
    assert parse_trade(frame, instrument=BTC, local_ns=0).side == side


def test_timestamps_seconds_plus_nanoseconds_and_receipt_time() -> None:
    with_ns = trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=2, trade_id=1, ts=1700000000,
                          tsns=1, q="0.5", p="100", rts=1700000001, rtsns=999999999)  # fmt: skip
    trade = parse_trade(loads(with_ns), instrument=BTC, local_ns=5)
    assert (trade.ts_ns, trade.received_ns) == (1700000000_000000001, 1700000001_999999999)
    # Markets without TSNS / RTS: whole seconds, and our own receipt time.
    bare = trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=2, trade_id=1, ts=1700000000, q="0.5", p="100")
    trade = parse_trade(loads(bare), instrument=BTC, local_ns=1700000002_123456789)
    assert (trade.ts_ns, trade.received_ns) == (1700000000_000000000, 1700000002_123456789)


def test_prices_keep_every_digit_and_floats_are_refused() -> None:
    raw = trade_frame(market="Binance", fsym="ETH", tsym="USDT", flags=1, trade_id=3, ts=1, q="0.00001000", p="3000.10")
    trade = parse_trade(loads(raw), instrument=ETH, local_ns=0)
    assert (str(trade.size), str(trade.price)) == ("0.00001000", "3000.10")
    with pytest.raises(StreamError, match="Decimal"):
        parse_trade(json.loads(raw), instrument=ETH, local_ns=0)  # parsed with binary floats
    with pytest.raises(StreamError, match="without P"):
        parse_trade({"TYPE": "0", "F": "1", "ID": "1", "TS": 1, "Q": Decimal(1)}, instrument=ETH, local_ns=0)
    with pytest.raises(StreamError):
        loads(b"not json")


def test_subscriptions_use_the_rest_clients_exchange_names() -> None:
    assert trade_sub(BTC) == "0~Coinbase~BTC~USD"
    assert trade_sub("binance:ETH-USDT") == "0~Binance~ETH~USDT"
    assert trade_sub("cccagg:BTC-USD") == "0~CCCAGG~BTC~USD"
    assert trade_sub("kraken:XBT-EUR") == "0~Kraken~XBT~EUR"


def test_backoff_is_jittered_exponential_and_never_under_the_floor() -> None:
    client = StreamerClient(rng=random.Random(1))
    first = [client._backoff_delay(0, "disconnect") for _ in range(200)]
    assert min(first) >= 5.0 and max(first) <= 10.0 and len(set(first)) == 200
    later = [client._backoff_delay(3, "disconnect") for _ in range(200)]
    assert min(later) >= 5.0 and max(later) <= 80.0 and max(later) > 10.0
    assert max(client._backoff_delay(30, "disconnect") for _ in range(50)) <= 300.0
    assert min(client._backoff_delay(0, "rate_limited") for _ in range(50)) >= 60.0
    with pytest.raises(ValueError):
        StreamerClient(min_backoff=0)


# --- sessions against the loopback streamer -------------------------------------------------------


class Collector:
    """Runs client.events() in a thread; the test waits for what it expects."""

    def __init__(self, client: StreamerClient) -> None:
        self.client = client
        self.events: list[object] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.client.events():
                with self._cond:
                    self.events.append((time.monotonic(), event))
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            self.error = exc

    def of(self, kind: type) -> list:
        with self._cond:
            return [e for _, e in self.events if isinstance(e, kind)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                assert self.error is None, self.error
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; events so far: {[e for _, e in self.events]}"
                self._cond.wait(min(left, 0.1))

    def stop(self) -> None:
        self.client.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "events() did not return after close()"
        assert self.error is None, self.error

    def states(self) -> list[str]:
        return [s.state for s in self.of(StreamStatus)]


def test_session_reconnects_resubscribes_and_marks_the_gap_with_disconnects() -> None:
    btc_sub, eth_sub, foo_sub = trade_sub(BTC), trade_sub(ETH), trade_sub(FOO)
    eth_1 = trade_frame(market="Binance", fsym="ETH", tsym="USDT", flags=2, trade_id=501, ts=1753190419, q="1.5",
                        p="3600.01", ccseq=9)  # fmt: skip
    btc_2 = trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=4, trade_id=852793746, ts=1753190420,
                        tsns=1000, q="0.01000000", p="119284.00", rts=1753190420, rtsns=5)  # fmt: skip
    btc_3 = trade_frame(market="Coinbase", fsym="BTC", tsym="USD", flags=9, trade_id=852793800, ts=1753190480,
                        tsns=0, q="2", p="119300")  # fmt: skip
    second_done = threading.Event()

    def first(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.trade(dump_as_json())  # the latest trades come first, then SUBSCRIBECOMPLETE per sub
        s.trade(eth_1)
        s.subscribe_complete(btc_sub)
        s.subscribe_complete(eth_sub)
        s.invalid_sub(foo_sub)
        s.load_complete()
        s.heartbeat()
        s.trade(btc_2)
        time.sleep(0.1)
        s.force_disconnect()

    def second(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.trade(btc_3)
        s.subscribe_complete(btc_sub)
        s.subscribe_complete(eth_sub)
        s.load_complete()
        s.heartbeat()
        second_done.set()

    started_ns = time.time_ns()
    with StreamerServer([first, second]) as server:
        client = StreamerClient(instruments=[BTC, ETH, FOO], url=server.url, api_key="test-key",
                                min_backoff=0.3, max_backoff=0.6, heartbeat_timeout=5.0, recv_timeout=0.05)  # fmt: skip
        events = Collector(client)
        events.wait_for(lambda: second_done.is_set() and events.states()[-1] == "streaming"
                        and any(h.instrument == BTC for h in events.of(Heartbeat)))  # fmt: skip
        events.stop()
        s0, s1 = server.sessions

    assert s0.query == {"api_key": "test-key"} and s0.path.startswith("/v2")
    assert s0.received == [{"action": "SubAdd", "subs": sorted([btc_sub, eth_sub, foo_sub])}]
    # Resubscribed on reconnect, without the sub the server refused.
    assert s1.received == [{"action": "SubAdd", "subs": sorted([btc_sub, eth_sub])}]
    assert s1.connected_at - s0.closed_at >= 0.3  # waited out the backoff

    local = [t.received_ns for t in events.of(Trade)]  # receipt times where the frame has no RTS
    assert started_ns < local[1] < local[3] < time.time_ns()
    assert events.of(Trade) == [
        REAL_TRADE,
        Trade(ETH, 1753190419_000000000, Decimal("3600.01"), Decimal("1.5"), "buy", "501", "cryptocompare", local[1]),
        Trade(BTC, 1753190420_000001000, Decimal("119284.00"), Decimal("0.01000000"), "unknown", "852793746",
              "cryptocompare", 1753190420_000000005),
        Trade(BTC, 1753190480_000000000, Decimal("119300"), Decimal("2"), "sell", "852793800", "cryptocompare",
              local[3]),
    ]  # fmt: skip
    assert events.of(SubscriptionFailed) == [SubscriptionFailed(FOO, events.of(SubscriptionFailed)[0].reason)]
    assert "INVALID_SUB" in events.of(SubscriptionFailed)[0].reason
    assert client.failed.keys() == {FOO}
    assert events.states() == ["connecting", "subscribing", "streaming", "backoff", "connecting", "subscribing",
                               "streaming"]  # fmt: skip
    assert "FORCE_DISCONNECT" in events.of(StreamStatus)[3].detail

    # The lost connection is a disconnect for each live instrument (FOO was refused: its own one).
    gone = [d for d in events.of(Disconnect) if d.reason == "500 FORCE_DISCONNECT"]
    assert sorted(d.instrument for d in gone) == sorted([ETH, BTC])
    assert all(d.source == "cryptocompare" and started_ns < d.ts_ns < time.time_ns() for d in gone)
    (refused,) = [d for d in events.of(Disconnect) if d.instrument == FOO]
    assert refused.reason.startswith("subscription failed") and "INVALID_SUB" in refused.reason
    # Heartbeats while live: the receive clock minus the latency bound, never for the refused one.
    beats = events.of(Heartbeat)
    assert beats and {b.instrument for b in beats} <= {ETH, BTC}
    assert all(started_ns - 1_000_000_000 < b.ts_ns < time.time_ns() - 1_000_000_000 + 1 for b in beats)
    # In the log, the gap's disconnects come after the last trade of the lost connection and
    # before the first heartbeat of the new one.
    order = [e for _, e in events.events]
    last_trade = max(i for i, e in enumerate(order) if isinstance(e, Trade) and e.trade_id == "852793746")
    first_gone = min(order.index(d) for d in gone)
    assert last_trade < first_gone < min(i for i, e in enumerate(order) if isinstance(e, Heartbeat) and i > first_gone)


def test_heartbeat_silence_is_stale_and_reconnects() -> None:
    reconnected = threading.Event()
    heartbeat_sent: list[float] = []

    def silent_after_load(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.subscribe_complete(trade_sub(BTC))
        s.load_complete()
        s.heartbeat()
        heartbeat_sent.extend([time.monotonic(), time.time_ns()])
        # ... and nothing more: the connection stays open and silent

    def healthy(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.load_complete()
        s.heartbeat()
        reconnected.set()

    with StreamerServer([silent_after_load, healthy]) as server:
        client = StreamerClient(instruments=[BTC], url=server.url, heartbeat_timeout=0.6, min_backoff=0.1,
                                max_backoff=0.2, recv_timeout=0.05)  # fmt: skip
        events = Collector(client)
        events.wait_for(lambda: reconnected.is_set() and events.states()[-1] == "streaming")
        events.stop()
        s0, _ = server.sessions

    assert s0.closed_at is not None and s0.closed_at - heartbeat_sent[0] >= 0.6  # the client hung up, stale
    assert events.states() == ["connecting", "subscribing", "streaming", "backoff", "connecting", "subscribing",
                               "streaming"]  # fmt: skip
    assert "heartbeat stale" in events.of(StreamStatus)[3].detail
    (gone,) = events.of(Disconnect)
    assert (gone.instrument, gone.reason) == (BTC, "heartbeat stale: none for 0.6 s")
    # Noticed when the silence ran out; the gap itself runs from the instrument's previous record.
    assert gone.ts_ns - heartbeat_sent[1] >= 0.5e9


def test_unauthorized_is_an_error_state_then_backoff() -> None:
    def unauthorized(s: StreamerSession) -> None:
        s.unauthorized()

    def accepted(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.load_complete()

    with StreamerServer([unauthorized, accepted]) as server:
        client = StreamerClient(instruments=[BTC], url=server.url, api_key="bad", min_backoff=0.1, max_backoff=0.2,
                                recv_timeout=0.05)  # fmt: skip
        events = Collector(client)
        events.wait_for(lambda: "streaming" in events.states())
        events.stop()

    assert events.states() == ["connecting", "error", "backoff", "connecting", "subscribing", "streaming"]
    error = events.of(StreamStatus)[1].detail
    assert "401 UNAUTHORIZED" in error and "valid api_key" in error and "CANDLEKEEP_CRYPTOCOMPARE_API_KEY" in error
    (gone,) = events.of(Disconnect)  # never live yet: the gap runs to the first record after LOADCOMPLETE
    assert gone.instrument == BTC and gone.reason.startswith("401 UNAUTHORIZED")


def test_rate_limited_backs_off_longer() -> None:
    def too_many(s: StreamerSession) -> None:
        s.rate_limited()

    def accepted(s: StreamerSession) -> None:
        s.welcome()
        s.expect("SubAdd")
        s.load_complete()

    with StreamerServer([too_many, accepted]) as server:
        client = StreamerClient(instruments=[BTC], url=server.url, min_backoff=0.05, max_backoff=2.0,
                                rate_limited_backoff=0.8, recv_timeout=0.05)  # fmt: skip
        events = Collector(client)
        events.wait_for(lambda: "streaming" in events.states())
        events.stop()
        s0, s1 = server.sessions

    assert events.states() == ["connecting", "backoff", "connecting", "subscribing", "streaming"]
    assert "429 TOO_MANY_SOCKETS_MAX_1_PER_CLIENT" in events.of(StreamStatus)[1].detail
    assert s1.connected_at - s0.connected_at >= 0.8


def test_subscribe_and_unsubscribe_at_runtime_and_bad_frames() -> None:
    got: dict[str, dict] = {}
    done = threading.Event()
    sol = "binance:SOL-USDT"

    def script(s: StreamerSession) -> None:
        s.welcome()
        got["first"] = s.expect("SubAdd")
        s.load_complete()
        got["add"] = s.expect("SubAdd")
        got["remove"] = s.expect("SubRemove")
        s.send("{not json")
        s.send(trade_frame(market="Binance", fsym="SOL", tsym="USDT", flags=2, trade_id=1, ts=1, q="1", p="-1"))
        s.unrecognized_sub("0~Nowhere~X~Y")  # not ours: logged, nothing marked failed
        done.set()

    with StreamerServer([script]) as server:
        client = StreamerClient(instruments=[BTC], url=server.url, recv_timeout=0.05)
        events = Collector(client)
        events.wait_for(lambda: "streaming" in events.states())
        client.subscribe([sol, BTC])  # BTC already tracked: only SOL is added
        client.unsubscribe([BTC])
        events.wait_for(lambda: len(events.of(BadFrame)) == 2)
        assert done.wait(5)
        events.stop()

    assert got["first"]["subs"] == [trade_sub(BTC)]
    assert got["add"] == {"action": "SubAdd", "subs": ["0~Binance~SOL~USDT"]}
    assert got["remove"] == {"action": "SubRemove", "subs": [trade_sub(BTC)]}
    assert client.instruments == [sol] and client.failed == {}
    first, second = events.of(BadFrame)
    assert first.payload == b"{not json" and "not JSON" in first.error
    assert b'"P":-1' in second.payload and "positive" in second.error


def test_unreachable_server_opens_an_outage_and_keeps_trying() -> None:
    client = StreamerClient(instruments=[BTC], url=f"ws://127.0.0.1:{free_port()}/v2", min_backoff=0.05,
                            max_backoff=0.1, connect_timeout=1.0)  # fmt: skip
    events = Collector(client)
    events.wait_for(lambda: events.states().count("backoff") >= 3)
    events.stop()
    assert events.states()[:4] == ["connecting", "backoff", "connecting", "backoff"]
    assert "connect failed" in events.of(StreamStatus)[1].detail
    (gone,) = events.of(Disconnect)  # one disconnect, however many attempts fail
    assert gone.instrument == BTC and "connect failed" in gone.reason


# --- where outages go (candlekeep.storage.outages; kept here, next to the source that makes them) -


def test_outage_store_records_updates_lists_and_gives_refill_windows(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outages"))
    store = OutageStore(engine)
    t0 = datetime(2025, 7, 22, 13, 20, 18, 654321, tzinfo=UTC)
    opened = store.record(source="cryptocompare", started_at=t0, instruments=[BTC, ETH, FOO, BTC],
                          reason="heartbeat stale")  # fmt: skip
    assert [(o.id, o.instruments, o.ended_at) for o in store.open_outages()] == [(opened, [ETH, BTC, FOO], None)]
    closed = store.record(source="cryptocompare", started_at=t0, ended_at=t0 + timedelta(minutes=2, seconds=1),
                          instruments=[FOO, ETH, BTC], reason="heartbeat stale")  # fmt: skip
    assert closed == opened and store.open_outages("cryptocompare") == []  # the same outage, now closed
    later = store.record(source="cryptocompare", started_at=t0 + timedelta(hours=1), instruments=[ETH], reason="x")
    other = store.record(source="simulator", started_at=t0, instruments=[BTC], reason="y")

    assert [o.id for o in store.list()] == [opened, other, later]
    assert [o.id for o in store.list(source="cryptocompare", instrument=BTC)] == [opened]
    assert [o.id for o in store.list(instrument=FOO)] == [opened]
    window = {"start": t0 + timedelta(minutes=3), "end": t0 + timedelta(hours=2)}
    # The closed one ended before the window; the open ones (from t0, from t0 + 1 h) run into it.
    assert [o.id for o in store.list(**window)] == [other, later]
    assert [o.id for o in store.list(end=t0)] == []

    (row,) = store.list(instrument=FOO)
    # 13:20:18.654321 .. 13:22:19.654321 -> whole minutes 13:20 .. 13:23, for a `fetch` of 1m bars
    assert row.refill_window() == (int(datetime(2025, 7, 22, 13, 20, tzinfo=UTC).timestamp()),
                                   int(datetime(2025, 7, 22, 13, 23, tzinfo=UTC).timestamp()))  # fmt: skip
    (open_row,) = store.open_outages("cryptocompare")  # an open outage runs to `now`: 14:20:18 .. 14:20:23
    start_s, end_s = open_row.refill_window(now=t0 + timedelta(hours=1, seconds=5))
    assert (start_s, end_s - start_s) == (int(datetime(2025, 7, 22, 14, 20, tzinfo=UTC).timestamp()), 60)
    store.close(later, ended_at=t0 + timedelta(hours=1, minutes=5))
    assert store.open_outages("cryptocompare") == [] and len(store.open_outages()) == 1

    assert from_ns(1753190418_654999999) == datetime(2025, 7, 22, 13, 20, 18, 654999, tzinfo=UTC)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record(source="s", started_at=datetime(2025, 1, 1), instruments=[], reason="")
    with pytest.raises(ValueError, match="before it starts"):
        store.record(source="s", started_at=t0, ended_at=t0 - timedelta(seconds=1), instruments=[], reason="")
