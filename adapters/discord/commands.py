"""Slash commands: /ask, /reset, /system, /settings, /model, /stop, /status, and the message commands of
`adapters.discord.menus`, on a `CommandTree` that checks access first.

Refusals and errors are ephemeral (only the caller sees them); answers that change a shared
conversation (/ask, /reset, setting /system, /settings or /model, /stop) are visible to the channel.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from adapters.discord.interactions import bot_of, role_ids
from adapters.discord.menus import ask_about_message, summarize_until
from adapters.discord.targets import NO_MENTIONS, InteractionTarget
from bot.access import Action
from bot.errors import LlamarelayError
from bot.tunables import SETTINGS, refused, tunable
from bot.types import Incoming, SessionKey
from bot.wording import model_changed, model_list

if TYPE_CHECKING:
    from adapters.discord.bot import DiscordBot

__all__ = ["LlamarelayTree"]

log = logging.getLogger(__name__)

SHOWN_PROMPT_MAX_CHARS = 1800  # room for the heading within Discord's 2,000


def _bounded(kind: type, field: str) -> Any:
    """An option type showing Discord users the [sampling] bounds of ``field`` (the core checks them again)."""
    setting = tunable(field)
    assert setting is not None, f"/settings cannot set {field}"
    low, high, _ = setting.bounds
    return app_commands.Range[kind, None if low is None else kind(low), None if high is None else kind(high)]


if TYPE_CHECKING:  # the values the command receives; Discord reads the bounded option types built below
    Temperature = float
    MaxTokens = int
    TopP = float
else:
    Temperature = _bounded(float, "temperature")
    MaxTokens = _bounded(int, "max_tokens")
    TopP = _bounded(float, "top_p")


async def _say(interaction: discord.Interaction, text: str, *, ephemeral: bool) -> None:
    """Answer an interaction whether or not it has been answered (or deferred) already."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(text, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS)


def _bot(interaction: discord.Interaction) -> DiscordBot:
    return bot_of(interaction)


def _session(interaction: discord.Interaction) -> SessionKey:
    return _bot(interaction).session_for(interaction.channel, interaction.user, interaction.guild_id)


async def _refused(interaction: discord.Interaction, action: Action = Action.USE) -> bool:
    """Ask the access policy; True after telling the user (only them) why not. Whoever may manage the server
    may change its channels' settings, as the configured admins may."""
    manages = bool(interaction.permissions.manage_guild) if interaction.guild_id is not None else False
    why = await _bot(interaction).refusal(interaction.user, _session(interaction), action, manages_place=manages)
    if why is not None:
        await _say(interaction, why, ephemeral=True)
    return why is not None


class LlamarelayTree(app_commands.CommandTree):
    """The bot's command tree: every command passes the access lists before it runs."""

    def __init__(self, client: DiscordBot) -> None:
        super().__init__(client)
        command: app_commands.Command[Any, ..., Any] | app_commands.ContextMenu
        for command in (ask, reset, system, settings_command, model, stop, status, ask_about_message, summarize_until):
            self.add_command(command)

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return not await _refused(interaction)

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        if isinstance(error, app_commands.CheckFailure):
            return  # interaction_check has told the user already
        log.error("command %r failed", interaction.command.name if interaction.command else "?", exc_info=error)
        try:
            await _say(interaction, "⚠️ Something went wrong with that command; please try again.", ephemeral=True)
        except discord.HTTPException:
            log.warning("could not report the error to the user")


@app_commands.command()
@app_commands.describe(prompt="What you want to ask")
async def ask(interaction: discord.Interaction, prompt: str) -> None:
    """Ask the model; the answer streams into this channel."""
    bot = _bot(interaction)
    if await _refused(interaction, Action.ASK):
        return
    # Discord wants an answer within 3 s; the queue can take longer, so show "thinking…" first.
    await interaction.response.defer(thinking=True)
    user = interaction.user
    key = _session(interaction)
    incoming = Incoming(
        key, str(user.id), user.display_name, prompt, event_id=str(interaction.id), author_roles=role_ids(user)
    )
    target = InteractionTarget(interaction, min_edit_interval=bot.settings.edit_interval)
    await bot.answer(bot.manager.respond(incoming, target), key)


@app_commands.command()
async def reset(interaction: discord.Interaction) -> None:
    """Forget this conversation's history (the system prompt stays)."""
    await _bot(interaction).manager.reset(_session(interaction))
    await _say(interaction, "🧹 Conversation history cleared.", ephemeral=False)


@app_commands.command()
@app_commands.describe(
    prompt="New system prompt; leave out to see the current one", default="Go back to the configured default prompt"
)
async def system(interaction: discord.Interaction, prompt: str | None = None, default: bool = False) -> None:
    """Show or set the system prompt of this conversation."""
    bot, key = _bot(interaction), _session(interaction)
    if prompt is None and not default:
        current = await bot.manager.system_prompt(key)
        if len(current) > SHOWN_PROMPT_MAX_CHARS:
            current = current[:SHOWN_PROMPT_MAX_CHARS] + "…"
        await _say(interaction, f"Current system prompt:\n>>> {current}", ephemeral=True)
        return
    if await _refused(interaction, Action.SET_SYSTEM_PROMPT):
        return
    await bot.manager.set_system_prompt(key, None if default else prompt)
    done = "set back to the default" if default else "updated"
    await _say(interaction, f"📝 System prompt {done} by {interaction.user.display_name}.", ephemeral=False)


def _why(error: ValueError) -> str:
    """A refused setting in a line: which one, and what it must be."""
    return "; ".join(f"{name}: {reason}" if name else reason for name, reason in refused(error))


@app_commands.command(name="settings")
@app_commands.describe(**{setting.name: setting.description for setting in SETTINGS})
async def settings_command(
    interaction: discord.Interaction,
    temperature: Temperature | None = None,
    max_tokens: MaxTokens | None = None,
    top_p: TopP | None = None,
) -> None:
    """Show or change this conversation's temperature, reply length and top_p."""
    bot, key = _bot(interaction), _session(interaction)
    changes = {
        name: value
        for name, value in (("temperature", temperature), ("max_tokens", max_tokens), ("top_p", top_p))
        if value is not None
    }
    if not changes:
        await _say(interaction, f"Settings of this conversation: {await _settings(bot, key)}", ephemeral=True)
        return
    if await _refused(interaction, Action.SET_SAMPLING):
        return
    try:
        await bot.manager.set_sampling(key, **changes)
    except ValueError as exc:  # pydantic's ValidationError is one too
        await _say(interaction, f"⚠️ Nothing was changed: {_why(exc)}.", ephemeral=True)
        return
    await _say(
        interaction,
        f"⚙️ Settings changed by {interaction.user.display_name}: {await _settings(bot, key)}",
        ephemeral=False,
    )


async def _settings(bot: DiscordBot, key: SessionKey) -> str:
    sampling = await bot.manager.sampling(key)
    return ", ".join(f"**{setting.label}:** {getattr(sampling, setting.name)}" for setting in SETTINGS)


AUTOCOMPLETE_LIMIT = 25  # Discord shows at most 25 choices


async def _model_names(interaction: discord.Interaction, typed: str) -> list[app_commands.Choice[str]]:
    """The configured models whose name or description contains what the user has typed so far."""
    typed = typed.strip().lower()
    return [
        app_commands.Choice(name=f"{m.name} — {m.description}"[:100] if m.description else m.name, value=m.name)
        for m in _bot(interaction).manager.model_choices()
        if typed in m.name.lower() or typed in m.description.lower()
    ][:AUTOCOMPLETE_LIMIT]


@app_commands.command()
@app_commands.describe(name="The model to answer here from now on; leave out to see the current one and the list")
@app_commands.autocomplete(name=_model_names)
async def model(interaction: discord.Interaction, name: str | None = None) -> None:
    """Show or change the model that answers in this conversation."""
    bot, key = _bot(interaction), _session(interaction)
    if name is None:
        choices = [(m.name, m.description) for m in bot.manager.model_choices()]
        await _say(interaction, model_list(await bot.manager.model_name(key), choices), ephemeral=True)
        return
    if await _refused(interaction, Action.SET_MODEL):
        return
    try:
        chosen = await bot.manager.set_model(key, name)
    except LlamarelayError as exc:  # an unknown name: the line names it and the choices
        await _say(interaction, str(exc), ephemeral=True)
        return
    await _say(interaction, model_changed(chosen.name, interaction.user.display_name), ephemeral=False)


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
    status = await _bot(interaction).manager.conversation_status(_session(interaction))
    await _say(interaction, "\n".join(f"**{label}:** {value}" for label, value in status.lines()), ephemeral=True)
