"""The operations endpoints: /healthz (alive), /readyz (able to answer) and Prometheus /metrics."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from adapters.http import FOREIGN_HOST, HttpError, Listener, host_guard, json_errors
from bot.conversations import ConversationManager
from bot.health import PASSING, readiness

if TYPE_CHECKING:
    from bot.tools import ToolSupervisor

__all__ = ["OpsServer", "create_app", "readiness"]

log = logging.getLogger(__name__)

MANAGER = web.AppKey("manager", ConversationManager)
TOOLS: web.AppKey[ToolSupervisor] = web.AppKey("tools")  # only with tool servers: the MCP SDK loads then


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    checks = await readiness(request.app[MANAGER])
    ready = all(result in PASSING for result in checks.values())
    body: dict[str, object] = {"ready": ready, "checks": checks}
    if TOOLS in request.app:  # details only: the bot answers without its tools, so a dead server is not "unready"
        body["tools"] = {name: health.describe() for name, health in request.app[TOOLS].health().items()}
    return web.json_response(body, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[MANAGER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(
    manager: ConversationManager, host: str = "127.0.0.1", tools: ToolSupervisor | None = None
) -> web.Application:
    """The ops application for a listener on ``host``; /readyz lists ``tools``' servers when given."""
    app = web.Application(
        middlewares=[json_errors(name="ops"), host_guard(host, lambda: HttpError(403, "foreign_host", FOREIGN_HOST))]
    )
    app[MANAGER] = manager
    if tools is not None:
        app[TOOLS] = tools
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


class OpsServer(Listener):
    """The ops endpoints' listener."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        super().__init__(app, host, port, section="ops")
