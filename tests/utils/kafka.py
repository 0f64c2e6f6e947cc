"""A real single-node Apache Kafka broker (KRaft combined mode) as a JVM process, for tests and CI.

    broker = KafkaBroker(tmp_dir)        # nothing runs yet
    broker.start()                       # format (first time), launch, wait until metadata answers
    broker.bootstrap                     # "127.0.0.1:<port>"
    broker.restart(hard=True)            # SIGKILL + start: same data dir, same ports, data kept
    broker.pause(); broker.resume()      # SIGSTOP / SIGCONT: a frozen broker, for client timeouts
    broker.stop()                        # SIGTERM (controlled shutdown), SIGKILL after a grace period

`python -m tests.utils.kafka` runs one in the foreground and prints its bootstrap address;
`python -m tests.utils.kafka --check` starts one, says how long it took, and stops it (CI's early check).

The classpath is testinfra/kafka/target/libs, filled from Maven Central by
testinfra/kafka/fetch-jars.sh (`make kafka-jars`). Missing jars, a missing `java`, or a broker that
does not come up raise `KafkaBrokerError` naming the log file: never a skip.

Ready means: metadata answers, an idempotent producer got its producer id and delivered a record to
`candlekeep.broker-warmup`, and a consumer group committed an offset (coordinators loaded).

State, all under `workdir`: server.properties (from testinfra/kafka/server.properties.tmpl),
data/ (the KRaft log dirs, formatted once), kafka.log (the broker's stdout/stderr, appended across
restarts). Ports are picked once, free loopback ports, and kept for the broker's lifetime.
"""

from __future__ import annotations

import atexit
import base64
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tests.utils.net import free_port

KAFKA_DIR = Path(__file__).resolve().parents[2] / "testinfra" / "kafka"
LIBS_DIR = KAFKA_DIR / "target" / "libs"
# Written once per start so the group and transaction coordinators are loaded before `start` returns:
# otherwise the first consumer group join or idempotent producer of a test waits seconds for them.
WARMUP_TOPIC = "candlekeep.broker-warmup"
# C1 only (TieredStopAtLevel=1): starts ~30% faster; a test broker never runs long enough to need C2.
JVM_OPTS = ["-Xms128m", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", "-XX:+ExitOnOutOfMemoryError"]


class KafkaBrokerError(RuntimeError):
    """The broker cannot run here; the message says why and names the log file."""


def _cluster_id() -> str:
    # A Kafka Uuid string: 16 random bytes, URL-safe base64 without padding, never starting with "-".
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class KafkaBroker:
    def __init__(self, workdir: Path, *, libs: Path = LIBS_DIR, start_timeout: float = 90.0) -> None:
        self.workdir = Path(workdir).resolve()
        self.libs = libs
        self.start_timeout = start_timeout
        self.broker_port = free_port()
        self.controller_port = free_port()
        self.log_path = self.workdir / "kafka.log"
        self._data = self.workdir / "data"
        self._props = self.workdir / "server.properties"
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None  # of the last start, for reports

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker (a no-op when it runs) and return once it is ready (see above)."""
        if self.running:
            return
        began = time.monotonic()
        java = self._preflight()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self._data / "meta.properties").exists():
            self._write_properties()
            self._format(java)
        with self.log_path.open("ab") as log:
            log.write(f"\n===== candlekeep: starting kafka.Kafka at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [java, *JVM_OPTS, *self._log_opts(), "-cp", f"{self.libs}/*", "kafka.Kafka", str(self._props)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, which stops us in order
            )
        atexit.register(self._kill_at_exit, self._proc)
        self._wait_ready()
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM); SIGKILL if it takes longer than `timeout`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused broker would not act on SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: the broker dies with whatever it had not written; the data dir stays."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the broker freezes with its sockets open; clients time out, then retry."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: it goes on, handling the requests that queued up, stale ones included."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (or kill, `hard`) and start again on the same data dir and ports."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def close(self, *, remove: bool = False) -> None:
        self.stop()
        if remove:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- internals --------------------------------------------------------------------------------

    def _preflight(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise KafkaBrokerError("`java` is not on PATH: Kafka 4.1 needs Java 17+ (apt-get install openjdk-17-jre-headless)")
        jars = list(self.libs.glob("kafka_2.13-*.jar")) if self.libs.is_dir() else []
        if not jars:
            raise KafkaBrokerError(
                f"no Kafka jars in {self.libs}: run testinfra/kafka/fetch-jars.sh (or `make kafka-jars`) first")
        return java

    def _log_opts(self) -> list[str]:
        return [f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.workdir / 'logs'}"]

    def _write_properties(self) -> None:
        text = (KAFKA_DIR / "server.properties.tmpl").read_text()
        text = (text.replace("@BROKER_PORT@", str(self.broker_port))
                    .replace("@CONTROLLER_PORT@", str(self.controller_port))
                    .replace("@DATA_DIR@", str(self._data)))
        self._props.write_text(text)

    def _format(self, java: str) -> None:
        with self.log_path.open("ab") as log:
            log.write(b"===== candlekeep: kafka.tools.StorageTool format =====\n")
            log.flush()
            done = subprocess.run(
                [java, "-XX:TieredStopAtLevel=1", *self._log_opts(), "-cp", f"{self.libs}/*", "kafka.tools.StorageTool",
                 "format",
                 "-t", _cluster_id(), "-c", str(self._props)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120,
            )
        if done.returncode != 0:
            raise self._failure(f"formatting the Kafka data dir failed (exit {done.returncode})")

    def _wait_ready(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.connection.setup.timeout.ms": 1000,
                             "reconnect.backoff.max.ms": 200, "log_level": 0})
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise self._failure(f"the Kafka broker exited with code {code} while starting")
            try:
                meta = admin.list_topics(timeout=1)
                if meta.brokers:
                    self._warm_up(admin, deadline)
                    return
            except KafkaException:  # not up yet; the deadline decides
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise self._failure(f"the Kafka broker did not get ready on {self.bootstrap} "
                                    f"within {self.start_timeout:.0f} s")
            time.sleep(0.2)

    def _failure(self, what: str, lines: int = 25) -> KafkaBrokerError:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = []
        return KafkaBrokerError("\n".join([f"{what}; broker log: {self.log_path}", *(f"  | {t}" for t in tail)]))

    def _warm_up(self, admin: AdminClient, deadline: float) -> None:
        common = {"bootstrap.servers": self.bootstrap, "log_level": 0}
        try:
            admin.create_topics([NewTopic(WARMUP_TOPIC, 1, 1)])[WARMUP_TOPIC].result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        outcome: list[KafkaError | None] = []
        producer = Producer({**common, "enable.idempotence": True,
                             "message.timeout.ms": max(1000, int((deadline - time.monotonic()) * 1000))})
        producer.produce(WARMUP_TOPIC, b"warm-up", on_delivery=lambda err, _msg: outcome.append(err))
        producer.flush(max(1.0, deadline - time.monotonic()))
        if outcome != [None]:
            raise KafkaException(outcome[0] if outcome else KafkaError(KafkaError._TIMED_OUT))
        consumer = Consumer({**common, "group.id": WARMUP_TOPIC, "enable.auto.commit": False})
        try:
            consumer.commit(offsets=[TopicPartition(WARMUP_TOPIC, 0, 1)], asynchronous=False)
        finally:
            consumer.close()

    @staticmethod
    def _kill_at_exit(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()


def main() -> None:
    """`python -m tests.utils.kafka [--check] [workdir]`: run a broker until Ctrl-C / SIGTERM, printing
    its bootstrap address; with --check, start it, print how long that took, and stop (exit 1 if it
    cannot start: CI's early, loud check)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.utils.kafka")
    parser.add_argument("--check", action="store_true", help="start, report, stop")
    parser.add_argument("workdir", nargs="?", type=Path)
    args = parser.parse_args()

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    broker = KafkaBroker(args.workdir or Path(tempfile.mkdtemp(prefix="candlekeep-kafka-")))
    try:
        broker.start()
        print(f"kafka broker ready: bootstrap={broker.bootstrap} started_in={broker.startup_seconds:.1f}s "
              f"log={broker.log_path}", flush=True)
        while broker.running and not args.check:
            time.sleep(1)
        if not args.check:
            raise broker._failure("the Kafka broker exited")
    except KafkaBrokerError as exc:
        sys.exit(f"kafka broker: {exc}")
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
        if args.check and args.workdir is None:
            shutil.rmtree(broker.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
