"""The buttons under a reply: Stop, Regenerate, Continue, Slack's 👍/👎 on natively streamed replies, and for
tools Run / Deny (a call waiting for approval; the waiting is the core's, `bot.tools.approvals`) and Tool details
(the reply's calls, shown to the presser alone).

Each handler acks at once (Slack wants it within 3 s), then checks the press: only people the bot answers may
press, and a press on a reply that is no longer the conversation's latest gets an ephemeral explanation
instead of acting. Regenerate rewrites the pressed message in place; Continue goes on in a new message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from slack_bolt.async_app import AsyncAck
from slack_sdk.errors import SlackApiError

from adapters.slack.blocks import (
    CONTINUE,
    DENY,
    FEEDBACK,
    REGENERATE,
    RUN,
    STOP,
    TOOL_DETAILS,
    ButtonValue,
    without_buttons,
)
from adapters.slack.sessions import is_dm
from adapters.slack.targets import UpdateTarget
from bot.access import Action
from bot.conversations import RedoRefusal
from bot.types import SessionKey
from bot.wording import APPROVAL_GONE, APPROVED, DENIED, NOTHING_TO_CONTINUE, STALE_REPLY

if TYPE_CHECKING:
    from adapters.slack.bot import SlackBot

__all__ = ["register_controls", "ReplyControls"]

log = logging.getLogger(__name__)

NOTHING_TO_STOP = "This reply is already finished; there is nothing to stop."
STALE = f"🕰️ {STALE_REPLY} Only the newest answer can be regenerated or continued."
BUSY = "⏳ This conversation is still answering; wait for it to finish (or press Stop) first."
THANKS = "Thanks for the feedback!"
EPHEMERAL_LIMIT = 3000  # characters of tool details in one ephemeral message
REFUSALS = {RedoRefusal.STALE: STALE, RedoRefusal.BUSY: BUSY, RedoRefusal.NOTHING_TO_CONTINUE: NOTHING_TO_CONTINUE}


@dataclass(frozen=True)
class Press:
    """One button press that passed the checks every button shares."""

    value: ButtonValue
    user: str
    channel: str
    team: str
    message: dict[str, Any]

    @property
    def key(self) -> SessionKey:
        return self.value.key

    @property
    def thread_ts(self) -> str | None:
        return self.message.get("thread_ts")

    @property
    def in_dm(self) -> bool:
        return is_dm(self.channel)


class ReplyControls:
    """Button handlers, registered on the bot's AsyncApp by `register_controls`."""

    def __init__(self, bot: SlackBot) -> None:
        self.bot = bot
        self._busy: set[str] = set()  # conversations a Regenerate or Continue press is working on

    async def _press(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> Press | None:
        """Ack, then the press if it is one the bot acts on; an ephemeral line explains a refusal."""
        await ack()
        user = str((body.get("user") or {}).get("id") or "")
        channel = str((body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or "")
        team = str((body.get("team") or {}).get("id") or "")
        value = ButtonValue.load(str(action.get("value") or ""))
        message = body.get("message") or {}
        if value is None or not user or not channel or not _belongs(value.key, team, channel, user):
            log.warning("ignoring a %s press whose value does not match its conversation", action.get("action_id"))
            return None
        press = Press(value, user, channel, team, message)
        if action.get("action_id") in (RUN, DENY):
            return press  # `approve` asks the policy its own question
        if refusal := await self.bot.refusal(user, channel):
            await self.bot.tell(channel, user, refusal, thread_ts=press.thread_ts)
            return None
        return press

    async def stop(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Stop: end the reply being written; what was written stays."""
        press = await self._press(ack, body, action)
        if press is not None and not self.bot.manager.stop(press.key):
            await self.bot.tell(press.channel, press.user, NOTHING_TO_STOP, thread_ts=press.thread_ts)

    async def regenerate(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Regenerate: answer the last message again, in place of the pressed reply (the history keeps only
        the new answer)."""
        press = await self._press(ack, body, action)
        if press is None or not await self._claim(press, continuing=False):
            return
        try:
            target = self._target(
                press, replace_ts=str(press.message.get("ts") or "") or None, header=press.value.header
            )
            assert press.value.reply_id is not None
            await self.bot.deliver(self.bot.manager.regenerate(press.key, target, press.value.reply_id), target)
        finally:
            self._busy.discard(str(press.key))

    async def continue_(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Continue: the model goes on from where the pressed reply was cut, in a new message below it."""
        press = await self._press(ack, body, action)
        if press is None or not await self._claim(press, continuing=True):
            return
        try:
            await self._drop_buttons(press)
            target = self._target(press)
            assert press.value.reply_id is not None
            await self.bot.deliver(self.bot.manager.continue_reply(press.key, target, press.value.reply_id), target)
        finally:
            self._busy.discard(str(press.key))

    async def feedback(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """👍/👎 on a natively streamed reply: stored with the reply."""
        press = await self._press(ack, body, action)
        if press is None or press.value.reply_id is None or press.value.feedback not in ("good", "bad"):
            return
        rating: Literal["good", "bad"] = "good" if press.value.feedback == "good" else "bad"
        stored = await self.bot.manager.set_feedback(press.key, press.value.reply_id, rating)
        await self.bot.tell(
            press.channel, press.user, THANKS if stored else f"🕰️ {STALE_REPLY}", thread_ts=press.thread_ts
        )

    async def approve(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Run / Deny: answer a tool call waiting for approval, if the presser is its asker or an admin."""
        press = await self._press(ack, body, action)
        if press is None:
            return
        approvals = self.bot.manager.approvals
        pending = approvals.get(press.value.approval)
        if pending is None or pending.key != str(press.key):
            await self.bot.tell(press.channel, press.user, APPROVAL_GONE, thread_ts=press.thread_ts)
            return
        run = action.get("action_id") == RUN
        if refusal := await self.bot.refusal(press.user, press.channel, Action.APPROVE_TOOL, owner=pending.owner):
            await self.bot.tell(press.channel, press.user, refusal, thread_ts=press.thread_ts)
        elif not approvals.answer(pending.id, run=run):
            await self.bot.tell(press.channel, press.user, APPROVAL_GONE, thread_ts=press.thread_ts)
        else:
            await self.bot.tell(press.channel, press.user, APPROVED if run else DENIED, thread_ts=press.thread_ts)

    async def tool_details(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Tool details: the reply's tool calls, arguments and results, to the presser alone."""
        press = await self._press(ack, body, action)
        if press is None or press.value.reply_id is None:
            return
        details = await self.bot.manager.tool_details(press.key, press.value.reply_id, EPHEMERAL_LIMIT)
        await self.bot.tell(press.channel, press.user, details, thread_ts=press.thread_ts)

    async def _claim(self, press: Press, *, continuing: bool) -> bool:
        """True when the pressed reply may be regenerated or continued now; it is then this press's to work on."""
        key = str(press.key)
        if key in self._busy:
            await self.bot.tell(press.channel, press.user, BUSY, thread_ts=press.thread_ts)
            return False
        self._busy.add(key)
        reply_id = press.value.reply_id
        redo = (
            RedoRefusal.STALE
            if reply_id is None
            else await self.bot.manager.redo_refusal(press.key, reply_id, continuing=continuing)
        )
        refusal = REFUSALS[redo] if redo is not None else None
        # A new answer costs what a message costs.
        refusal = refusal or await self.bot.refusal(press.user, press.channel, Action.ASK)
        if refusal:
            self._busy.discard(key)
            await self.bot.tell(press.channel, press.user, refusal, thread_ts=press.thread_ts)
            return False
        return True

    def _target(self, press: Press, *, replace_ts: str | None = None, header: str = "") -> UpdateTarget:
        # In a channel a reply's further messages go in its thread; a DM's top level stays the top level.
        return UpdateTarget(
            self.bot.client,
            press.channel,
            team_id=press.team,
            key=press.key,
            thread_ts=press.thread_ts or (None if press.in_dm else str(press.message.get("ts"))),
            header=header,
            replace_ts=replace_ts,
            edit_interval=self.bot.settings.edit_interval,
        )

    async def _drop_buttons(self, press: Press) -> None:
        # The pressed message is no longer the reply's end: its buttons would act on the wrong text.
        try:
            await self.bot.client.chat_update(
                channel=press.channel,
                ts=str(press.message.get("ts")),
                text=str(press.message.get("text") or ""),
                blocks=without_buttons(press.message.get("blocks") or []),
            )
        except SlackApiError as exc:
            log.info("could not take the buttons off %s: %s", press.message.get("ts"), exc.response.get("error"))


def _belongs(key: SessionKey, team: str, channel: str, user: str) -> bool:
    # Slack returns only values the bot set; this still keeps a value from acting outside its conversation.
    if key.platform != "slack":
        return False
    if key.is_private:
        return key.dm_user == user
    return key.channel == channel and key.workspace == team


def register_controls(bot: SlackBot) -> ReplyControls:
    """Register the button handlers on ``bot.app`` (the app needs ``interactivity`` in its manifest)."""
    controls = ReplyControls(bot)
    bot.app.action(STOP)(controls.stop)
    bot.app.action(REGENERATE)(controls.regenerate)
    bot.app.action(CONTINUE)(controls.continue_)
    bot.app.action(FEEDBACK)(controls.feedback)
    bot.app.action(RUN)(controls.approve)
    bot.app.action(DENY)(controls.approve)
    bot.app.action(TOOL_DETAILS)(controls.tool_details)
    return controls
