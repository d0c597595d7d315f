"""OpenAI-compatible API: /v1/chat/completions and /v1/models on the bot's own models, so other tools (Open
WebUI, editors, scripts) share them and wait in the same fair lines as the platforms' replies.

`schema` reads and checks a request (and cuts the text at stop strings), `server` holds the aiohttp application.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from adapters.openai_api.server import OpenAIServer, check_access, create_app

if TYPE_CHECKING:
    from bot.config import Secrets, Settings
    from bot.engine.embedded import Engine
    from bot.metrics import Metrics
    from bot.models import ModelRegistry

__all__ = ["OpenAIServer", "create_app", "run_openai_api"]

log = logging.getLogger(__name__)


async def run_openai_api(
    engine: Engine, metrics: Metrics, settings: Settings, secrets: Secrets, models: ModelRegistry | None = None
) -> None:
    """Serve the API on ``[api] host:port`` until cancelled, on the bot's ``engine`` (its fair queue) and the
    other configured ``models``, counted in its ``metrics``; the composition root (`bot.app`) hands them over.

    Raises `bot.errors.ConfigError` when the address needs a token that is not set, or the port is taken.
    """
    check_access(settings.api, secrets)
    app = create_app(engine, settings.sampling, secrets, host=settings.api.host, metrics=metrics, models=models)
    server = OpenAIServer(app, settings.api.host, settings.api.port)
    await server.serve(
        lambda url: log.info(
            "OpenAI-compatible API on %sv1%s", url, " (Bearer token required)" if secrets.api_token else ""
        )
    )
