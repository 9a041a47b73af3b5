"""A stand-in for a phone or chat service: a real HTTP server on a free loopback port that takes what Apprise's
`json://127.0.0.1:PORT/PATH` targets post ({"title", "message", "type"}). The test decides how it behaves: answering
(200), failing (500), or not listening at all (connections refused)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from devtools.localservices import find_free_port


@dataclass(frozen=True)
class Received:
    path: str  # the target, e.g. "phones"
    title: str
    message: str
    type: str

    @property
    def ref(self) -> str:
        """The message's `Ref:` line (a summary's first word after it)."""
        line = next((x for x in self.message.splitlines() if x.startswith("Ref: ")), "Ref: ?")
        return line.removeprefix("Ref: ").split(" ")[0]


class Receiver:
    def __init__(self) -> None:
        self.port = find_free_port()
        self.status = 200  # what it answers while listening
        self.received: list[Received] = []  # taken (answered 200)
        self.failed = 0  # posts answered with an error status
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    async def _post(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = json.loads(await request.text())
        if self.status != 200:
            self.failed += 1
            return web.Response(status=self.status)
        path = request.match_info["path"]
        self.received.append(Received(path, str(body["title"]), str(body["message"]), str(body["type"])))
        return web.Response(status=200)

    async def start(self) -> None:
        """Listen (again, on the same port)."""
        app = web.Application()
        app.router.add_post("/{path}", self._post)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening: connections are refused until start()."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def to(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]
