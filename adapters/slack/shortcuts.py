"""Message shortcuts: "Ask llamarelay about it" (a modal asks the question) and "Summarize thread".

Both answer in the thread of the message they were used on, and that thread becomes (or continues) the
conversation, as a mention answered there would. Refusals and failures are shown only to the person who used
the shortcut, through the shortcut's ``response_url``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from slack_bolt.async_app import AsyncAck, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook.async_client import AsyncWebhookClient

from adapters.slack.mrkdwn import escape, from_slack
from adapters.slack.sessions import session_key
from adapters.slack.targets import UpdateTarget
from bot.access import Action
from bot.context import ask_about, summarize
from bot.text import one_line
from bot.types import Incoming

if TYPE_CHECKING:
    from adapters.slack.bot import SlackBot

__all__ = [
    "register_shortcuts",
    "MessageShortcuts",
    "ASK_ABOUT",
    "SUMMARIZE",
    "ASK_VIEW",
    "QUESTION_BLOCK",
    "QUESTION_INPUT",
    "view_metadata",
]

log = logging.getLogger(__name__)

ASK_ABOUT = "llamarelay_ask_about"  # callback ids: must match the app manifest
SUMMARIZE = "llamarelay_summarize"
ASK_VIEW = "llamarelay_ask_about_question"
QUESTION_BLOCK, QUESTION_INPUT = "question", "text"
METADATA_LIMIT = 3000  # a modal's private_metadata
PREVIEW_CHARS = 300
REPLIES_PAGE = 200  # conversations.replies page size
MAX_PAGES = 50
CANNOT_POST = "⚠️ I can't post in this conversation (`{error}`). Invite me with `/invite @llamarelay`, or DM me."
CANNOT_READ = (
    "⚠️ I can't read this conversation (`{error}`). Invite me with `/invite @llamarelay` "
    "(a private channel or DM needs the matching history scope)."
)


def _preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    return one_line(text, limit)


def view_metadata(fields: dict[str, Any], text: str) -> str:
    """``fields`` plus the message ``text``, as JSON within a modal's private_metadata limit (text cut if need be)."""
    while True:
        metadata = json.dumps({**fields, "x": text}, ensure_ascii=False)
        if len(metadata) <= METADATA_LIMIT or not text:
            return metadata
        text = text[: len(text) * 4 // 5].rstrip() + "…"


class MessageShortcuts:
    """Shortcut and modal handlers, registered on the bot's AsyncApp by `register_shortcuts`."""

    def __init__(self, bot: SlackBot) -> None:
        self.bot = bot

    # -- Ask llamarelay about it -------------------------------------------------------------------------

    async def ask_about(self, ack: AsyncAck, shortcut: dict[str, Any], respond: AsyncRespond) -> None:
        """The shortcut: a modal asking for the question, carrying the message along."""
        await ack()
        user, channel, message = shortcut["user"]["id"], shortcut["channel"]["id"], shortcut.get("message") or {}
        if refusal := await self.bot.refusal(user, channel):
            await respond(text=refusal, response_type="ephemeral")
            return
        author = await self._author(message)
        text = from_slack(str(message.get("text") or ""))
        metadata = view_metadata(
            {
                "c": channel,
                "t": message.get("thread_ts") or message.get("ts"),
                "a": author,
                "r": shortcut.get("response_url"),
            },
            text,
        )
        await self.bot.client.views_open(
            trigger_id=shortcut["trigger_id"],
            view={
                "type": "modal",
                "callback_id": ASK_VIEW,
                "private_metadata": metadata,
                "title": {"type": "plain_text", "text": "Ask llamarelay"},
                "submit": {"type": "plain_text", "text": "Ask"},
                "close": {"type": "plain_text", "text": "Cancel"},
                "blocks": [
                    {
                        "type": "context",
                        "elements": [
                            {
                                "type": "mrkdwn",
                                "verbatim": True,
                                "text": f"*{escape(author)}* wrote: {escape(_preview(text))}",
                            }
                        ],
                    },
                    {
                        "type": "input",
                        "block_id": QUESTION_BLOCK,
                        "optional": True,
                        "label": {"type": "plain_text", "text": "Your question"},
                        "element": {
                            "type": "plain_text_input",
                            "action_id": QUESTION_INPUT,
                            "multiline": True,
                            "placeholder": {"type": "plain_text", "text": "What do you make of this message?"},
                        },
                    },
                ],
            },
        )

    async def ask_submitted(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        """The modal's submission: the quoted message and the question, answered in the message's thread."""
        await ack()  # closes the modal
        meta = json.loads(view.get("private_metadata") or "{}")
        value = ((view.get("state") or {}).get("values") or {}).get(QUESTION_BLOCK, {}).get(QUESTION_INPUT, {})
        question = from_slack(str(value.get("value") or ""))
        user, team = body["user"]["id"], str((body.get("team") or {}).get("id") or body["user"].get("team_id", ""))
        channel, thread = str(meta.get("c") or ""), str(meta.get("t") or "")
        if not channel or not thread:
            return
        await self._answer(
            user,
            team,
            channel,
            thread,
            meta.get("r"),
            ("asked about a message", question),
            ask_about(str(meta.get("a") or "someone"), str(meta.get("x") or ""), question),
        )

    # -- Summarize thread ---------------------------------------------------------------------------------

    async def summarize(self, ack: AsyncAck, shortcut: dict[str, Any], respond: AsyncRespond) -> None:
        """The thread of the message (its newest ``summarize_messages``), summarized in that thread."""
        await ack()
        user, channel, message = shortcut["user"]["id"], shortcut["channel"]["id"], shortcut.get("message") or {}
        team = str((shortcut.get("team") or {}).get("id") or "")
        if refusal := await self.bot.refusal(user, channel):
            await respond(text=refusal, response_type="ephemeral")
            return
        thread = str(message.get("thread_ts") or message.get("ts") or "")
        limits = self.bot.manager.limits
        try:
            messages = await self._thread(channel, thread, limits.summarize_messages)
        except SlackApiError as exc:
            await respond(text=CANNOT_READ.format(error=exc.response.get("error")), response_type="ephemeral")
            return
        authors = await asyncio.gather(*(self._author(m) for m in messages))
        said = [
            (author, text)
            for author, m in zip(authors, messages, strict=True)
            if (text := from_slack(str(m.get("text") or "")))
        ]
        await self._answer(
            user,
            team,
            channel,
            thread,
            shortcut.get("response_url"),
            ("asked for a summary of this thread", ""),
            summarize(said, limits.summarize_chars),
        )

    async def _thread(self, channel: str, ts: str, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` messages of the thread at ``ts`` (its first message included), oldest first."""
        messages: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await self.bot.client.conversations_replies(
                channel=channel, ts=ts, limit=REPLIES_PAGE, cursor=cursor
            )
            messages = (messages + list(page.get("messages") or []))[-limit:]
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not page.get("has_more") or not cursor:
                break
        return messages

    # -- shared ---------------------------------------------------------------------------------------------

    async def _author(self, message: dict[str, Any]) -> str:
        if user := message.get("user"):
            return await self.bot.display_name(str(user), message.get("user_profile"))
        return str(message.get("username") or (message.get("bot_profile") or {}).get("name") or "a bot")

    async def _answer(
        self,
        user: str,
        team: str,
        channel: str,
        thread: str,
        response_url: str | None,
        heading: tuple[str, str],
        prompt: str,
    ) -> None:
        """Answer ``prompt`` for ``user`` in the thread, under a line saying who asked what:
        ``heading`` is (what they did, the words they asked with, if any)."""
        if refusal := await self.bot.refusal(user, channel, Action.ASK):
            await _tell(response_url, refusal)
            return
        name = await self.bot.display_name(user)
        did, words = heading
        header = f"*{escape(name)} {did}:* {escape(_preview(words, 200))}" if words else f"*{escape(name)} {did}.*"
        key = session_key(team, channel, user, thread)
        target = UpdateTarget(
            self.bot.client,
            channel,
            team_id=team,
            key=key,
            thread_ts=thread,
            header=header + "\n\n",
            edit_interval=self.bot.settings.edit_interval,
        )
        result = await self.bot.reply(Incoming(key, user, name, prompt), target)
        if not result.delivered and target.first_ts is None:  # nothing visible happened: say why, to them only
            await _tell(response_url, CANNOT_POST.format(error=target.refusal))


async def _tell(response_url: str | None, text: str) -> None:
    if not response_url:
        return
    try:
        await AsyncWebhookClient(response_url).send(text=text, response_type="ephemeral", replace_original=False)
    except Exception as exc:  # the response_url expired or Slack is unreachable: nothing more to do
        log.info("could not answer through a response_url: %s", exc)


def register_shortcuts(bot: SlackBot) -> MessageShortcuts:
    """Register the message shortcuts and the question modal on ``bot.app`` (ids must match the manifest)."""
    shortcuts = MessageShortcuts(bot)
    bot.app.message_shortcut(ASK_ABOUT)(shortcuts.ask_about)
    bot.app.message_shortcut(SUMMARIZE)(shortcuts.summarize)
    bot.app.view_submission(ASK_VIEW)(shortcuts.ask_submitted)
    return shortcuts
