"""The `candlekeep` command line: `up`, `migrate`, `backfill`, `ohlcv`, `stream`, `track`.

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

from candlekeep.bars import Interval, decimal_str
from candlekeep.instruments import Instrument, InstrumentError, resolve_instrument
from candlekeep.query import QueryError, build_query, query_ohlcv
from candlekeep.settings import Settings

log = logging.getLogger("candlekeep")

BACKFILL_INTERVALS = ("1m", "1h", "1d")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError names the variable
        print(f"candlekeep: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
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
    backfill.add_argument("--instrument", required=True, help="e.g. cccagg:BTC-USD")
    backfill.add_argument("--interval", default="1m", choices=BACKFILL_INTERVALS)
    backfill.add_argument("--start", required=True, type=date.fromisoformat, help="first day, YYYY-MM-DD (UTC)")
    backfill.add_argument("--end", required=True, type=date.fromisoformat, help="last day, inclusive, YYYY-MM-DD")
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
    stream.add_argument("daemon", choices=("producer", "aggregator", "coordinator", "dynamic", "replayer", "replay-bars", "all"))
    stream.add_argument("options", nargs=argparse.REMAINDER, help="the daemon's own options (--help lists them)")
    stream.set_defaults(run=cmd_stream)

    track = commands.add_parser("track", help="ask the coordinator to track an instrument (history + live feed)")
    track.add_argument("instrument", help="e.g. coinbase:BTC-USD (or BTC-USD for the default venue)")
    track.set_defaults(run=cmd_track)
    _replay_parser(commands)
    return parser


def _database(settings: Settings) -> str:
    from candlekeep.storage.db import resolve_database_url
    from candlekeep.storage.migrate import upgrade

    url = resolve_database_url(settings)
    upgrade(url)
    return url


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.storage.db import create_engine
    from candlekeep.storage.migrate import current_revision

    url = _database(settings)
    engine = create_engine(url)
    print(f"database migrated to {current_revision(engine)}")
    engine.dispose()
    return 0


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from pipelines.assets import materialize_range  # the same asset code Dagster runs

    instrument = Instrument.parse(args.instrument)
    if args.end < args.start:
        raise QueryError(f"--end ({args.end}) is before --start ({args.start})")
    url = _database(settings)
    os.environ["CANDLEKEEP_DATABASE_URL"] = url  # the assets' resource reads the same database
    days = (args.end - args.start).days + 1
    unit = "day" if args.interval == "1m" else "month"
    with tqdm(total=None if unit == "month" else days, unit=unit, desc=f"{instrument.id} {args.interval}") as bar:
        results = materialize_range(
            instrument=instrument.id,
            interval=Interval(args.interval),
            start=args.start,
            end=args.end + timedelta(days=1),
            source=args.source,
            on_partition=lambda key: bar.update(1),
        )
    rows = sum(r.rows for r in results)
    gaps = sum(r.gaps for r in results)
    print(f"backfilled {instrument.id} {args.interval} {args.start}..{args.end}: {rows} bars fetched, "
          f"{sum(r.inserted for r in results)} inserted, {sum(r.updated for r in results)} updated, "
          f"{sum(r.unchanged for r in results)} unchanged, {gaps} missing buckets")
    return 0


def cmd_ohlcv(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.storage.bars import BarStore
    from candlekeep.storage.db import create_engine

    query = build_query(instrument=args.instrument, interval=args.interval, start=args.start, end=args.end)
    engine = create_engine(_database(settings))
    result = query_ohlcv(store=BarStore(engine), query=query, now=int(time.time()))
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

    instrument = resolve_instrument(args.instrument)
    request_id = send_track(settings, instrument.id)
    print(f"track {instrument.id}: sent (request {request_id})")
    return 0


def _print_table(columns: Sequence[str], rows: list[dict]) -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).rjust(widths[c]) for c in columns))


def _iso(ts_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_s))


# --- up ------------------------------------------------------------------------------------------


def project_root() -> Path:
    """The checkout holding workspace.yaml and dagster.yaml (the current directory, or this package's)."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / "workspace.yaml").exists() and (candidate / "dagster.yaml").exists():
            return candidate
    raise SystemExit("candlekeep up: run it from the Candlekeep checkout (workspace.yaml not found)")


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from candlekeep.storage.db import create_engine, ensure_database, with_database
    from candlekeep.storage.instruments import InstrumentStore

    root = project_root()
    url = _database(settings)
    engine = create_engine(url)
    added = InstrumentStore(engine).register(Instrument.parse(i) for i in settings.instruments)
    engine.dispose()
    dagster_url = settings.dagster_pg_url or ensure_database(with_database(url, "dagster"))
    # dagster-postgres speaks psycopg2; SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql:// URL.
    dagster_url = "postgresql+psycopg2://" + dagster_url.split("://", 1)[1]
    dagster_home = (settings.data_dir / "dagster").resolve()
    dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "dagster.yaml", dagster_home / "dagster.yaml")  # one source of truth: the repo's
    env = dict(os.environ, CANDLEKEEP_DATABASE_URL=url, CANDLEKEEP_DAGSTER_PG_URL=dagster_url,
               DAGSTER_HOME=str(dagster_home))
    bin_dir = Path(sys.executable).parent
    workspace = str(root / "workspace.yaml")
    commands = {
        "dagster-webserver": [str(bin_dir / "dagster-webserver"), "-w", workspace, "-h", "127.0.0.1",
                              "-p", str(settings.dagster_port)],
        "dagster-daemon": [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
        "api": [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", settings.api_host,
                "--port", str(settings.api_port), "--log-level", "warning"],
        # One process over the in-process bus, or a supervisor of one process per daemon with Kafka.
        "streaming": [sys.executable, "-m", "streaming.runner", "all", "--port-base", str(settings.stream_port_base)],
    }
    children = {name: subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
                for name, cmd in commands.items()}
    if added:
        log.info("registered instruments %s", ", ".join(added))
    print(f"\nCandlekeep is up (source: {settings.source}, database: {_redact(url)})\n"
          f"  Dagster UI  http://127.0.0.1:{settings.dagster_port}   (Assets > bars_1m > Materialize to backfill)\n"
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
    return exit_code


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


if __name__ == "__main__":
    raise SystemExit(main())


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
