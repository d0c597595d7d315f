"""OpenAI-compatible API: /v1/chat/completions and /v1/models on the bot's own engine, so other tools (Open
WebUI, editors, scripts) share its one model and wait in the same fair line as the platforms' replies.

`schema` reads and checks a request (and cuts the text at stop strings), `server` holds the aiohttp application.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from adapters.openai_api.server import OpenAIServer, check_access, create_app

if TYPE_CHECKING:
    from bot.config import Secrets, Settings
    from bot.conversations import ConversationManager

__all__ = ["OpenAIServer", "create_app", "run_openai_api"]

log = logging.getLogger(__name__)


async def run_openai_api(manager: ConversationManager, settings: Settings, secrets: Secrets) -> None:
    """Serve the API on ``[api] host:port`` until cancelled, on the manager's engine, counted in its metrics.

    Raises `bot.errors.ConfigError` when the address needs a token that is not set, or the port is taken.
    """
    check_access(settings.api, secrets)
    app = create_app(manager.engine, settings.sampling, secrets, host=settings.api.host, metrics=manager.metrics)
    server = OpenAIServer(app, settings.api.host, settings.api.port)
    url = await server.start()
    log.info("OpenAI-compatible API on %sv1%s", url, " (Bearer token required)" if secrets.api_token else "")
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
