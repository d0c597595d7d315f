"""Operations adapter: health, readiness and Prometheus metrics over HTTP, for Docker, Kubernetes and
Prometheus. `server` holds the aiohttp application; the figures themselves live in `bot.metrics`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from adapters.ops.server import OpsServer, create_app, readiness

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.conversations import ConversationManager
    from bot.tools import ToolSupervisor

__all__ = ["OpsServer", "create_app", "readiness", "run_ops"]

log = logging.getLogger(__name__)


async def run_ops(manager: ConversationManager, settings: Settings, tools: ToolSupervisor | None = None) -> None:
    """Serve /healthz, /readyz and /metrics on ``[ops] host:port`` until cancelled."""
    server = OpsServer(create_app(manager, settings.ops.host, tools), settings.ops.host, settings.ops.port)
    await server.serve(lambda url: log.info("health and metrics on %shealthz, %sreadyz, %smetrics", url, url, url))
