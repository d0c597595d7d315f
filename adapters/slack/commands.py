"""Slash commands: /ask, /reset, /system, /stop, /status, /settings, /model.

Each one calls ``ack()`` before anything slow (Slack shows ``operation_timeout`` after 3 s); refusals and
command results travel in that ack, which Slack shows only to the person who typed the command.
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncAck, AsyncBoltContext, AsyncRespond

from adapters.slack.mrkdwn import escape, from_slack
from adapters.slack.sessions import is_dm, session_key
from adapters.slack.targets import UpdateTarget
from bot.access import Action
from bot.errors import LlamarelayError
from bot.text import one_line
from bot.tunables import SETTINGS, Tunable, refused, tunable
from bot.types import Incoming, SessionKey
from bot.wording import model_changed, model_list

if TYPE_CHECKING:
    from adapters.slack.bot import SlackBot

__all__ = ["register_commands", "SlashCommands", "command_key", "parse_settings"]

log = logging.getLogger(__name__)

QUESTION_PREVIEW_CHARS = 200
ASK_USAGE = "Ask me something: `/ask how do magnets work?`"
SETTINGS_USAGE = "Change them with `/settings temperature=0.3 max_tokens=400 top_p=0.9` (any of the three)."
_SETTING = re.compile(r"([A-Za-z_]+)\s*=\s*([^\s,;]+)")


def command_key(command: dict[str, Any]) -> SessionKey:
    """The session a command acts on: the user's DM session in a DM with the bot, else the channel's (Slack
    offers no slash commands inside a thread)."""
    return session_key(command.get("team_id", ""), command["channel_id"], command["user_id"])


def parse_settings(text: str) -> dict[str, int | float]:
    """``name=value`` pairs (``temperature``, ``max_tokens``, ``top_p``) from a ``/settings`` line; ValueError
    with a readable reason for anything else. Bounds are checked later, by the core."""
    changes: dict[str, int | float] = {}
    for name, raw in _SETTING.findall(text):
        name = name.lower()
        setting = tunable(name)
        if setting is None:
            names = ", ".join(setting.name for setting in SETTINGS)
            raise ValueError(f"there is no setting `{name}`; these can be set: {names}")
        try:
            value = setting.kind(raw)
        except ValueError:
            raise ValueError(f"`{name}` needs a {'whole ' if setting.kind is int else ''}number, not `{raw}`") from None
        if not math.isfinite(value):
            raise ValueError(f"`{name}` needs a finite number, not `{raw}`")
        changes[name] = value
    leftover = " ".join(_SETTING.sub(" ", text).replace(",", " ").replace(";", " ").split())
    if leftover:
        raise ValueError(f"I didn't understand `{leftover[:100]}`")
    if not changes:
        raise ValueError("nothing to set")
    return changes


def _bounds(setting: Tunable, n_ctx: int) -> str:
    low, _, above = setting.bounds
    high = setting.highest(n_ctx)
    return f"above {low:g}, up to {high:g}" if above else f"{low:g} to {high:g}"


def _why(exc: ValueError) -> str:
    name, reason = refused(exc)[0]
    return f"`{name}`: {reason}" if name else reason


def _preview(text: str) -> str:
    return one_line(text, QUESTION_PREVIEW_CHARS)


class SlashCommands:
    """The commands, registered on the bot's AsyncApp by `register_commands`."""

    def __init__(self, bot: SlackBot) -> None:
        self.bot = bot

    async def _refusal(self, command: dict[str, Any], action: Action = Action.USE) -> str | None:
        return await self.bot.refusal(command["user_id"], command["channel_id"], action)

    async def ask(
        self, ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext
    ) -> None:
        """``/ask <prompt>``: a visible message in the channel showing the question, the answer streamed into it."""
        user, channel = command["user_id"], command["channel_id"]
        prompt = from_slack(command.get("text", ""), context.bot_user_id)
        refusal = (
            await self._refusal(command) or (None if prompt else ASK_USAGE) or await self._refusal(command, Action.ASK)
        )
        if refusal:
            await ack(text=refusal)
            return
        await ack()
        name = command.get("user_name") or user
        header = f"*{escape(name)} asked:* {escape(_preview(prompt))}\n\n"
        key = command_key(command)
        target = UpdateTarget(
            self.bot.client,
            channel,
            team_id=command.get("team_id", ""),
            key=key,
            header=header,
            edit_interval=self.bot.settings.edit_interval,
            continue_in_thread=True,
        )
        result = await self.bot.reply(Incoming(key, user, name, prompt), target)
        if not result.delivered and target.first_ts is None:  # nothing visible happened: tell the asker why
            await respond(
                text=f"⚠️ I can't post in this conversation (`{target.refusal}`). Invite me with "
                "`/invite @llamarelay`, or DM me.",
                response_type="ephemeral",
            )

    async def reset(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/reset``: forget this conversation's history."""
        if refusal := await self._refusal(command):
            await ack(text=refusal)
            return
        await self.bot.manager.reset(command_key(command))
        await ack(text="🧹 Done: this conversation starts fresh (the system prompt is kept).")

    async def system(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/system`` shows the system prompt; ``/system <prompt>`` sets it (admins in a channel, anyone in a DM),
        ``/system default`` resets it."""
        if refusal := await self._refusal(command):
            await ack(text=refusal)
            return
        key, text = command_key(command), command.get("text", "").strip()
        if not text:
            current = await self.bot.manager.system_prompt(key)
            await ack(text=f"System prompt for this conversation:\n```\n{escape(current)}\n```")
            return
        if refusal := await self._refusal(command, Action.SET_SYSTEM_PROMPT):
            await ack(text=refusal)
            return
        if text.lower() == "default":
            await self.bot.manager.set_system_prompt(key, None)
            await ack(text="✅ This conversation uses the default system prompt again.")
            return
        await self.bot.manager.set_system_prompt(key, from_slack(text))
        await ack(text="✅ System prompt set for this conversation.")

    async def stop(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/stop``: cancel the reply being generated in this conversation; what was written stays. In a
        channel that includes replies in its threads (Slack offers no slash commands inside a thread)."""
        if refusal := await self._refusal(command):
            await ack(text=refusal)
            return
        keys = {command_key(command)}
        if not is_dm(command["channel_id"]):
            keys.update(self.bot.running_in(command.get("team_id", ""), command["channel_id"]))
        if sum(self.bot.manager.stop(key) for key in keys):
            await ack(text="⏹️ Stopping the reply.")
        else:
            await ack(text="Nothing is being written in this conversation right now.")

    async def status(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/status``: the model, the queue, and where this conversation's reply stands."""
        if refusal := await self._refusal(command):
            await ack(text=refusal)
            return
        key = command_key(command)
        if not is_dm(command["channel_id"]) and self.bot.manager.status(key).state is None:
            # Nothing in the channel's own conversation: show a reply running in one of its threads, if any.
            key = next(iter(self.bot.running_in(command.get("team_id", ""), command["channel_id"])), key)
        status = await self.bot.manager.conversation_status(key)
        await ack(text="\n".join(f"*{label}:* {escape(value)}" for label, value in status.lines()))

    async def settings(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/settings`` shows this conversation's temperature, max_tokens and top_p; ``/settings name=value …``
        sets them (admins in a channel, anyone in a DM). Threads use their channel's."""
        if refusal := await self._refusal(command):
            await ack(text=refusal)
            return
        key, text = command_key(command), command.get("text", "").strip()
        if text:
            if refusal := await self._refusal(command, Action.SET_SAMPLING):
                await ack(text=refusal)
                return
            try:
                await self.bot.manager.set_sampling(key, **parse_settings(text))
            except ValueError as exc:  # pydantic's ValidationError too
                await ack(text=f"⚠️ Not changed: {_why(exc)}.\n{SETTINGS_USAGE}")
                return
        sampling = await self.bot.manager.sampling(key)
        n_ctx = self.bot.manager.context_window
        lines = [
            f"• `{setting.name}` = {getattr(sampling, setting.name):g}  ({_bounds(setting, n_ctx)})"
            for setting in SETTINGS
        ]
        where = "your DM with me" if is_dm(command["channel_id"]) else "this channel (and its threads)"
        await ack(
            text="\n".join(
                [f"{'✅ Set. ' if text else ''}*Settings for {where}:*", *lines, "" if text else SETTINGS_USAGE]
            ).strip()
        )

    async def model(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/model`` shows this conversation's model and the configured ones; ``/model <name>`` switches to it
        (admins in a channel, anyone in a DM). Threads use their channel's."""
        if refusal := await self._refusal(command):
            await ack(text=refusal)
            return
        key, name = command_key(command), command.get("text", "").strip()
        manager = self.bot.manager
        if not name:
            choices = [(escape(m.name), escape(m.description)) for m in manager.model_choices()]
            await ack(text=model_list(escape(await manager.model_name(key)), choices))
            return
        if refusal := await self._refusal(command, Action.SET_MODEL):
            await ack(text=refusal)
            return
        try:
            chosen = await manager.set_model(key, name)
        except LlamarelayError as exc:  # an unknown name: the line names it and the choices
            await ack(text=escape(str(exc)))
            return
        await ack(text=model_changed(escape(chosen.name), f"<@{command['user_id']}>"))


def register_commands(bot: SlackBot) -> SlashCommands:
    """Register the slash commands on ``bot.app`` (names must match the app manifest)."""
    commands = SlashCommands(bot)
    bot.app.command("/ask")(commands.ask)
    bot.app.command("/reset")(commands.reset)
    bot.app.command("/system")(commands.system)
    bot.app.command("/stop")(commands.stop)
    bot.app.command("/status")(commands.status)
    bot.app.command("/settings")(commands.settings)
    bot.app.command("/model")(commands.model)
    return commands
