"""The small HTTP port for monitoring: /healthz, /readyz and /metrics. Nothing else answers."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from webhookd.log import log_event
from webhookd.metrics import Metrics

Readiness = Callable[[], Awaitable[list[str]]]  # the reasons not to be ready; [] when ready
logger = logging.getLogger("webhookd.http")
_BAD_REQUEST_DETAIL_CHARS = 200


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server log as webhookd log events (one structured line each). A malformed
    request is the client's fault: a debug line, not an error with a traceback per request."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if exc_info is True:
            exc = sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            detail = str(exc.message)[:_BAD_REQUEST_DETAIL_CHARS]
            log_event(self.logger, logging.DEBUG, "http_bad_request", status=exc.code, error=detail)
            return
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = str(msg)
        event = "http_server_error" if level >= logging.WARNING else "http_server_debug"
        log_event(self.logger, level, event, detail=text, exc_info=exc)


def make_app(metrics: Metrics, readiness: Readiness) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reasons = await readiness()
        if reasons:
            body = {"status": "not ready", "reasons": reasons}
            return web.Response(status=503, text=json.dumps(body), content_type="application/json")
        return web.json_response({"status": "ready"})

    async def metrics_handler(request: web.Request) -> web.Response:
        metrics.ready.set(0 if await readiness() else 1)
        response = web.Response(body=metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application(client_max_size=1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app


class HttpServer:
    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, logger=_ServerLog(logger)
        )
        self._host = host
        self._port = port
        self.bound_port: int | None = None

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        # The bound address tells the real port when port 0 was asked for.
        self.bound_port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        await self._runner.cleanup()
