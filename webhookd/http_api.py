"""The small HTTP port for monitoring: /healthz, /readyz and /metrics. Nothing else answers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from webhookd.metrics import Metrics

Readiness = Callable[[], Awaitable[list[str]]]  # the reasons not to be ready; [] when ready


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
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
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
