"""Loopback helpers for tests that start real servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# TestClient's default peer is the host name "testclient", which is no loopback address: the API
# answers it only with a key. Tests of an API without keys connect as this loopback peer.
LOOPBACK_PEER = ("127.0.0.1", 50000)
