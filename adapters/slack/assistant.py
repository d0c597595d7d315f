"""Slack's AI-app surface (Agents & AI Apps): assistant threads through bolt's `AsyncAssistant` middleware.

A new assistant thread gets a greeting and suggested prompts; with several models configured, the greeting
carries a select of them (`blocks.model_select_blocks`): picking one switches that thread's model, as ``/model``
does elsewhere, and the select then shows the thread's model. Each question in it is answered in that thread,
its status ("is thinking…", "is waiting in line (#2)…") shown with ``assistant.threads.setStatus`` until the
answer appears, and the thread is titled after its first question. Each assistant thread is a conversation of
its own (key: the app's DM channel + the thread). The middleware only takes messages in threads that are
assistant threads; without the feature, a DM thread is answered as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncAck, AsyncBoltContext, AsyncSay, AsyncSetSuggestedPrompts, AsyncSetTitle
from slack_bolt.listener_matcher.async_listener_matcher import AsyncCustomListenerMatcher
from slack_bolt.middleware.assistant.async_assistant import AsyncAssistant
from slack_sdk.errors import SlackApiError

from adapters.slack.blocks import MODEL_SELECT, model_select_blocks
from adapters.slack.mrkdwn import escape, from_slack
from adapters.slack.sessions import session_key
from adapters.slack.targets import AssistantTarget
from bot.access import Action
from bot.errors import LlamarelayError
from bot.text import one_line
from bot.types import Incoming, SessionKey
from bot.wording import model_changed

if TYPE_CHECKING:
    from adapters.slack.bot import SlackBot

__all__ = ["register_assistant", "AssistantThreads", "GREETING", "SUGGESTED_PROMPTS", "thread_key"]

log = logging.getLogger(__name__)

GREETING = "Hi! I'm llamarelay, an assistant running on a local language model. What can I help you with?"
SUGGESTED_PROMPTS = [
    {"title": "Explain something simply", "message": "Explain how public-key cryptography works, simply."},
    {"title": "Improve a text", "message": "Make this clearer and friendlier: "},
    {"title": "Brainstorm", "message": "Give me five ideas for a team lunch."},
]
TITLE_CHARS = 60
KNOWN_THREADS_LIMIT = 10_000  # remembered answers to "is this an assistant thread?"
ASSISTANT_ROOT_SUBTYPE = "assistant_app_thread"  # the first message of every assistant thread


def thread_key(team: str, channel: str, thread_ts: str) -> SessionKey:
    """An assistant thread's conversation: one per thread, in the app's DM with the user."""
    return session_key(team, channel, "", thread_ts, own_thread=True)


def _title(question: str) -> str:
    return one_line(question, TITLE_CHARS)


class AssistantThreads:
    """The assistant listeners, registered on the bot's AsyncApp by `register_assistant`."""

    def __init__(self, bot: SlackBot) -> None:
        self.bot = bot
        self._threads: dict[str, bool] = {}  # "channel/thread_ts" → whether it is an assistant thread
        self.assistant = AsyncAssistant()
        self.assistant.thread_started(self.started)
        self.assistant.thread_context_changed(self.context_changed)
        is_assistant_thread = AsyncCustomListenerMatcher(app_name="llamarelay", func=self.is_assistant_thread)
        # slack_bolt annotates one matcher, but its _merge_matchers adds `matchers` to a list: a list it must be.
        self.assistant.user_message(self.question, matchers=[is_assistant_thread])  # type: ignore[arg-type]

    async def started(
        self,
        event: dict[str, Any],
        body: dict[str, Any],
        context: AsyncBoltContext,
        say: AsyncSay,
        set_suggested_prompts: AsyncSetSuggestedPrompts,
    ) -> None:
        """``assistant_thread_started``: greet, and offer a few prompts to start from."""
        thread = event.get("assistant_thread") or {}
        channel, user = str(thread.get("channel_id") or ""), str(thread.get("user_id") or "")
        self._remember(f"{channel}/{thread.get('thread_ts')}", True)
        if refusal := await self.bot.refusal(user, channel):
            await say(refusal)
            return
        key = thread_key(self.bot.team_of(body, context), channel, str(thread.get("thread_ts") or ""))
        await say(GREETING, blocks=await self._greeting_blocks(key))  # no blocks: the plain greeting
        await set_suggested_prompts(prompts=SUGGESTED_PROMPTS, title="Try one of these:")

    async def _greeting_blocks(self, key: SessionKey) -> list[dict[str, Any]] | None:
        """The greeting with the model select showing ``key``'s model; None with one model (nothing to pick)."""
        choices = self.bot.manager.model_choices()
        if len(choices) < 2:
            return None
        return model_select_blocks(
            escape(GREETING), [(m.name, m.description) for m in choices], await self.bot.manager.model_name(key)
        )

    async def choose_model(
        self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        """A model picked in a greeting's select: the thread's model from its next answer on, if the policy lets
        the user change it (a refusal, or a name no longer configured, is said in the thread). The greeting is
        then redrawn with the thread's model, so the select never shows a choice that did not happen."""
        await ack()
        user = str((body.get("user") or {}).get("id") or "")
        container, message = body.get("container") or {}, body.get("message") or {}
        channel = str(container.get("channel_id") or (body.get("channel") or {}).get("id") or "")
        thread = str(container.get("thread_ts") or message.get("thread_ts") or "")
        name = str((action.get("selected_option") or {}).get("value") or "")
        if not user or not channel or not thread or not name:
            log.warning("ignoring a model select without its user, thread or choice")
            return
        key = thread_key(self.bot.team_of(body, context), channel, thread)
        if refusal := await self.bot.refusal(user, channel, Action.SET_MODEL):
            line = refusal
        else:
            try:
                line = model_changed(escape((await self.bot.manager.set_model(key, name)).name), f"<@{user}>")
            except LlamarelayError as exc:  # configured when the greeting was posted, but not now
                line = escape(str(exc))
        await self._redraw(channel, str(message.get("ts") or container.get("message_ts") or ""), key)
        try:
            await self.bot.client.chat_postMessage(channel=channel, thread_ts=thread, text=line)
        except SlackApiError as exc:
            log.info("could not answer a model select in %s: %s", thread, exc.response.get("error"))

    async def _redraw(self, channel: str, ts: str, key: SessionKey) -> None:
        blocks = await self._greeting_blocks(key)
        if not ts or blocks is None:
            return
        try:
            await self.bot.client.chat_update(channel=channel, ts=ts, text=GREETING, blocks=blocks)
        except SlackApiError as exc:
            log.info("could not redraw the greeting %s: %s", ts, exc.response.get("error"))

    async def context_changed(self) -> None:
        """The user moved to another channel with the assistant open; the answers do not depend on it."""

    async def is_assistant_thread(self, body: dict[str, Any], context: AsyncBoltContext) -> bool:
        """Whether a DM thread message is in an assistant thread: seen starting, already a conversation, or
        (asked once, then remembered) its first message is an assistant thread's root."""
        event = body.get("event") or {}
        channel, thread = event.get("channel"), event.get("thread_ts")
        if not channel or not thread:
            return False
        spot = f"{channel}/{thread}"
        if spot in self._threads:
            return self._threads[spot]
        found = await self.bot.manager.is_known(thread_key(self.bot.team_of(body, context), channel, thread))
        if not found:
            try:
                replies = await self.bot.client.conversations_replies(channel=channel, ts=thread, limit=1)
                root = (replies.get("messages") or [{}])[0]
                found = root.get("subtype") == ASSISTANT_ROOT_SUBTYPE
            except SlackApiError as exc:
                log.info("could not tell whether %s is an assistant thread: %s", spot, exc.response.get("error"))
                return False
        self._remember(spot, found)
        return found

    async def question(
        self, event: dict[str, Any], body: dict[str, Any], context: AsyncBoltContext, set_title: AsyncSetTitle
    ) -> None:
        """A message in an assistant thread: answered there, streamed, with the thread's status meanwhile."""
        user, channel, thread, ts = event.get("user"), event.get("channel"), event.get("thread_ts"), event.get("ts")
        if not user or not channel or not thread or not ts:
            return
        team = self.bot.team_of(body, context)
        if not await self.bot.first_delivery(body.get("event_id"), team, channel, ts):
            return
        if refusal := await self.bot.refusal(user, channel, Action.ASK):
            await self.bot.client.chat_postMessage(channel=channel, thread_ts=thread, text=refusal)
            return
        key = thread_key(team, channel, thread)
        text = from_slack(str(event.get("text") or ""), context.bot_user_id)
        if text and not await self.bot.manager.is_known(key):
            try:
                await set_title(_title(text))
            except SlackApiError as exc:
                log.info("could not title assistant thread %s: %s", thread, exc.response.get("error"))
        attachments, images = await self.bot.read_files(event.get("files") or [])
        # One person per assistant thread: no speaker names, as in a DM.
        incoming = Incoming(
            key, user, "", text, event_id=str(body.get("event_id") or ""), attachments=attachments, images=images
        )
        target = AssistantTarget(
            self.bot.client,
            channel,
            thread_ts=thread,
            team_id=team,
            user_id=user,
            key=key,
            edit_interval=self.bot.settings.edit_interval,
            native=self.bot.settings.native_streaming,
        )
        await self.bot.reply(incoming, target)

    def _remember(self, spot: str, is_assistant: bool) -> None:
        if len(self._threads) >= KNOWN_THREADS_LIMIT:
            self._threads.clear()
        self._threads[spot] = is_assistant


def register_assistant(bot: SlackBot) -> AssistantThreads:
    """Add the assistant middleware to ``bot.app`` (it only acts when Slack sends assistant-thread events), and
    the greeting's model select."""
    threads = AssistantThreads(bot)
    bot.app.assistant(threads.assistant)
    bot.app.action(MODEL_SELECT)(threads.choose_model)
    return threads
