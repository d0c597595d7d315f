"""Web adapter: a browser chat page served by the bot's own process, streamed over Server-Sent Events.

`server` holds the aiohttp application and the checks in front of it, `api` the JSON API under /api/,
`events` the reply target that turns the core's edits into events, `uploads` the reading of a message sent
with files, `static/` the page (no build step).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from adapters.web.server import WebServer, check_access, create_app

if TYPE_CHECKING:
    from bot.config import Secrets, Settings
    from bot.conversations import ConversationManager

__all__ = ["WebServer", "create_app", "run_web"]

log = logging.getLogger(__name__)


async def run_web(manager: ConversationManager, settings: Settings, secrets: Secrets) -> None:
    """Serve the chat page on ``[web] host:port`` until cancelled; replies in flight are stored on the way out.

    Raises `bot.errors.ConfigError` when the address needs a token that is not set, or the port is taken.
    """
    check_access(settings.web, secrets)
    server = WebServer(create_app(manager, settings, secrets), settings.web.host, settings.web.port)

    def started(url: str) -> None:
        log.info("web chat on %s%s", url, " (access token required)" if secrets.web_token else "")
        manager.platforms.connected("web")

    try:
        await server.serve(started)
    finally:
        manager.platforms.disconnected("web")
