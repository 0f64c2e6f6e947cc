"""API keys, per-key rate limits and CORS: one ASGI middleware, installed by `install_security(app, settings)`.

    app = FastAPI(...)
    install_security(app, settings)     # raises InsecureConfiguration when it must not start

Policy (decided here, tested in tests/api/test_security.py):
- Keys come from CANDLEKEEP_API_KEYS and are sent as `X-API-Key: <key>` or `Authorization: Bearer <key>`
  (WebSocket and TradingView UDF clients, which cannot always set headers, may also use
  `?api_key=<key>`). The SHA-256 of a presented key is compared with that of every configured key by
  `hmac.compare_digest`, with no early exit: equal lengths, so not even a key's length shows in the
  timing, and no refusal names anything about the key.
- Who needs a key follows the *peer address* of each connection (the ASGI scope's client), never the
  configured bind: with keys configured, every client needs one, loopback clients too (a reverse proxy
  on the same host makes every request look local); with no key configured, loopback peers are
  answered and any other peer gets 401 naming CANDLEKEEP_API_KEYS, whatever address the server was
  started on (`uvicorn --host 0.0.0.0` included). Setting CANDLEKEEP_API_HOST beyond loopback with no
  key configured is still refused at start (InsecureConfiguration).
- `scope["state"]["trusted"]` tells the routes whether the caller is loopback or holds a valid key
  (`/health` gives its full detail only then).
- Open without a key: `/health` (anonymous callers beyond loopback get only `status`), `/docs`, `/redoc`, `/openapi.json`
  (the schema, no data). `/metrics` is open to loopback clients only (the Prometheus scraper runs
  beside the API); others need a key. A wrong key is refused even on an open path.
- Missing or invalid key: 401 with `WWW-Authenticate: Bearer realm="candlekeep"` (WebSocket: closed
  with 1008 before accept, which the server turns into HTTP 403).
- Rate limit: a token bucket per key (per client IP without a key), `api_rate_limit_per_minute`
  refill, `api_rate_burst` capacity, applied to every HTTP request and WebSocket handshake, checked
  before the key (so guessing keys is limited per IP). Over the limit: 429, JSON detail, integer
  `Retry-After` >= 1. With CANDLEKEEP_REDIS_URL the bucket lives in Redis (`ratelimit:{id}`, one Lua
  script, atomic, Redis' clock), so every API process shares it; without Redis, or while Redis is
  unreachable (logged once per outage, retried every `REDIS_RETRY_S`), an in-process bucket is used.
  Identities in Redis are a hash of the key, never the key.
- CORS: CANDLEKEEP_API_CORS_ORIGINS through Starlette's CORSMiddleware, outside the key check so that
  preflights pass and refusals stay readable by the page; empty: no CORS headers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs

import anyio.to_thread
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from candlekeep.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_ONLY_PATHS = frozenset({"/metrics"})
# The dashboard's files (api/web.py): no data in them, and the page must load to ask for a key.
STATIC_OPEN_PATHS = frozenset({"/"})
STATIC_OPEN_PREFIXES = ("/assets/", "/static/docs/")
REDIS_RETRY_S = 5.0
REDIS_TIMEOUT_S = 0.25
REALM = 'Bearer realm="candlekeep"'


class InsecureConfiguration(RuntimeError):
    """The API would listen beyond loopback with no API key configured."""


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- keys ------------------------------------------------------------------------------------------


class KeyChecker:
    """Constant-time membership of a presented key in the configured set (SHA-256 digests of UTF-8)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def matches(self, presented: bytes) -> bool:
        digest = hashlib.sha256(presented).digest()  # 32 bytes whatever was sent: the length never shows
        found = False
        for key in self._digests:  # every key compared, no early exit
            found |= hmac.compare_digest(digest, key)
        return found


QUERY_KEY_PREFIXES = ("/udf/",)  # HTTP paths whose clients (TradingView's datafeed) may send ?api_key=


def presented_key(scope: Scope) -> bytes | None:
    """The key a request carries: X-API-Key, else Authorization: Bearer, else (WebSocket and UDF) ?api_key=."""
    bearer = None
    for name, value in scope.get("headers", ()):
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip()
    if bearer is not None:
        return bearer
    if scope["type"] == "websocket" or scope.get("path", "").startswith(QUERY_KEY_PREFIXES):
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
        if values:
            return values[0].encode("latin-1")
    return None


# --- rate limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0


class LocalBuckets:
    """In-process token buckets (thread-safe), least recently used evicted past `max_ids`."""

    def __init__(self, *, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_ids: int = 100_000) -> None:  # fmt: skip
        self.rate_per_s, self.burst, self._clock, self._max_ids = rate_per_s, burst, clock, max_ids
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # id -> (tokens, at)

    def take(self, ident: str) -> Decision:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.pop(ident, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate_per_s)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[ident] = (tokens, now)
            while len(self._buckets) > self._max_ids:
                self._buckets.popitem(last=False)
        return Decision(True) if allowed else Decision(False, (1.0 - tokens) / self.rate_per_s)


# KEYS[1] = ratelimit:{id}; ARGV = rate per second, burst. Returns {allowed 0|1, seconds to wait}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(wait)}
"""


class RateLimiter:
    """Redis token buckets shared by every API process, falling back to in-process ones."""

    def __init__(self, *, per_minute: int, burst: int, redis_url: str | None) -> None:
        self.per_minute, self.burst = per_minute, burst
        self.rate_per_s = per_minute / 60.0
        self.local = LocalBuckets(rate_per_s=self.rate_per_s, burst=burst)
        self._redis = None
        self._script = None
        self._redis_down_until = 0.0
        self._redis_down = False
        self._lock = threading.Lock()
        if redis_url is not None:
            import redis

            self._redis = redis.Redis.from_url(
                redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            self._script = self._redis.register_script(TOKEN_BUCKET_LUA)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def backend(self) -> str:
        """"redis", "local" (no Redis configured) or "local (redis down)"."""
        if self._redis is None:
            return "local"
        return "local (redis down)" if self._redis_down else "redis"

    def take(self, ident: str) -> Decision:
        if self._script is not None and time.monotonic() >= self._redis_down_until:
            import redis

            try:
                allowed, wait = self._script(keys=[f"ratelimit:{ident}"], args=[repr(self.rate_per_s), self.burst])
            except redis.RedisError as exc:
                self._mark_down(exc)
            else:
                self._mark_up()
                return Decision(True) if int(allowed) else Decision(False, float(wait))
        return self.local.take(ident)

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            self._redis_down_until = time.monotonic() + REDIS_RETRY_S
            if not self._redis_down:
                self._redis_down = True
                log.warning("rate limiter: Redis unreachable (%s); using in-process buckets, retrying every %.0f s",
                            exc, REDIS_RETRY_S)  # fmt: skip

    def _mark_up(self) -> None:
        if self._redis_down:
            with self._lock:
                if self._redis_down:
                    self._redis_down = False
                    log.warning("rate limiter: Redis reachable again; shared buckets back in use")

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def identity(scope: Scope, key: bytes | None) -> str:
    """`key:<hash>` for a valid key (never the key itself), else `ip:<client host>`."""
    if key is not None:
        return "key:" + hashlib.sha256(key).hexdigest()[:24]
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")


# --- the middleware --------------------------------------------------------------------------------


class SecurityMiddleware:
    """Pure ASGI (HTTP and WebSocket alike): rate limit, then key check, then the app."""

    def __init__(self, app: ASGIApp, *, keys: KeyChecker, limiter: RateLimiter | None) -> None:
        self.app, self.keys, self.limiter = app, keys, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope)
        valid = presented is not None and self.keys.matches(presented)

        if self.limiter is not None:
            ident = identity(scope, presented if valid else None)
            if self.limiter.shared:  # a network round trip: off the event loop
                decision = await anyio.to_thread.run_sync(self.limiter.take, ident)
            else:
                decision = self.limiter.take(ident)
            if not decision.allowed:
                retry = max(1, math.ceil(decision.retry_after_s))
                detail = (f"rate limit exceeded: {self.limiter.per_minute} requests per minute "
                          f"(burst {self.limiter.burst}) per API key, or per client address without one; "
                          f"retry after {retry} s")  # fmt: skip
                await _refuse(scope, send, 429, detail, {"retry-after": str(retry)})
                return

        if presented is not None and not valid:
            await _refuse(scope, send, 401, "invalid API key", {"www-authenticate": REALM})
            return
        client = scope.get("client")
        loopback = is_loopback(client[0] if client else None)
        if not valid and not self._open(scope, loopback):
            if self.keys:
                detail = ("an API key is required: send it as `X-API-Key: <key>` or `Authorization: Bearer <key>`"
                          " (`?api_key=` for WebSocket and UDF clients)")  # fmt: skip
            else:
                detail = ("this API answers loopback clients only: no API key is configured "
                          "(set CANDLEKEEP_API_KEYS to serve other addresses)")  # fmt: skip
            await _refuse(scope, send, 401, detail, {"www-authenticate": REALM})
            return
        state = scope.setdefault("state", {})
        state["trusted"] = valid or (loopback and not self.keys)
        state["identity"] = identity(scope, presented if valid else None)  # what caps count by (api.limits)
        await self.app(scope, receive, send)

    def _open(self, scope: Scope, loopback: bool) -> bool:
        """Whether a caller without a valid key may go on: open paths, and loopback peers without keys."""
        path = scope.get("path", "")
        if path in OPEN_PATHS:
            return True
        if scope["type"] == "http" and (path in STATIC_OPEN_PATHS or path.startswith(STATIC_OPEN_PREFIXES)):
            return True  # the dashboard's files hold no data
        if path in LOOPBACK_ONLY_PATHS or not self.keys:
            return loopback
        return False


def close_reason(text: str) -> str:
    """`text` cut to fit a WebSocket close frame (a reason is at most 123 bytes of UTF-8), never mid-character."""
    return text.encode()[:120].decode(errors="ignore")


async def _refuse(scope: Scope, send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    if scope["type"] == "websocket":
        # Closing before accept: the server answers the handshake with HTTP 403.
        await send({"type": "websocket.close", "code": 1008, "reason": close_reason(detail)})
        return
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# --- logs ----------------------------------------------------------------------------------------

_QUERY_KEY_RE = re.compile(r"(api_key=)[^&\s\"']*")
SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error")  # the access lines, and the WebSocket "accepted" lines


class RedactKeys(logging.Filter):
    """Replaces the value of every `api_key=` in a log record's message and arguments with `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "api_key=" in record.msg:
            record.msg = _QUERY_KEY_RE.sub(r"\1***", record.msg)
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "api_key=" in a for a in record.args):
            record.args = tuple(_QUERY_KEY_RE.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def install_log_redaction() -> None:
    """Keep `?api_key=` values out of the server's logs (idempotent)."""
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())


# --- installation ----------------------------------------------------------------------------------


def install_security(app: FastAPI, settings: Settings) -> RateLimiter | None:
    """Add the key check, the rate limiter and CORS to `app`; refuse an exposed API with no key.

    Order, outermost first: CORS, then security, then the routes (so preflights and CORS headers on
    401/429 work). The limiter is kept on `app.state.rate_limiter` and closed when the app stops.
    Installing twice is a no-op.
    """
    if getattr(app.state, "security_installed", False):  # installing twice is a no-op
        return app.state.rate_limiter
    install_log_redaction()
    keys = KeyChecker(settings.api_keys)
    exposed = settings.api_host not in LOOPBACK_HOSTS
    if exposed and not keys:
        raise InsecureConfiguration(
            f"CANDLEKEEP_API_HOST={settings.api_host} listens beyond loopback but CANDLEKEEP_API_KEYS is empty: "
            "set at least one API key (comma-separated), or listen on 127.0.0.1"
        )
    limiter = None
    if settings.api_rate_limit_per_minute > 0:
        limiter = RateLimiter(per_minute=settings.api_rate_limit_per_minute, burst=settings.api_rate_burst,
                              redis_url=settings.redis_url)  # fmt: skip
        _close_on_shutdown(app, limiter)
    app.state.rate_limiter = limiter
    app.state.security_installed = True
    app.add_middleware(SecurityMiddleware, keys=keys, limiter=limiter)
    if settings.api_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api_cors_origins,
            allow_methods=["GET", "OPTIONS"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    _document_security(app, keys=bool(keys), limited=limiter is not None)
    return limiter


def _close_on_shutdown(app: FastAPI, limiter: RateLimiter) -> None:
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: object) -> AsyncIterator[object]:
        try:
            async with inner(app_) as state:
                yield state
        finally:
            limiter.close()

    app.router.lifespan_context = lifespan


def _document_security(app: FastAPI, *, keys: bool, limited: bool) -> None:
    """The OpenAPI schema says what the middleware does: every operation may answer 401 (a wrong key,
    or no key where one is needed) and, with rate limits on, 429; with keys configured, the two ways
    of sending one are declared (so /docs can "Authorize") on the operations that need them, and
    the open paths say `security: []`."""
    build = app.openapi
    error = {"content": {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}},
                                                          "required": ["detail"]}}}}  # fmt: skip

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            if keys:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["ApiKeyHeader"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
                schemes["BearerKey"] = {"type": "http", "scheme": "bearer", "description": "the API key as a bearer token"}
                schemes["ApiKeyQuery"] = {"type": "apiKey", "in": "query", "name": "api_key",
                                          "description": "UDF and WebSocket clients only"}  # fmt: skip
            for path, item in schema.get("paths", {}).items():
                for method, operation in item.items():
                    if method not in ("get", "put", "post", "delete", "patch", "head", "options"):
                        continue
                    responses = operation.setdefault("responses", {})
                    responses.setdefault("401", {"description": "a wrong API key, or none where one is needed "
                                                                "(`WWW-Authenticate: Bearer`)", **error})  # fmt: skip
                    if limited:
                        responses.setdefault("429", {"description": "rate limit exceeded (`Retry-After`)", **error})
                    if keys:
                        open_path = path in OPEN_PATHS
                        query = [{"ApiKeyQuery": []}] if path.startswith(QUERY_KEY_PREFIXES) else []
                        operation["security"] = [] if open_path else [{"ApiKeyHeader": []}, {"BearerKey": []}, *query]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
