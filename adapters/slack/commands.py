"""Slash commands: /ask, /reset, /system, /stop, /status.

Each one calls ``ack()`` before anything slow (Slack shows ``operation_timeout`` after 3 s); refusals and
command results travel in that ack, which Slack shows only to the person who typed the command.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncAck, AsyncBoltContext, AsyncRespond

from adapters.slack.mrkdwn import escape, from_slack
from adapters.slack.targets import UpdateTarget
from bot.types import Incoming, SessionKey

if TYPE_CHECKING:
    from adapters.slack.bot import SlackBot

__all__ = ["register_commands", "SlashCommands", "command_key"]

log = logging.getLogger(__name__)

QUESTION_PREVIEW_CHARS = 200
ASK_USAGE = "Ask me something: `/ask how do magnets work?`"
ADMINS_ONLY = "🚫 Only admins (`admin_user_ids` under `[slack]` in config.toml) can change the system prompt."


def command_key(command: dict[str, Any]) -> SessionKey:
    """The session a command acts on: the user's DM session in a DM with the bot, else the channel's."""
    if is_dm(command):
        return SessionKey.for_dm("slack", command["user_id"])
    return SessionKey.for_channel("slack", command.get("team_id", ""), command["channel_id"])


def is_dm(command: dict[str, Any]) -> bool:
    return str(command.get("channel_id", "")).startswith("D") or command.get("channel_name") == "directmessage"


def _preview(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= QUESTION_PREVIEW_CHARS else line[:QUESTION_PREVIEW_CHARS - 1] + "…"


class SlashCommands:
    """The five commands, registered on the bot's AsyncApp by `register_commands`."""

    def __init__(self, bot: SlackBot) -> None:
        self.bot = bot

    def _refusal(self, command: dict[str, Any]) -> str | None:
        return self.bot.refusal(command["user_id"], command["channel_id"], is_dm=is_dm(command))

    async def ask(self, ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond,
                  context: AsyncBoltContext) -> None:
        """``/ask <prompt>``: a visible message in the channel showing the question, the answer streamed into it."""
        user, channel = command["user_id"], command["channel_id"]
        prompt = from_slack(command.get("text", ""), context.bot_user_id)
        refusal = self._refusal(command) or (None if prompt else ASK_USAGE) or self.bot.rate_refusal(user)
        if refusal:
            await ack(text=refusal)
            return
        await ack()
        name = command.get("user_name") or user
        header = f"*{escape(name)} asked:* {escape(_preview(prompt))}\n\n"
        target = UpdateTarget(self.bot.client, channel, team_id=command.get("team_id", ""), header=header,
                              edit_interval=self.bot.settings.edit_interval, continue_in_thread=True)
        result = await self.bot.reply(Incoming(command_key(command), user, name, prompt), target)
        if not result.delivered and target.first_ts is None:  # nothing visible happened: tell the asker why
            await respond(text=f"⚠️ I can't post in this conversation (`{target.refusal}`). Invite me with "
                               "`/invite @llamarelay`, or DM me.", response_type="ephemeral")

    async def reset(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/reset``: forget this conversation's history."""
        if refusal := self._refusal(command):
            await ack(text=refusal)
            return
        await self.bot.manager.reset(command_key(command))
        await ack(text="🧹 Done: this conversation starts fresh (the system prompt is kept).")

    async def system(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/system`` shows the system prompt; ``/system <prompt>`` (admins) sets it, ``/system default`` resets it."""
        if refusal := self._refusal(command):
            await ack(text=refusal)
            return
        key, text = command_key(command), command.get("text", "").strip()
        if not text:
            current = await self.bot.manager.system_prompt(key)
            await ack(text=f"System prompt for this conversation:\n```\n{escape(current)}\n```")
            return
        if not self.bot.is_admin(command["user_id"]):
            await ack(text=ADMINS_ONLY)
            return
        if text.lower() == "default":
            await self.bot.manager.set_system_prompt(key, None)
            await ack(text="✅ This conversation uses the default system prompt again.")
            return
        await self.bot.manager.set_system_prompt(key, from_slack(text))
        await ack(text="✅ System prompt set for this conversation.")

    async def stop(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/stop``: cancel the reply being generated in this conversation; what was written stays."""
        if refusal := self._refusal(command):
            await ack(text=refusal)
            return
        if self.bot.manager.stop(command_key(command)):
            await ack(text="⏹️ Stopping the reply.")
        else:
            await ack(text="Nothing is being written in this conversation right now.")

    async def status(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        """``/status``: the model, the queue, and where this conversation's reply stands."""
        if refusal := self._refusal(command):
            await ack(text=refusal)
            return
        status = self.bot.manager.status(command_key(command))
        await ack(text="\n".join(f"*{label}:* {escape(value)}" for label, value in status.lines()))


def register_commands(bot: SlackBot) -> SlashCommands:
    """Register the slash commands on ``bot.app`` (names must match the app manifest)."""
    commands = SlashCommands(bot)
    bot.app.command("/ask")(commands.ask)
    bot.app.command("/reset")(commands.reset)
    bot.app.command("/system")(commands.system)
    bot.app.command("/stop")(commands.stop)
    bot.app.command("/status")(commands.status)
    return commands
