"""Discord adapter: mentions, threads, DMs, files, slash and message commands, answered by streaming edits
with buttons (Stop, Regenerate, Continue) under each reply.

`run_discord` is what `llamarelay run` starts when ``DISCORD_TOKEN`` is set; `DiscordBot` is the client.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
import discord.gateway
import discord.http
import yarl

from adapters.discord.bot import DiscordBot, ShardedDiscordBot, make_client
from bot.errors import ConfigError

if TYPE_CHECKING:
    from bot.config import DiscordSettings, Secrets, Settings
    from bot.conversations import ConversationManager

__all__ = ["DiscordBot", "ShardedDiscordBot", "apply_endpoints", "make_client", "run_discord"]

log = logging.getLogger(__name__)


def apply_endpoints(settings: DiscordSettings) -> None:
    """Point discord.py at another REST base / gateway (an API proxy) when configured.

    These are discord.py's own class-level defaults, so they apply to the whole process.
    """
    if settings.api_base_url:
        discord.http.Route.BASE = settings.api_base_url.rstrip("/")
        log.info("Discord REST base: %s", discord.http.Route.BASE)
    if settings.gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)
        log.info("Discord gateway: %s", settings.gateway_url)


async def run_discord(
    manager: ConversationManager, settings: Settings, secrets: Secrets, **client_options: Any
) -> None:
    """Connect to Discord and answer until cancelled; the client is always closed on the way out.

    ``client_options`` go to `discord.Client` (tests pass a short ``guild_ready_timeout``).
    """
    if not secrets.discord_token:
        raise ConfigError(
            "DISCORD_TOKEN is not set: create a bot in the Discord developer portal and "
            "export its token as DISCORD_TOKEN"
        )
    apply_endpoints(settings.discord)
    bot = make_client(manager, settings.discord, **client_options)
    try:
        await bot.start(secrets.discord_token)
    except discord.LoginFailure:
        raise ConfigError("Discord refused DISCORD_TOKEN (401): check the bot token in the developer portal") from None
    except discord.PrivilegedIntentsRequired:
        raise ConfigError(
            "Discord refused the connection: turn on 'Message Content Intent' on the Bot page of the developer portal"
        ) from None
    finally:
        await bot.close()
