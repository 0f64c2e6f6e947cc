"""Run the streaming daemons: one by name, or all of them (embedded in one process, or supervised).

    python -m streaming.runner producer|aggregator|coordinator|dynamic [that daemon's options]
    python -m streaming.runner all [--speed N] [--start T] [--end T] [--port-base 9101] [--drain 10]

The CLI calls `run_daemon(name, settings, argv)` (`candlekeep stream <name>`), `run_all(settings)`
(`candlekeep stream all`) and `send_track(settings, instrument_id)` (`candlekeep track`). Each
daemon serves /health and /metrics on its own port: producer 9101, aggregator 9102, coordinator
9103, dynamic consumer 9104 (`--port`, or `--port-base` for all; 0 picks free ports, -1 none).

`run_all`:
- no CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS: `Embedded`, the four daemons in threads of this process
  over one InProcessBus, built and run by the same code as on Kafka. SIGINT / SIGTERM (or `stop`)
  shuts down in order: the producer stops and delivers what it holds, the coordinator finishes its
  command, the aggregator and the dynamic consumer drain the bus (the in-process log dies with the
  process), then flush, commit and stop. Returns 0 when all of that happened, 1 otherwise;
- Kafka configured: `Supervisor`, each daemon a child process `python -m streaming.runner <name>`
  with these settings in its environment; a child that exits is started again after a backoff
  (1 s doubling to 30 s; reset once it ran a minute); SIGINT / SIGTERM (or `stop`) sends SIGTERM to
  every child, SIGKILL to any still running after `grace_s`; a child gets SIGTERM as well should the
  supervisor die (Linux PR_SET_PDEATHSIG).
Both migrate the database first (and resolve the embedded PostgreSQL once, for every daemon).

`send_track` publishes a `track` command on `control` and returns its request id once the bus
acknowledged it. Without a broker, no other process can reach the embedded bus: the instrument is
registered tracked=true in `instruments` instead, and the coordinator of a running `stream all`
issues the track command itself within `scan_interval_s` (streaming/coordinator.py).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from candlekeep.bars import NS_PER_S
from candlekeep.instruments import Instrument
from candlekeep.logs import configure as configure_logging
from candlekeep.messages import CONTROL, ControlCommand, encode_control
from candlekeep.messages import topic as topic_name
from candlekeep.settings import Settings
from streaming import aggregator, coordinator, dynamic, producer
from streaming import books  # the books daemon (issue 11)
from streaming import replay_bars, replayer  # replay sessions (issue 9)
from candlekeep.bus import Bus, InProcessBus, make_bus
from streaming.health import HealthServer

log = logging.getLogger(__name__)

DAEMONS = ("producer", "aggregator", "coordinator", "dynamic", "replayer", "books", "replay-bars")  # ports base..base+6
DEFAULT_PORTS = {"producer": 9101, "aggregator": 9102, "coordinator": 9103, "dynamic": 9104, "replayer": 9105,
                 "replay-bars": 9107}
# The books daemon (issue 11): `books` topic -> book_snapshots / book_buckets / book_metrics.
DEFAULT_PORTS["books"] = books.DEFAULT_PORT


class TrackFailed(RuntimeError):
    """The track command was not acknowledged by the bus."""


# --- one daemon ------------------------------------------------------------------------------------


def run_daemon(name: str, settings: Settings, argv: Sequence[str]) -> int:
    """Run daemon `name` in this process until SIGINT / SIGTERM; `argv` are its own options."""
    if name not in DAEMONS:
        raise ValueError(f"unknown daemon {name!r}: expected one of {', '.join(DAEMONS)}")
    if not settings.kafka_bootstrap_servers:
        log.warning("no CANDLEKEEP_KAFKA_BOOTSTRAP_SERVERS: the %s runs on an in-process bus no other process "
                    "can reach; `streaming.runner all` runs every daemon on one", name)  # fmt: skip
    if name == "producer":
        producer.main(list(argv))  # reads CANDLEKEEP_* itself
        return 0
    if name == "aggregator":
        return aggregator.main(list(argv))  # reads CANDLEKEEP_* itself
    if name == "coordinator":
        return coordinator.main(argv, settings)
    if name == "replayer":
        return replayer.main(argv, settings)
    if name == "replay-bars":
        return replay_bars.main(argv, settings)
    if name == "books":
        return books.main(list(argv))  # reads CANDLEKEEP_* itself
    return dynamic.main(argv, settings)


# --- all of them -----------------------------------------------------------------------------------


def run_all(
    settings: Settings,
    *,
    speed: float = 1.0,
    start_ns: int | None = None,
    end_ns: int | None = None,
    ports: Mapping[str, int] | None = None,
    host: str = "127.0.0.1",
    drain_s: float = 10.0,
    stop: threading.Event | None = None,
    ready: Callable[[Embedded | Supervisor], object] | None = None,
) -> int:
    """Every daemon until SIGINT / SIGTERM (or `stop`); see the module doc. `speed` / `start_ns` /
    `end_ns` are the simulator playback's; `ready(system)` is called once everything started."""
    ports = {**DEFAULT_PORTS, **(ports or {})}
    stop = stop or threading.Event()
    restore = _on_signals(stop)
    try:
        system: Embedded | Supervisor
        if settings.kafka_bootstrap_servers:
            system = Supervisor(settings, commands=_child_commands(speed, start_ns, end_ns, ports, host))
        else:
            system = Embedded(settings, speed=speed, start_ns=start_ns, end_ns=end_ns, ports=ports, host=host,
                              drain_s=drain_s)  # fmt: skip
        return system.run(stop, ready=ready)
    finally:
        restore()


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGINT / SIGTERM set `stop` (only the main thread may install handlers); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _database(settings: Settings) -> str:
    """The database URL every daemon uses (the embedded server started once), migrated to head."""
    from candlekeep.storage.db import resolve_database_url
    from candlekeep.storage.migrate import upgrade

    url = resolve_database_url(settings)
    upgrade(url)
    return url


@dataclass
class _Thread:
    name: str
    thread: threading.Thread
    stop: Callable[[], None]


class Embedded:
    """The four daemons over one InProcessBus, each on its own thread and /health port."""

    def __init__(self, settings: Settings, *, speed: float = 1.0, start_ns: int | None = None,
                 end_ns: int | None = None, ports: Mapping[str, int] | None = None, host: str = "127.0.0.1",
                 drain_s: float = 10.0) -> None:  # fmt: skip
        from candlekeep.cache import BarCache
        from candlekeep.storage.db import create_engine

        self.settings, self.drain_s, self.end_ns = settings, drain_s, end_ns
        self.ports = {**DEFAULT_PORTS, **(ports or {})}
        self.host = host
        self.engine = create_engine(_database(settings))
        self.bus = InProcessBus()
        self.cache = BarCache.from_url(settings.redis_url) if settings.redis_url else None
        self.producer = producer.build(settings, self.bus, self.engine, speed=speed, start_ns=start_ns, end_ns=end_ns)
        self.aggregator = aggregator.build(settings, self.bus, self.engine, self.cache)
        self.coordinator = coordinator.build(settings, self.bus, self.engine, announce=True)
        self.dynamic = dynamic.build(settings, self.bus, self.engine)
        self.replayer = replayer.build(settings, self.bus, self.engine)
        self.replay_bars = replay_bars.build(settings, self.bus, self.engine)
        self.books = books.build(settings, self.bus, self.engine)
        self.servers: dict[str, HealthServer] = {}
        self.clean: dict[str, bool] = {}  # after run(): how each daemon stopped

    @property
    def daemons(self) -> dict[str, Any]:
        return {"producer": self.producer, "aggregator": self.aggregator, "coordinator": self.coordinator,
                "dynamic": self.dynamic, "replayer": self.replayer, "replay-bars": self.replay_bars,
                "books": self.books}  # fmt: skip

    def run(self, stop: threading.Event, *, ready: Callable[[Embedded], object] | None = None) -> int:
        for name, daemon in self.daemons.items():
            if (port := self.ports[name]) >= 0:
                self.servers[name] = HealthServer(daemon.registry, daemon.health, host=self.host, port=port).start()
                log.info("%s /health and /metrics on %s", name, self.servers[name].url)
        events = {name: threading.Event() for name in ("aggregator", "coordinator", "dynamic", "replayer", "replay-bars",
                                                          "books")}  # fmt: skip
        threads = [
            _Thread("producer", threading.Thread(target=self.producer.run, name="producer"), self.producer.stop),
            *(_Thread(name, threading.Thread(target=self.daemons[name].run, args=(events[name],), name=name),
                      events[name].set) for name in events),
        ]  # fmt: skip
        for t in threads:
            t.thread.start()
        log.info("embedded streaming running: producer, aggregator, coordinator, dynamic consumer, one in-process bus")
        if ready is not None:
            ready(self)
        failed = False
        try:
            while not stop.wait(0.2):
                dead = [t.name for t in threads if not t.thread.is_alive()
                        and not (t.name == "producer" and self.end_ns is not None)]  # fmt: skip
                if dead:  # the daemons recover from errors themselves: a thread that ends is a bug
                    log.error("embedded streaming: %s stopped on its own; stopping everything", ", ".join(dead))
                    failed = True
                    break
        finally:
            self._shutdown({t.name: t for t in threads})
        ok = not failed and all(self.clean.values())
        log.info("embedded streaming stopped %s: %s", "cleanly" if ok else "UNCLEANLY",
                 ", ".join(f"{n} {'ok' if c else 'NOT clean'}" for n, c in self.clean.items()))  # fmt: skip
        return 0 if ok else 1

    def _shutdown(self, threads: dict[str, _Thread]) -> None:
        log.info("embedded streaming stopping")
        try:
            self._stop(threads["producer"])
            producer_thread = threads["producer"].thread
            self.clean["producer"] = not producer_thread.is_alive() and self.producer.health()["buffered"] == 0
            self._stop(threads["coordinator"])
            self.clean["coordinator"] = not threads["coordinator"].thread.is_alive()
            drains = {"aggregator": ("lag", "pending_trades", "pending_bars"), "dynamic": ("lag", "retrying"),
                      "books": ("lag", "pending_outputs")}
            for name, keys in drains.items():
                drained = self._drain(self.daemons[name].health, keys)
                self._stop(threads[name])
                after = self.daemons[name].health()
                self.clean[name] = drained and not threads[name].thread.is_alive() and all(
                    after[k] == 0 for k in keys if k != "lag")  # fmt: skip
            self._stop(threads["replayer"])  # it checkpoints its sessions: a restart continues them
            self.clean["replayer"] = not threads["replayer"].thread.is_alive()
            self._stop(threads["replay-bars"])  # rebuilt from the replay logs at the next start
            self.clean["replay-bars"] = not threads["replay-bars"].thread.is_alive()
        finally:
            for server in self.servers.values():
                server.stop()
            self.bus.close()
            if self.cache is not None:
                self.cache.close()
            self.engine.dispose()

    @staticmethod
    def _stop(t: _Thread, timeout: float = 60.0) -> None:
        t.stop()
        t.thread.join(timeout)
        if t.thread.is_alive():
            log.error("embedded streaming: %s did not stop within %.0f s", t.name, timeout)

    def _drain(self, health: Callable[[], Mapping[str, Any]], keys: Sequence[str]) -> bool:
        """Wait until `keys` of the health are 0 for 1.2 s (lag is measured once a second)."""
        deadline = time.monotonic() + self.drain_s
        since = None
        while time.monotonic() < deadline:
            if all(health()[k] == 0 for k in keys):
                since = since or time.monotonic()
                if time.monotonic() - since >= 1.2:
                    return True
            else:
                since = None
            time.sleep(0.05)
        log.error("embedded streaming: %s not drained after %.0f s: %s", health().get("daemon"), self.drain_s,
                  {k: health()[k] for k in keys})  # fmt: skip
        return False


# --- supervised child processes --------------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str | None]:
    """`settings` as CANDLEKEEP_* variables (None: unset), so a child process reads the same settings."""
    env: dict[str, str | None] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        key = f"CANDLEKEEP_{name.upper()}"
        if value is None:
            env[key] = None
        elif isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        elif isinstance(value, list | tuple):
            env[key] = ",".join(str(v) for v in value)
        else:
            env[key] = str(value)
    return env


def _child_commands(speed: float, start_ns: int | None, end_ns: int | None, ports: Mapping[str, int],
                    host: str) -> dict[str, list[str]]:  # fmt: skip
    commands = {}
    for name in DAEMONS:
        args = ["--host", host, "--port", str(ports[name])]
        if name == "producer":
            args += ["--speed", repr(speed)]
            args += ["--start", str(start_ns // NS_PER_S)] if start_ns is not None else []
            args += ["--end", str(end_ns // NS_PER_S)] if end_ns is not None else []
        commands[name] = [sys.executable, "-m", "streaming.runner", name, *args]
    return commands


@dataclass
class _Child:
    name: str
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    due: float = 0.0  # when to start it (again)
    backoff: float = 1.0
    restarts: int = 0


class Supervisor:
    """Each daemon a child process, restarted with a backoff when it exits; see the module doc."""

    def __init__(self, settings: Settings, *, commands: Mapping[str, list[str]], min_backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0, grace_s: float = 30.0) -> None:  # fmt: skip
        self.settings = settings
        self.children = {name: _Child(name, list(cmd), backoff=min_backoff_s) for name, cmd in commands.items()}
        self.min_backoff_s, self.max_backoff_s, self.stable_s, self.grace_s = (
            min_backoff_s, max_backoff_s, stable_s, grace_s)  # fmt: skip
        self.env: dict[str, str] = {}

    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children.values() if c.proc is not None and c.proc.poll() is None}

    def run(self, stop: threading.Event, *, ready: Callable[[Supervisor], object] | None = None) -> int:
        env = dict(os.environ)
        for key, value in {**settings_env(self.settings), "CANDLEKEEP_DATABASE_URL": _database(self.settings)}.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        self.env = env
        for child in self.children.values():
            self._start(child)
        if ready is not None:
            ready(self)
        while not stop.wait(0.2):
            now = time.monotonic()
            for child in self.children.values():
                if child.proc is not None and (code := child.proc.poll()) is not None:
                    ran = now - child.started
                    child.backoff = self.min_backoff_s if ran >= self.stable_s else child.backoff
                    child.due = now + child.backoff
                    log.warning("%s (pid %d) exited with code %s after %.1f s; restarting in %.0f s", child.name,
                                child.proc.pid, code, ran, child.backoff,
                                extra={"daemon": child.name, "code": code})  # fmt: skip
                    child.backoff = min(child.backoff * 2, self.max_backoff_s)
                    child.proc = None
                if child.proc is None and now >= child.due and not stop.is_set():
                    child.restarts += 1
                    self._start(child)
        return self._stop_all()

    def _start(self, child: _Child) -> None:
        child.proc = subprocess.Popen(child.command, env=self.env, stdin=subprocess.DEVNULL,
                                      preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
        child.started = time.monotonic()
        log.info("started %s (pid %d)%s", child.name, child.proc.pid,
                 f", restart {child.restarts}" if child.restarts else "",
                 extra={"daemon": child.name, "pid": child.proc.pid})  # fmt: skip

    def _stop_all(self) -> int:
        running = [c for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        log.info("stopping %s", ", ".join(c.name for c in running) or "nothing")
        for child in running:
            child.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.grace_s
        codes = {}
        for child in running:
            assert child.proc is not None
            try:
                codes[child.name] = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) ignored SIGTERM for %.0f s; killing it", child.name, child.proc.pid,
                          self.grace_s)  # fmt: skip
                child.proc.kill()
                codes[child.name] = child.proc.wait(10)
        log.info("stopped: %s", ", ".join(f"{n} exit {c}" for n, c in codes.items()) or "nothing was running")
        return 0 if all(code == 0 for code in codes.values()) else 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- track -----------------------------------------------------------------------------------------


def send_track(settings: Settings, instrument_id: str, *, bus: Bus | None = None, timeout: float = 30.0) -> str:
    """Ask the coordinator to track `instrument_id` (canonical id); returns the command's request id.

    With a broker (or a `bus` given): the `track` command is on `control` when this returns (TrackFailed
    otherwise). Without: the instrument is registered tracked in `instruments`, and a running
    `stream all` issues the command (see the module doc).
    """
    instrument = Instrument.parse(instrument_id)
    request_id = uuid.uuid4().hex
    if bus is None and not settings.kafka_bootstrap_servers:
        from candlekeep.storage.db import create_engine
        from candlekeep.storage.instruments import InstrumentStore

        engine = create_engine(_database(settings))
        try:
            InstrumentStore(engine).register([instrument], tracked=True)
        finally:
            engine.dispose()
        log.info("track %s: registered as tracked; the coordinator of `stream all` sets it up", instrument.id)
        return request_id
    _send_control(settings, "track", instrument.id, request_id, bus=bus, timeout=timeout)
    return request_id


def _send_control(settings: Settings, op: str, instrument_id: str, request_id: str, *, bus: Bus | None,
                  timeout: float) -> None:
    """Put one `op` command on `control` (of `bus`, or of the configured bus) and wait until the bus
    acknowledged it; TrackFailed when it did not within `timeout` s."""
    own = bus is None
    bus = bus or make_bus(settings)
    try:
        control = topic_name(settings.topic_prefix, CONTROL)
        bus.ensure_topics([control])
        out = bus.producer(name=f"candlekeep-{op}")
        out.publish(control, instrument_id, encode_control(ControlCommand(op, instrument_id, request_id)))
        left = out.flush(timeout)
        if left or out.failed or out.delivered != 1:
            raise TrackFailed(f"{op} {instrument_id}: the bus did not acknowledge the command within {timeout:.0f} s")
    finally:
        if own:
            bus.close()
    log.info("%s %s: command %s on %s", op, instrument_id, request_id, control)


def send_untrack(settings: Settings, instrument_id: str, *, bus: Bus | None = None, timeout: float = 30.0,
                 engine: Any = None) -> str:
    """Ask the coordinator to stop tracking `instrument_id`; returns the command's request id.

    With a broker (or a `bus` given): an `untrack` command on `control` (the coordinator sets
    tracked=false, the producer unsubscribes). Without: tracked=false in `instruments` at once, and
    the coordinator of a running `stream all` issues the command within `scan_interval_s`. Stored
    bars stay either way; pipelines/sensors.py removes the instrument's Dagster partition.
    """
    instrument = Instrument.parse(instrument_id)
    request_id = uuid.uuid4().hex
    if bus is None and not settings.kafka_bootstrap_servers:
        from candlekeep.storage.db import create_engine
        from candlekeep.storage.instruments import InstrumentStore

        own_engine = engine is None  # the API passes its engine: no migration inside a request
        engine = engine or create_engine(_database(settings))
        try:
            InstrumentStore(engine).set_tracked(instrument, False)
        finally:
            if own_engine:
                engine.dispose()
        log.info("untrack %s: tracked=false; the coordinator of `stream all` stops its feed", instrument.id)
        return request_id
    _send_control(settings, "untrack", instrument.id, request_id, bus=bus, timeout=timeout)
    return request_id


# --- command line ----------------------------------------------------------------------------------


def _time_ns(text: str) -> int:
    """`2024-03-01T12:00:00Z`, `2024-03-01` or unix seconds -> unix ns."""
    if text.isascii() and text.isdigit():  # str.isdigit alone takes Unicode digits such as "١٧٠٤"
        return int(text) * NS_PER_S
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * NS_PER_S + moment.microsecond * 1000


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: python -m streaming.runner {{{'|'.join((*DAEMONS, 'all'))}}} [options]"
    if not args or args[0] in ("-h", "--help"):
        print(usage + "\n\n" + __doc__)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in (*DAEMONS, "all"):
        print(usage, file=sys.stderr)
        return 2
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    try:
        return _main(name, rest, settings)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"streaming {name}: a /health + /metrics port is already in use ({exc.strerror}); pass --port / "
              "--port-base 0 (any free port) or set CANDLEKEEP_STREAM_PORT_BASE", file=sys.stderr)  # fmt: skip
        return 2


def _main(name: str, rest: list[str], settings: Settings) -> int:
    if name != "all":
        return run_daemon(name, settings, rest)
    parser = argparse.ArgumentParser(prog="python -m streaming.runner all", description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=1.0, help="simulator playback speed (sim s per wall s)")
    parser.add_argument("--start", type=_time_ns, default=None, help="simulator sim start (default: now)")
    parser.add_argument("--end", type=_time_ns, default=None, help="simulator sim end (default: never)")
    parser.add_argument("--host", default="127.0.0.1", help="/health and /metrics address")
    parser.add_argument("--port-base", type=int, default=settings.stream_port_base,
                        help="ports base..base+4 (producer, aggregator, coordinator, dynamic, books); 0: any, -1: none "
                             "(default: CANDLEKEEP_STREAM_PORT_BASE)")  # fmt: skip
    parser.add_argument("--drain", type=float, default=10.0, help="embedded: seconds to drain the bus at stop")
    opts = parser.parse_args(rest)
    base = opts.port_base
    ports = {n: (base + i if base > 0 else base) for i, n in enumerate(DAEMONS)}
    return run_all(settings, speed=opts.speed, start_ns=opts.start, end_ns=opts.end, ports=ports, host=opts.host,
                   drain_s=opts.drain)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
