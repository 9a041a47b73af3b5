"""HTTP health endpoint, for docker compose's healthcheck and for monitoring: GET /health.

200 while the gateway runs, with its counters and the state of each link (a broker or database outage makes the
gateway "degraded", not unhealthy: it is doing its job by keeping readings in the outbox, and a restart would not
help). 503 while it is starting or stopping.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.host = host
        self.port = port
        self.status = status
        self.ready = False
        self._runner: web.AppRunner | None = None

    async def _health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"state": "starting or stopping"}, status=503)
        return web.json_response(await self.status())

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("health endpoint on http://%s:%d/health", self.host, self.port)

    async def stop(self) -> None:
        self.ready = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
