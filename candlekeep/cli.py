"""The `candlekeep` command line: `up`, `migrate`, `backfill`, `ohlcv`, `stream`, `track`, `untrack`.

The CLI is the composition root: it reads the settings once, resolves the database (embedded when
none is configured) and wires the parts together. It is the one place in candlekeep/ that reaches
into pipelines/ and streaming/, lazily inside the commands that run them (`backfill` runs the very
asset code Dagster runs; `stream` and `track` run the streaming daemons' own entry points).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import IO

from candlekeep.bars import Interval, decimal_str, iso_utc
from candlekeep.instruments import Instrument, InstrumentError, resolve_instrument
from candlekeep.logs import configure as configure_logging
from candlekeep.query import QueryError, build_query
from candlekeep.settings import Settings

log = logging.getLogger("candlekeep")

BACKFILL_INTERVALS = ("1m", "1h", "1d")
DAGSTER_YAML = Path("pipelines") / "dagster.yaml"  # the instance config `up` copies into DAGSTER_HOME


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError names the variable
        print(f"candlekeep: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        return args.run(args, settings)
    except (QueryError, InstrumentError) as exc:
        print(f"candlekeep: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candlekeep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="database, migrations, Dagster (webserver + daemon) and the API")
    up.set_defaults(run=cmd_up)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(run=cmd_migrate)

    backfill = commands.add_parser("backfill", help="backfill history through the Dagster assets, in-process")
    backfill.add_argument("--instrument", required=True, help="e.g. cccagg:BTC-USD (or BTCUSD / BTC-USD)")
    backfill.add_argument("--interval", default="1m", choices=BACKFILL_INTERVALS)
    backfill.add_argument("--start", required=True, help="a date or ISO datetime (UTC unless an offset is given)")
    backfill.add_argument("--end", required=True, help="EXCLUSIVE, as everywhere (the API, `ohlcv`): a date or ISO "
                                                       "datetime; every UTC day touching [start, end) is filled whole")  # fmt: skip
    backfill.add_argument("--source", choices=("simulator", "cryptocompare"), help="default: CANDLEKEEP_SOURCE")
    backfill.set_defaults(run=cmd_backfill)

    ohlcv = commands.add_parser("ohlcv", help="print stored bars (5m..1d derived exactly from 1m)")
    ohlcv.add_argument("--instrument", required=True)
    ohlcv.add_argument("--interval", default="1m", help=" ".join(i.value for i in Interval))
    ohlcv.add_argument("--start", required=True, help="unix seconds or ISO-8601, UTC")
    ohlcv.add_argument("--end", required=True, help="exclusive; unix seconds or ISO-8601, UTC")
    ohlcv.add_argument("--format", choices=("table", "csv", "json"), default="table")
    ohlcv.set_defaults(run=cmd_ohlcv)

    stream = commands.add_parser(
        "stream", help="run a streaming daemon: producer, aggregator, coordinator, dynamic, or all of them",
        add_help=False,
    )  # fmt: skip
    stream.add_argument("daemon", choices=("producer", "aggregator", "coordinator", "dynamic", "replayer", "replay-bars",
                                           "books", "all"))  # fmt: skip
    stream.add_argument("options", nargs=argparse.REMAINDER, help="the daemon's own options (--help lists them)")
    stream.set_defaults(run=cmd_stream)

    track = commands.add_parser("track", help="ask the coordinator to track an instrument (history + live feed)")
    track.add_argument("instrument", help="e.g. coinbase:BTC-USD (or BTC-USD for the default venue)")
    track.set_defaults(run=cmd_track)
    _add_feeds_commands(commands)

    untrack = commands.add_parser("untrack", help="stop tracking an instrument (live feed, Dagster partition); "
                                                  "its stored bars stay")  # fmt: skip
    untrack.add_argument("instrument", help="e.g. coinbase:BTC-USD (or BTC-USD for the default venue)")
    untrack.set_defaults(run=cmd_untrack)
    _replay_parser(commands)
    return parser


def _database(settings: Settings) -> str:
    from candlekeep.storage.db import resolve_database_url
    from candlekeep.storage.migrate import upgrade

    url = resolve_database_url(settings)
    upgrade(url)
    return url


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.storage.db import create_engine, license_conflicts
    from candlekeep.storage.migrate import current_revision

    url = _database(settings)
    engine = create_engine(url)
    print(f"database migrated to {current_revision(engine)}")
    # A schema can be current and still unreadable: built under the Timescale license, run under Apache.
    problems = license_conflicts(engine)
    engine.dispose()
    for problem in problems:
        print(f"candlekeep migrate: NOT USABLE: {problem}", file=sys.stderr)
    return 1 if problems else 0


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from pipelines.assets import materialize_range  # the same asset code Dagster runs

    instrument = resolve_instrument(args.instrument)
    first, end = backfill_days(args.start, args.end)
    if first < settings.history_start:
        raise QueryError(f"--start {args.start} is before CANDLEKEEP_HISTORY_START ({settings.history_start}), the "
                         "first day offered as a partition: start later or set CANDLEKEEP_HISTORY_START")  # fmt: skip
    last = end - timedelta(days=1)
    url = _database(settings)
    os.environ["CANDLEKEEP_DATABASE_URL"] = url  # the assets' resource reads the same database
    if "DAGSTER_HOME" not in os.environ:  # the instance `up` serves: the UI shows these materializations
        os.environ.update(_dagster_env(settings, url, project_root()))
    days = (end - first).days
    unit = "day" if args.interval == "1m" else "month"
    with tqdm(total=None if unit == "month" else days, unit=unit, desc=f"{instrument.id} {args.interval}") as bar:
        results = materialize_range(
            instrument=instrument.id,
            interval=Interval(args.interval),
            start=first,
            end=end,
            source=args.source,
            on_partition=lambda key: bar.update(1),
        )
    rows = sum(r.rows for r in results)
    gaps = sum(r.gaps for r in results)
    print(f"backfilled {instrument.id} {args.interval} {first}..{last} (whole UTC days): {rows} bars fetched, "
          f"{sum(r.inserted for r in results)} inserted, {sum(r.updated for r in results)} updated, "
          f"{sum(r.unchanged for r in results)} unchanged, {gaps} missing buckets")
    return 0


def backfill_days(start: str, end: str) -> tuple[date, date]:
    """The UTC days `[first, end)` touching `[start, end)`, from dates or ISO datetimes (end exclusive)."""
    from candlekeep.query import parse_timestamp

    lo, hi = parse_timestamp(start, name="--start"), parse_timestamp(end, name="--end")
    if hi <= lo:
        raise QueryError(f"--end ({end}) must be after --start ({start}); --end is exclusive")
    first = Interval.D1.floor(lo)
    last_end = Interval.D1.ceil(hi)
    epoch = date(1970, 1, 1)
    return epoch + timedelta(days=first // 86_400), epoch + timedelta(days=last_end // 86_400)


def cmd_ohlcv(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.storage.bars import BarStore
    from candlekeep.storage.db import create_engine

    from candlekeep.cache import BarCache
    from candlekeep.serving import OhlcvService

    query = build_query(instrument=args.instrument, interval=args.interval, start=args.start, end=args.end)
    engine = create_engine(_database(settings))
    cache = BarCache.from_url(settings.redis_url) if settings.redis_url else None
    try:  # the API's read path: stored bars, final over provisional, the forming bar last
        result = OhlcvService(bar_store=BarStore(engine), cache=cache).read(query)
    finally:
        if cache is not None:
            cache.close()
        engine.dispose()
    columns = ("time", "open", "high", "low", "close", "volume", "quote_volume", "trades", "source", "final")
    rows = [
        {
            "time": _iso(bar.start),
            "open": decimal_str(bar.open),
            "high": decimal_str(bar.high),
            "low": decimal_str(bar.low),
            "close": decimal_str(bar.close),
            "volume": decimal_str(bar.volume),
            "quote_volume": decimal_str(bar.quote_volume),
            "trades": "" if bar.trades is None else bar.trades,
            "source": bar.source,
            "final": bar.final,
        }
        for bar in result.bars
    ]
    gaps = [{"start": _iso(s), "end": _iso(e)} for s, e in result.gaps]
    if args.format == "json":
        json.dump({"instrument": query.instrument.id, "interval": query.interval.value, "bars": rows,
                   "gaps": gaps, "complete": result.complete}, sys.stdout, indent=1, default=str)
        print()
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(columns, rows)
        print(f"{len(rows)} bars of {query.instrument.id} {query.interval.value}; "
              + (f"{len(gaps)} gaps: " + ", ".join(f"{g['start']}..{g['end']}" for g in gaps[:5]) if gaps else "no gaps"),
              file=sys.stderr)
    return 0


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    from streaming.runner import main as run_streaming

    return run_streaming([args.daemon, *args.options])


def cmd_track(args: argparse.Namespace, settings: Settings) -> int:
    from streaming.runner import send_track

    from candlekeep.sources.listing import make_listing

    instrument = resolve_instrument(args.instrument)
    if (reason := make_listing(settings).unknown(instrument)) is not None:
        print(f"candlekeep: unknown instrument {instrument.id}: {reason}; nothing tracked", file=sys.stderr)
        return 2
    request_id = send_track(settings, instrument.id)
    print(f"track {instrument.id}: sent (request {request_id})")
    return 0


def cmd_untrack(args: argparse.Namespace, settings: Settings) -> int:
    from streaming.runner import send_untrack

    instrument = resolve_instrument(args.instrument)
    request_id = send_untrack(settings, instrument.id)
    print(f"untrack {instrument.id}: sent (request {request_id}); its stored bars stay")
    return 0


def _print_table(columns: Sequence[str], rows: list[dict]) -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).rjust(widths[c]) for c in columns))


_iso = iso_utc


# --- up ------------------------------------------------------------------------------------------


def project_root() -> Path:
    """The checkout holding workspace.yaml and pipelines/dagster.yaml (the current directory, or this
    package's). The instance config lives under pipelines/, not in the root, so that a plain
    `dagster dev` in the root runs on a temporary instance instead of failing on CANDLEKEEP_DAGSTER_PG_URL."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / "workspace.yaml").exists() and (candidate / DAGSTER_YAML).exists():
            return candidate
    raise SystemExit("candlekeep up: run it from the Candlekeep checkout (workspace.yaml not found)")


def _dagster_env(settings: Settings, url: str, root: Path) -> dict[str, str]:
    """DAGSTER_HOME (data_dir/dagster, with the repo's instance config) and CANDLEKEEP_DAGSTER_PG_URL:
    the Dagster instance `up` serves, which `backfill` records its runs in too."""
    from candlekeep.storage.db import ensure_database, with_database

    dagster_url = settings.dagster_pg_url or ensure_database(with_database(url, "dagster"))
    # dagster-postgres speaks psycopg2; SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL.
    dagster_url = "postgresql+psycopg2://" + dagster_url.split("://", 1)[1]
    dagster_home = (settings.data_dir / "dagster").resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / DAGSTER_YAML, dagster_home / "dagster.yaml")  # one source of truth: the repo's
    return {"CANDLEKEEP_DAGSTER_PG_URL": dagster_url, "DAGSTER_HOME": str(dagster_home)}


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.storage.db import create_engine
    from candlekeep.storage.instruments import InstrumentStore

    root = project_root()
    lock = _lock_data_dir(settings.data_dir)
    if lock is None:
        return 1
    url = _database(settings)
    engine = create_engine(url)
    added = InstrumentStore(engine).register(Instrument.parse(i) for i in settings.instruments)
    engine.dispose()
    env = dict(os.environ, CANDLEKEEP_DATABASE_URL=url, **_dagster_env(settings, url, root))
    redis_server = None
    if settings.redis_url is None:  # the embedded defaults: a real Redis from a wheel (candlekeep/embedded_redis.py)
        from candlekeep.embedded_redis import start_embedded_redis

        redis_server = start_embedded_redis()
        env["CANDLEKEEP_REDIS_URL"] = redis_server.url
    bin_dir = Path(sys.executable).parent
    workspace = str(root / "workspace.yaml")
    commands = {
        "dagster-webserver": [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                              "-p", str(settings.dagster_port)],
        "dagster-daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
    }
    if settings.log_format == "json":  # Dagster's own switch; ours reach the API and streaming by env
        for name in ("dagster-webserver", "dagster-daemon"):
            commands[name] += ["--log-format", "json"]
    if settings.kafka_bootstrap_servers:  # the API, and a supervisor of one process per daemon
        commands["api"] = api_command(settings)
        commands["streaming"] = [sys.executable, "-m", "streaming.runner", "all", "--port-base",
                                 str(settings.stream_port_base)]  # fmt: skip
    else:  # one process: the API shares the in-process bus with the daemons (streaming/together.py)
        commands["api+streaming"] = [sys.executable, "-m", "streaming.together", "--port-base",
                                     str(settings.stream_port_base)]  # fmt: skip
    children = {name: subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
                for name, cmd in commands.items()}
    if added:
        log.info("registered instruments %s", ", ".join(added))
    ui = f"http://127.0.0.1:{settings.dagster_port}/server_info"
    api = f"http://{_connect_host(settings.api_host)}:{settings.api_port}/openapi.json"
    try:
        answering = _wait_until_answering([ui, api], children, timeout_s=UP_TIMEOUT_S)
    except KeyboardInterrupt:  # Ctrl-C while starting: stop what started
        answering = False
    if not answering:
        _stop_children(children)
        if redis_server is not None:
            redis_server.stop()
        return 1
    print(f"\nCandlekeep is up (source: {settings.source}, database: {_redact(url)})\n"
          f"  Dagster UI  http://127.0.0.1:{settings.dagster_port}   (Assets > bars_1m > Materialize to backfill)\n"
          f"  Dashboard   http://{settings.api_host}:{settings.api_port}/\n"
          f"  API         http://{settings.api_host}:{settings.api_port}/docs\n"
          f"  Streaming   {'Kafka ' + settings.kafka_bootstrap_servers if settings.kafka_bootstrap_servers else 'in-process bus'}"
          f", live {settings.source} ticks -> 1m bars\n"
          f"  Ctrl-C stops everything.\n", flush=True)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                log.error("%s exited with code %s; stopping everything", name, child.returncode)
                stopping, exit_code = True, 1
        time.sleep(0.5)
    _stop_children(children)
    if redis_server is not None:
        redis_server.stop()
    lock.close()  # the next `up` may start now
    return exit_code


def _lock_data_dir(data_dir: Path) -> IO[str] | None:
    """Hold `<data_dir>/up.lock` (an flock, released by the kernel when this process dies, even by
    SIGKILL, so a stale file never blocks) and write our pid in it; None, after saying which process
    holds it, when another `candlekeep up` on the same data directory is running."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "up.lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        print(f"candlekeep up: already running on data directory {data_dir.resolve()} (pid {holder}); "
              f"stop it first (Ctrl-C in its terminal, or kill -INT {holder})", file=sys.stderr)
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


UP_TIMEOUT_S = 180.0


def _connect_host(host: str) -> str:
    """Where to reach a server listening on `host` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _wait_until_answering(urls: Sequence[str], children: dict[str, subprocess.Popen], *, timeout_s: float) -> bool:
    """True once every URL answers HTTP (any status): the banner's links work when it is printed.
    False, saying which, when a child exits first or `timeout_s` passes."""
    import urllib.error
    import urllib.request

    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for name, child in children.items():
            if child.poll() is not None:
                log.error("%s exited with code %s while starting; stopping everything", name, child.returncode)
                return False
        for url in list(pending):
            try:
                with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (our own loopback URLs)
                    pending.remove(url)
            except urllib.error.HTTPError:
                pending.remove(url)  # it answered
            except OSError:
                pass
        time.sleep(0.3)
    if pending:
        log.error("not answering after %.0f s: %s; stopping everything", timeout_s, ", ".join(pending))
        return False
    return True


def api_command(settings: Settings, *, log_level: str = "warning") -> list[str]:
    """The uvicorn command line of the API. Forwarded headers are believed only from the configured
    proxies (uvicorn's default trusts any loopback peer, which lets a local client spoof its address
    past the per-address rate limit)."""
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", settings.api_host,
               "--port", str(settings.api_port), "--log-level", log_level]
    if settings.api_forwarded_allow_ips:
        command += ["--proxy-headers", "--forwarded-allow-ips", ",".join(settings.api_forwarded_allow_ips)]
    else:
        command += ["--no-proxy-headers"]
    return command


def _stop_children(children: dict[str, subprocess.Popen]) -> None:
    for child in children.values():
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    log.info("stopped %s", ", ".join(children))


def _redact(url: str) -> str:
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, userpass = head.partition("//")
    return f"{scheme}//{userpass.split(':')[0]}:***@{tail}"


# --- feeds: exchange connectors offline (issue 10) -------------------------------------------------


def _add_feeds_commands(commands: argparse._SubParsersAction) -> None:
    feeds = commands.add_parser("feeds", help="exchange feeds offline: capture raw frames, normalize a recording")
    actions = feeds.add_subparsers(required=True, metavar="ACTION")
    capture = actions.add_parser("capture", help="record raw frames (and REST snapshots) in the cryptofeed format")
    capture.add_argument("--venue", required=True)
    capture.add_argument("--instruments", required=True, help="comma-separated ids, e.g. kraken:BTC-USD")
    capture.add_argument("--out", required=True, type=Path, help="WebSocket frames; REST responses go to OUT.http")
    capture.add_argument("--seconds", type=float, help="stop after this long (default: until Ctrl-C)")
    capture.set_defaults(run=cmd_feeds_capture)
    normalize = actions.add_parser("normalize", help="run the connector over a recording; one JSON line per record")
    normalize.add_argument("--venue", required=True)
    normalize.add_argument("--ws", required=True, type=Path, help="the recorded WebSocket session")
    normalize.add_argument("--rest", type=Path, help="the recorded REST snapshots (e.g. BINANCE.http.0.0.txt)")
    normalize.add_argument("--listing", type=Path,
                           help="the venue's recorded symbol listing (default: <VENUE>.0.txt beside --ws)")
    normalize.add_argument("--instruments", help="comma-separated ids (default: every listed instrument)")
    normalize.add_argument("--format", choices=("jsonl",), default="jsonl")
    normalize.set_defaults(run=cmd_feeds_normalize)


def cmd_feeds_normalize(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.feeds import normalize, write_jsonl
    from candlekeep.sources.exchanges.base import ConnectorError, listing_bodies
    from candlekeep.sources.exchanges.recording import RecordingError, read_http, read_ws
    from candlekeep.sources.exchanges.registry import symbols_from_listing, venue

    listing = args.listing or args.ws.with_name(args.ws.name.split(".")[0] + ".0.txt")
    try:
        spec = venue(args.venue)
        symbols = symbols_from_listing(args.venue, listing_bodies(listing.read_text()))
        instruments = args.instruments.split(",") if args.instruments else sorted(symbols.to_venue)
        connector = spec.connector(symbols, instruments)
        records = normalize(connector, read_ws(args.ws), read_http(args.rest) if args.rest else ())
        write_jsonl(records, sys.stdout)
    except (OSError, ConnectorError, RecordingError) as exc:
        print(f"candlekeep feeds normalize: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_feeds_capture(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.feeds import capture

    http_path = args.out.with_name(args.out.name + ".http")
    with args.out.open("a", encoding="utf-8") as ws_out, http_path.open("a", encoding="utf-8") as http_out:
        try:
            capture(args.venue, args.instruments.split(","), ws_out, http_out, seconds=args.seconds)
        except KeyboardInterrupt:
            pass
    print(f"recorded {args.out} and {http_path}", file=sys.stderr)
    return 0



# --- replay sessions (issue 9) -----------------------------------------------------------------------
# The same rows the API's /v1/replays steers (candlekeep.storage.replay_sessions); a running
# `candlekeep stream replayer` (or `stream all`) publishes them.

REPLAY_VERBS = ("start", "pause", "resume", "stop")


def _replay_parser(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser("replay", help="replay sessions: create, start, pause, resume, seek, stop, status, list")
    verbs = replay.add_subparsers(required=True, metavar="VERB")
    create = verbs.add_parser("create", help="a session over stored history (state: created)")
    create.add_argument("--instrument", action="append", required=True, help="repeat for several instruments")
    create.add_argument("--start", required=True, help="unix seconds or ISO-8601, UTC")
    create.add_argument("--end", required=True, help="exclusive; unix seconds or ISO-8601, UTC")
    create.add_argument("--speed", default="1", help="simulated seconds per wall second, or max (default 1)")
    create.set_defaults(run=cmd_replay_create)
    for verb in REPLAY_VERBS:
        cmd = verbs.add_parser(verb, help=f"{verb} a session")
        cmd.add_argument("id")
        cmd.set_defaults(run=cmd_replay_verb, verb=verb)
    seek = verbs.add_parser("seek", help="continue from a time inside the range")
    seek.add_argument("id")
    seek.add_argument("time", help="unix seconds or ISO-8601, UTC")
    seek.set_defaults(run=cmd_replay_seek)
    speed = verbs.add_parser("speed", help="change the speed (also while running)")
    speed.add_argument("id")
    speed.add_argument("speed", help="a positive number, or max")
    speed.set_defaults(run=cmd_replay_speed)
    status = verbs.add_parser("status", help="one session; --follow shows a progress bar until it ends")
    status.add_argument("id")
    status.add_argument("--follow", action="store_true")
    status.set_defaults(run=cmd_replay_status)
    listing = verbs.add_parser("list", help="every session")
    listing.set_defaults(run=cmd_replay_list)


def _replay_store(settings: Settings):
    from candlekeep.storage.db import create_engine
    from candlekeep.storage.replay_sessions import ReplaySessionStore

    return ReplaySessionStore(create_engine(_database(settings)))


def _replay_call(fn, *args, **kw) -> int:
    from candlekeep.replay import TransitionNotAllowed
    from candlekeep.storage.replay_sessions import NoStoredData, SessionNotFound, TooManySessions

    try:
        row = fn(*args, **kw)
    except (SessionNotFound, TransitionNotAllowed, TooManySessions, NoStoredData, ValueError) as exc:
        print(f"candlekeep: {exc}", file=sys.stderr)
        return 2
    _print_session(row)
    return 0


def _print_session(row) -> None:
    from candlekeep.replay import iso_ns, speed_text

    now = time.time_ns()
    print(f"{row.id}  {row.state}  {','.join(row.instruments)}  [{iso_ns(row.start_ns)}, {iso_ns(row.end_ns)})  "
          f"speed {speed_text(row.speed)}  clock {iso_ns(row.clock_at(now))}  {row.percent:.1f}%  "
          f"trades {row.trades_sent}/{row.trades_total}  {row.rate:.0f} msg/s"
          + (f"  error: {row.error}" if row.error else ""))  # fmt: skip


def cmd_replay_create(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.replay import parse_speed, parse_time_ns

    try:
        instruments = [resolve_instrument(i).id for i in args.instrument]
        start, end = parse_time_ns(args.start, name="--start"), parse_time_ns(args.end, name="--end")
        speed = parse_speed(args.speed)
    except ValueError as exc:
        print(f"candlekeep: {exc}", file=sys.stderr)
        return 2
    store = _replay_store(settings)
    return _replay_call(store.create, instruments=instruments, start_ns=start, end_ns=end, speed=speed,
                        lateness_ns=round(settings.replay_lateness_s * 1e9), max_active=settings.replay_max_sessions,
                        wall_ns=time.time_ns())  # fmt: skip


def cmd_replay_verb(args: argparse.Namespace, settings: Settings) -> int:
    return _replay_call(_replay_store(settings).act, args.id, args.verb, wall_ns=time.time_ns())


def cmd_replay_seek(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.replay import parse_time_ns

    store = _replay_store(settings)
    try:
        at = parse_time_ns(args.time)
    except ValueError as exc:
        print(f"candlekeep: {exc}", file=sys.stderr)
        return 2
    return _replay_call(store.seek, args.id, at, wall_ns=time.time_ns())


def cmd_replay_speed(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.replay import parse_speed

    try:
        speed = parse_speed(args.speed)
    except ValueError as exc:
        print(f"candlekeep: {exc}", file=sys.stderr)
        return 2
    return _replay_call(_replay_store(settings).set_speed, args.id, speed, wall_ns=time.time_ns())


def cmd_replay_status(args: argparse.Namespace, settings: Settings) -> int:
    store = _replay_store(settings)
    if not args.follow:
        return _replay_call(store.get, args.id)
    from tqdm import tqdm

    from candlekeep.replay import ACTIVE, iso_ns
    from candlekeep.storage.replay_sessions import SessionNotFound

    try:
        row = store.get(args.id)
    except SessionNotFound as exc:
        print(f"candlekeep: {exc}", file=sys.stderr)
        return 2
    with tqdm(total=100.0, unit="%", desc=f"replay {row.id}", bar_format="{l_bar}{bar}| {n:.1f}% {postfix}") as bar:
        while True:
            row = store.get(args.id)
            bar.n = row.percent
            bar.set_postfix_str(f"{row.state} clock {iso_ns(row.clock_at(time.time_ns()))} {row.rate:.0f} msg/s")
            if row.state not in ACTIVE:
                break
            time.sleep(0.5)
    _print_session(row)
    return 0


def cmd_replay_list(args: argparse.Namespace, settings: Settings) -> int:
    for row in _replay_store(settings).list():
        _print_session(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
