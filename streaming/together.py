"""The API and the four streaming daemons in ONE process, over one in-process bus: what `candlekeep up`
runs when no Kafka is configured (the embedded defaults).

    python -m streaming.together [--port-base 9101]

Why one process: the in-process bus cannot cross a process boundary, and on the embedded defaults it
is the only way to the coordinator. Sharing it, an on-demand read's `fetch` (and `track`, `untrack`)
reaches the coordinator exactly as over Kafka (api.main.request_fetch publishes on the shared bus's
`control` topic), and the range is fetched and answered within `wait`. The forming bar reaches
WebSocket clients through Redis (the embedded one `up` starts, candlekeep/embedded_redis.py), as
with a configured Redis.

The daemons are streaming.runner.Embedded's (same code, states, /health ports); the API is uvicorn
on CANDLEKEEP_API_HOST:CANDLEKEEP_API_PORT on a thread of its own. SIGINT / SIGTERM stop the API
first (no new requests), then the streaming in Embedded's order. Exit 0 when both stopped cleanly.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Sequence

import uvicorn

from api.main import create_app
from candlekeep.settings import Settings
from streaming.runner import DAEMONS, Embedded, _on_signals

log = logging.getLogger(__name__)


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    """uvicorn as `candlekeep.cli.api_command` runs it: forwarded headers only from configured proxies."""
    forwarded = ",".join(settings.api_forwarded_allow_ips)
    return uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_level="warning",
                          proxy_headers=bool(forwarded), forwarded_allow_ips=forwarded or None)  # fmt: skip


def run(settings: Settings, *, port_base: int, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    ports = {n: (port_base + i if port_base > 0 else port_base) for i, n in enumerate(DAEMONS)}
    system = Embedded(settings, ports=ports)
    server = uvicorn.Server(uvicorn_config(create_app(settings, bus=system.bus), settings))
    api = threading.Thread(target=server.run, name="api")
    restore = _on_signals(stop)

    def ready(_: Embedded) -> None:  # the daemons run: open the door
        api.start()
        threading.Thread(target=_stop_when_api_dies, args=(api, stop), name="api-watch", daemon=True).start()
        log.info("API on http://%s:%d, sharing the in-process bus", settings.api_host, settings.api_port)

    try:
        code = system.run(stop, ready=ready)
    finally:
        server.should_exit = True
        if api.is_alive():
            api.join(30)
        restore()
    return code


def _stop_when_api_dies(api: threading.Thread, stop: threading.Event) -> None:
    api.join()
    if not stop.is_set():
        log.error("the API stopped on its own (its port taken?); stopping everything")
        stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming.together", description=__doc__.splitlines()[0])
    parser.add_argument("--port-base", type=int, default=None, help="daemons' /health ports (default: "
                        "CANDLEKEEP_STREAM_PORT_BASE; 0: any free port, -1: none)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    return run(settings, port_base=settings.stream_port_base if args.port_base is None else args.port_base)


if __name__ == "__main__":
    raise SystemExit(main())
