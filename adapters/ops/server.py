"""The operations endpoints: /healthz (alive), /readyz (able to answer) and Prometheus /metrics."""

from __future__ import annotations

import asyncio
import errno
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.conversations import ConversationManager
from bot.errors import ConfigError

__all__ = ["OpsServer", "create_app", "readiness"]

log = logging.getLogger(__name__)

DATABASE_CHECK_SECONDS = 2.0  # a database slower than this to read one row cannot answer anyone either
MANAGER = web.AppKey("manager", ConversationManager)


async def readiness(manager: ConversationManager) -> dict[str, str]:
    """Each check and its result ("ok" or "connected" when it passes): the engine, the database, and every
    configured platform."""
    checks: dict[str, str] = {}
    try:
        manager.engine.status()
        checks["engine"] = "ok"
    except Exception as exc:  # the remote engine (issue 12) may fail here; the embedded one is loaded or absent
        checks["engine"] = f"failing: {exc}"
    try:
        await asyncio.wait_for(manager.store.system_prompt("ops/readyz"), DATABASE_CHECK_SECONDS)
        checks["database"] = "ok"
    except TimeoutError:
        checks["database"] = f"no answer within {DATABASE_CHECK_SECONDS:g} s"
    except Exception as exc:
        checks["database"] = f"failing: {exc}"
    for name, connected in manager.platforms.status().items():
        checks[name] = "connected" if connected else "not connected"
    return checks


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    checks = await readiness(request.app[MANAGER])
    ready = all(result in ("ok", "connected") for result in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[MANAGER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(manager: ConversationManager) -> web.Application:
    app = web.Application()
    app[MANAGER] = manager
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


class OpsServer:
    """Listens for `create_app`'s application on ``host:port``; ``port`` 0 picks a free one (tests)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._runner = web.AppRunner(app, access_log=None)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> str:
        """Start listening and return the base URL. A taken port is a `ConfigError` naming the key."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {self.port} on {self.host} is already in use: stop the program using it "
                                  "or choose another with [ops] port (LLAMARELAY_OPS__PORT)") from None
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ([ops] host / port): "
                              f"{exc.strerror or exc}") from None
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        return self.url

    async def close(self) -> None:
        await self._runner.cleanup()
