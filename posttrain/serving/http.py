"""The HTTP transport of ``posttrain serve`` and ``posttrain vllm-serve``: an ASGI app (Starlette) on uvicorn, in a
background thread, with what a server reachable by many clients needs and neither server should write twice.

- **Holding under load**: uvicorn's listen backlog (2048) and event loop; handlers await the generation worker.
- **Time-outs**: a connection must deliver a whole request (headers and body) within ``request_timeout_s`` of
  opening or of its previous response (uvicorn alone only times out idle keep-alive connections, and a client
  sending a byte at a time never becomes idle); idle keep-alive connections close after ``keep_alive_s``.
- **Bodies**: ``Content-Length`` or chunked; more than ``max_body_bytes`` is a 413; a body that is not a JSON object a
  400; NaN and infinities (which Python's json module accepts) a 400 naming where they are.
- **API key**: with ``api_key`` set, every ``/v1`` route wants ``Authorization: Bearer <key>`` (a 401 otherwise), as
  vLLM's server does; ``/health``, ``/metrics`` and ``/version`` stay open.
- **Metrics**: requests by route and status, and their latency, in a Prometheus registry that each server extends
  with its own series and serves at ``/metrics``.
- **Clients that go away**: :func:`wait_or_disconnect` stops waiting when the client disconnects, and the app logs
  one line, never a traceback.

Errors are OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``). This module knows nothing of
models or generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable
from typing import Any

import h11
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


# -- reading requests -----------------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's body as a JSON object: at most ``limit`` bytes (413), valid JSON (400), an object (400), no NaN
    or infinity anywhere (400 naming the field)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body has {declared} bytes; the limit is {limit}", status=413,
                           code="payload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # Content-Length or chunked alike
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is over the limit of {limit} bytes", status=413,
                               code="payload_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    where = _non_finite(body, "")
    if where is not None:
        raise RequestError(f"'{where}' must be a finite number (NaN and infinities are refused)", where)
    return body


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity in a parsed JSON value, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "body")
    if isinstance(value, dict):
        children = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for where, item in children:
        found = _non_finite(item, where)
        if found is not None:
            return found
    return None


async def wait_or_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; raise :class:`ClientGone` (``work`` cancelled) if the client disconnects first. Call it after
    the body is read: the next ASGI message is then the disconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- the app around the routes ------------------------------------------------------------------------------------
class ServingApp:
    """An ASGI app: ``routes`` (Starlette routes) behind the API-key check, the metrics and the error handling of
    the module docstring, plus ``/metrics``."""

    def __init__(self, routes: list, *, api_key: str | None = None, metrics_prefix: str = "posttrain",
                 registry: CollectorRegistry | None = None):
        from starlette.routing import Route

        self.api_key = api_key
        self.registry = registry or CollectorRegistry()
        # the Prometheus series every server has: requests by route and status, and their latency
        self.requests = Counter(f"{metrics_prefix}_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram(f"{metrics_prefix}_http_request_duration_seconds",
                                 "time to the end of the answer, by route", ["route"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.app = Starlette(routes=[*routes, Route("/metrics", self._metrics, methods=["GET"])],
                             exception_handlers={RequestError: _request_error, 404: _not_found, 405: _not_allowed,
                                                 Exception: _internal_error})

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key is not None and path.startswith("/v1") and not self._authorised(scope):
            await RequestError("a valid API key is required: send 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key").response()(scope, receive, send)
            self.requests.labels(_route_label(path), "401").inc()
            return
        start, status = time.perf_counter(), [None]

        async def record_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except (ClientGone, ClientDisconnect, OSError) as exc:  # the client left: one line, no traceback
            logger.info("client %s went away during %s%s", _client(scope), path, f": {exc}" if str(exc) else "")
            status[0] = status[0] or "499"
        except Exception as exc:
            logger.exception("request to %s failed", path)
            if status[0] is None:
                status[0] = "500"
                await RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500).response()(
                    scope, receive, send)
        finally:
            route = _route_label(path)
            self.requests.labels(route, status[0] or "500").inc()
            self.latency.labels(route).observe(time.perf_counter() - start)

    def _authorised(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


def _route_label(path: str) -> str:
    """The route for metrics: a model id in the path is not a label value of its own."""
    return "/v1/models/{id}" if path.startswith("/v1/models/") else path


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


async def _request_error(request: Request, exc: RequestError) -> Response:
    return exc.response()


async def _not_found(request: Request, exc: Exception) -> Response:
    return RequestError(f"no route {request.url.path}", status=404, code="not_found").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return RequestError(f"{request.url.path} does not take {request.method}", status=405,
                        code="method_not_allowed").response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    """The answer to an unexpected exception (Starlette then re-raises it: ``ServingApp`` logs it once)."""
    return RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500).response()


# -- uvicorn in a thread -----------------------------------------------------------------------------------------
class _TimedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on receiving each request whole (see the module docstring)."""

    request_timeout_s: float = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.info("closing a connection from %s: no whole request within %.0f s",
                        f"{self.client[0]}:{self.client[1]}" if self.client else "?", self.request_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()  # the request is in: the answer may take as long as generation does

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is not h11.DONE:
            self._arm()  # the next request on this connection has the same deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class HttpServer:
    """``app`` served by uvicorn in a background thread: ``start()`` returns once it listens, ``close()`` stops it."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, request_timeout_s: float = 30.0,
                 keep_alive_s: float = 5.0, backlog: int = 2048, name: str = "posttrain-http"):
        if request_timeout_s <= 0 or keep_alive_s <= 0:
            raise ValueError(f"request_timeout_s and keep_alive_s must be > 0, got {request_timeout_s}, "
                             f"{keep_alive_s}")
        protocol = type("TimedProtocol", (_TimedProtocol,), {"request_timeout_s": request_timeout_s})
        config = uvicorn.Config(app, host=host, port=port, http=protocol, backlog=backlog, lifespan="off",
                                timeout_keep_alive=keep_alive_s, log_level="warning", access_log=False,
                                ws="none")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # the thread is not the main thread; the CLI handles them
        self.name = name
        self._thread: threading.Thread | None = None
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HttpServer:
        self._thread = threading.Thread(target=self.server.run, name=self.name, daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server could not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(30)
            self._thread = None
