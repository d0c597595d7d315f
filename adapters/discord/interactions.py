"""The bot an interaction came to, typed (discord.py types ``Interaction.client`` as any Client), and a user's
roles as the access policy reads them."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord

if TYPE_CHECKING:
    from adapters.discord.bot import DiscordBot  # bot.py imports the modules that import this one

__all__ = ["bot_of", "role_ids"]


def bot_of(interaction: discord.Interaction) -> DiscordBot:
    """``interaction.client``: every interaction this adapter handles comes to its one `DiscordBot`."""
    return cast("DiscordBot", interaction.client)


def role_ids(user: discord.abc.User) -> frozenset[str]:
    """The ids of ``user``'s roles in the guild the event came from (a `discord.Member`); none in a DM."""
    return frozenset(str(role.id) for role in getattr(user, "roles", []))
