"""The bot an interaction came to, typed: discord.py types ``Interaction.client`` as any Client."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord

if TYPE_CHECKING:
    from adapters.discord.bot import DiscordBot  # bot.py imports the modules that import this one

__all__ = ["bot_of"]


def bot_of(interaction: discord.Interaction) -> DiscordBot:
    """``interaction.client``: every interaction this adapter handles comes to its one `DiscordBot`."""
    return cast("DiscordBot", interaction.client)
