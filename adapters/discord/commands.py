"""Slash commands: /ask, /reset, /system, /stop, /status, on a `CommandTree` that checks access first.

Refusals and errors are ephemeral (only the caller sees them); answers that change a shared
conversation (/ask, /reset, setting /system, /stop) are visible to the channel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from adapters.discord.targets import NO_MENTIONS, InteractionTarget
from bot.types import Incoming, SessionKey

if TYPE_CHECKING:
    from adapters.discord.bot import DiscordBot

__all__ = ["LlamarelayTree"]

log = logging.getLogger(__name__)

SHOWN_PROMPT_MAX_CHARS = 1800  # room for the heading within Discord's 2,000


async def _say(interaction: discord.Interaction, text: str, *, ephemeral: bool) -> None:
    """Answer an interaction whether or not it has been answered (or deferred) already."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)


def _bot(interaction: discord.Interaction) -> DiscordBot:
    return interaction.client  # type: ignore[return-value]


def _session(interaction: discord.Interaction) -> SessionKey:
    return _bot(interaction).session_for(interaction.channel, interaction.user, interaction.guild_id)


class LlamarelayTree(app_commands.CommandTree):
    """The bot's command tree: every command passes the access lists before it runs."""

    def __init__(self, client: DiscordBot) -> None:
        super().__init__(client)
        for command in (ask, reset, system, stop, status):
            self.add_command(command)

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        why = await _bot(interaction).refusal(interaction.user, interaction.channel, interaction.guild_id)
        if why is None:
            return True
        await _say(interaction, f"🚫 {why}", ephemeral=True)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        if isinstance(error, app_commands.CheckFailure):
            return  # interaction_check has told the user already
        log.error("slash command /%s failed", interaction.command.name if interaction.command else "?",
                  exc_info=error)
        try:
            await _say(interaction, "⚠️ Something went wrong with that command; please try again.", ephemeral=True)
        except discord.HTTPException:
            log.warning("could not report the error to the user")


@app_commands.command()
@app_commands.describe(prompt="What you want to ask")
async def ask(interaction: discord.Interaction, prompt: str) -> None:
    """Ask the model; the answer streams into this channel."""
    bot = _bot(interaction)
    if (too_fast := bot.rate_limited(interaction.user)) is not None:
        await _say(interaction, too_fast, ephemeral=True)
        return
    # Discord wants an answer within 3 s; the queue can take longer, so show "thinking…" first.
    await interaction.response.defer(thinking=True)
    user = interaction.user
    incoming = Incoming(_session(interaction), str(user.id), user.display_name, prompt,
                        event_id=str(interaction.id))
    await bot.answer(incoming, InteractionTarget(interaction, min_edit_interval=bot.settings.edit_interval))


@app_commands.command()
async def reset(interaction: discord.Interaction) -> None:
    """Forget this conversation's history (the system prompt stays)."""
    await _bot(interaction).manager.reset(_session(interaction))
    await _say(interaction, "🧹 Conversation history cleared.", ephemeral=False)


@app_commands.command()
@app_commands.describe(prompt="New system prompt; leave out to see the current one",
                       default="Go back to the configured default prompt")
async def system(interaction: discord.Interaction, prompt: str | None = None, default: bool = False) -> None:
    """Show or set the system prompt of this conversation."""
    bot, key = _bot(interaction), _session(interaction)
    if prompt is None and not default:
        current = await bot.manager.system_prompt(key)
        if len(current) > SHOWN_PROMPT_MAX_CHARS:
            current = current[:SHOWN_PROMPT_MAX_CHARS] + "…"
        await _say(interaction, f"Current system prompt:\n>>> {current}", ephemeral=True)
        return
    # A DM is the caller's own conversation; a channel's is shared, so it takes a server manager.
    allowed = (interaction.guild_id is None or bot.is_admin(interaction.user)
               or interaction.permissions.manage_guild)
    if not allowed:
        await _say(interaction, "🚫 Changing the system prompt needs the Manage Server permission.",
                   ephemeral=True)
        return
    await bot.manager.set_system_prompt(key, None if default else prompt)
    done = "set back to the default" if default else "updated"
    await _say(interaction, f"📝 System prompt {done} by {interaction.user.display_name}.", ephemeral=False)


@app_commands.command()
async def stop(interaction: discord.Interaction) -> None:
    """Stop the reply being generated in this conversation."""
    if _bot(interaction).manager.stop(_session(interaction)):
        await _say(interaction, "⏹️ Stopping the reply.", ephemeral=False)
    else:
        await _say(interaction, "Nothing is being generated in this conversation.", ephemeral=True)


@app_commands.command()
async def status(interaction: discord.Interaction) -> None:
    """Model, queue length, this conversation's place in the queue, and speed."""
    status = _bot(interaction).manager.status(_session(interaction))
    await _say(interaction, "\n".join(f"**{label}:** {value}" for label, value in status.lines()), ephemeral=True)
