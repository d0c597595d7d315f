"""Reply targets for Slack: where one reply is shown, and how it grows.

`UpdateTarget` posts a message and rewrites it with ``chat.update`` (the default). `NativeStreamTarget`
uses Slack's native streaming (``chat.startStream`` / ``appendStream`` / ``stopStream`` through slack-sdk's
``chat_stream``) and falls back to ``chat.update`` whenever a stream cannot carry the text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_chat_stream import AsyncChatStream
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.mrkdwn import neutralize_markdown, to_mrkdwn
from bot.errors import MessageGone
from bot.types import Controls

__all__ = ["UpdateTarget", "NativeStreamTarget", "MAX_REPLY_CHARS", "SLACK_TEXT_LIMIT"]

log = logging.getLogger(__name__)

MAX_REPLY_CHARS = 3500
"""Characters per Slack message, counted after conversion to mrkdwn; the rest continues in a new message."""
SLACK_TEXT_LIMIT = 3900
"""Slack answers ``msg_too_long`` near 4,000 characters, well below its documented 40,000."""
_CLIPPED_TEXT_CHARS = 3000
_CLIPPED_MARK = "\n…"
# Errors that no retry can mend: the message is gone (edit), or the bot cannot post here at all (post).
_GONE_ERRORS = {"message_not_found", "cant_update_message", "channel_not_found", "not_in_channel", "is_archived",
                "restricted_action", "no_permission", "thread_not_found"}


def _clip(text: str, limit: int = SLACK_TEXT_LIMIT) -> str:
    # Escaping can lengthen text (``&`` → ``&amp;``); never cut inside an entity or a <link>.
    if len(text) <= limit:
        return text
    cut = text[:limit - len(_CLIPPED_MARK)]
    for opener, closer in (("&", ";"), ("<", ">")):
        start = cut.rfind(opener)
        if start != -1 and closer not in cut[start:]:
            cut = cut[:start]
    return cut + _CLIPPED_MARK


def _visible(text: str) -> str:
    # Slack shows a blank message as nothing at all (and slack-sdk warns); a new message needs something.
    return text if text.strip() else "…"


class UpdateTarget:
    """A reply shown by ``chat.postMessage`` and rewritten by ``chat.update``.

    ``thread_ts`` places the reply in a thread; without one, ``continue_in_thread`` puts continuations in
    the thread of the first message instead of the channel. ``header`` (already mrkdwn) opens the first
    message only, e.g. the question of a ``/ask``. Every reply in one workspace shares its pace
    (``edit_interval`` between calls): Slack rate-limits these methods per workspace, not per message.
    """

    def __init__(self, client: AsyncWebClient, channel: str, *, team_id: str, thread_ts: str | None = None,
                 header: str = "", edit_interval: float = 1.0, continue_in_thread: bool = False) -> None:
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.header = header
        self.max_length = MAX_REPLY_CHARS - len(header)
        self.min_edit_interval = edit_interval
        self.bucket = f"slack:{team_id}"
        self.refusal: str | None = None  # Slack's error when it would not take a post
        self.continue_in_thread = continue_in_thread
        self.first_ts: str | None = None

    def measure(self, text: str) -> int:
        """Length as Slack counts it: after the Markdown → mrkdwn conversion and its escaping."""
        return len(to_mrkdwn(text))

    async def post(self, text: str, controls: Controls | None = None) -> Any:
        ts = await self._post(self.header + to_mrkdwn(_visible(text)), self.thread_ts)
        self.first_ts = ts
        return ts

    async def post_continuation(self, text: str, controls: Controls | None = None) -> Any:
        return await self._post(to_mrkdwn(_visible(text)), self._continuation_thread())

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        if not text.strip():
            return  # nothing to see yet (a first delta of " "); the next edit carries the text
        header = self.header if handle == self.first_ts else ""
        await self._update(handle, header + to_mrkdwn(text))

    async def close(self) -> None:
        """Nothing to finish: every chat.update already carried the whole text."""

    def _continuation_thread(self) -> str | None:
        return self.thread_ts or (self.first_ts if self.continue_in_thread else None)

    async def _post(self, text: str, thread_ts: str | None) -> str:
        kwargs: dict[str, Any] = {"channel": self.channel, "thread_ts": thread_ts,
                                  "unfurl_links": False, "unfurl_media": False}
        try:
            response = await self.client.chat_postMessage(text=_clip(text), **kwargs)
        except SlackApiError as exc:
            self.refusal = exc.response.get("error")
            if self.refusal != "msg_too_long":
                raise _gone(exc)
            response = await self.client.chat_postMessage(text=_clip(text, _CLIPPED_TEXT_CHARS), **kwargs)
        return str(response["ts"])

    async def _update(self, ts: str, text: str) -> None:
        try:
            await self.client.chat_update(channel=self.channel, ts=ts, text=_clip(text))
        except SlackApiError as exc:
            if exc.response.get("error") != "msg_too_long":
                raise _gone(exc)
            log.warning("Slack refused %d characters as too long; sending a shortened text", len(text))
            await self.client.chat_update(channel=self.channel, ts=ts, text=_clip(text, _CLIPPED_TEXT_CHARS))


def _gone(exc: SlackApiError) -> Exception:
    """The exception to raise for a failed call: `MessageGone` when no retry can mend it."""
    error = exc.response.get("error")
    if error in _GONE_ERRORS:
        gone = MessageGone(f"slack: {error}")
        gone.__cause__ = exc
        return gone
    return exc


@dataclass
class _Message:
    """One message of a natively streamed reply."""

    ts: str | None = None
    mode: str = "placeholder"  # "placeholder" (chat.update), "stream" (appendStream) or "update"
    shown: str = ""  # model text the message shows now
    sent: str = ""  # neutralized Markdown already appended to the stream
    stream: AsyncChatStream | None = field(default=None, repr=False)


class NativeStreamTarget(UpdateTarget):
    """A reply streamed with Slack's native streaming API, for ``native_streaming = true``.

    The first message starts as an ordinary placeholder (statuses such as "queued #2" must be replaceable,
    and a stream only appends); once the reply text is growing, a stream takes over and the placeholder is
    deleted. Any change a stream cannot express (text rewritten, not extended) and a stream that Slack has
    ended (``message_not_in_streaming_state``) fall back to ``chat.update`` with the whole text.
    """

    def __init__(self, client: AsyncWebClient, channel: str, *, thread_ts: str, team_id: str, user_id: str,
                 edit_interval: float = 1.0) -> None:
        super().__init__(client, channel, team_id=team_id, thread_ts=thread_ts, edit_interval=edit_interval)
        self.team_id = team_id
        self.user_id = user_id
        self._messages: list[_Message] = []

    async def post(self, text: str, controls: Controls | None = None) -> Any:
        message = _Message(ts=await self._post(to_mrkdwn(_visible(text)), self.thread_ts), shown=text)
        self._messages.append(message)
        return message

    async def post_continuation(self, text: str, controls: Controls | None = None) -> Any:
        message = _Message()
        self._messages.append(message)
        await self._start_stream(message, text)
        return message

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        message: _Message = handle
        if message.mode == "placeholder":
            if text != message.shown and text.startswith(message.shown) and message.shown:
                placeholder = message.ts
                await self._start_stream(message, text)
                await self._delete(placeholder)
            elif text.strip():
                await self._update(str(message.ts), to_mrkdwn(text))
                message.shown = text
        elif message.mode == "stream":
            await self._append(message, text)
        elif text.strip():
            await self._update(str(message.ts), to_mrkdwn(text))
            message.shown = text

    async def close(self) -> None:
        """Stop every stream still open, so Slack shows the messages as finished."""
        for message in self._messages:
            if message.mode == "stream" and message.stream is not None:
                try:
                    await message.stream.stop()
                except SlackApiError as exc:
                    await self._fall_back(message, message.shown, exc)
                message.mode = "update"

    async def _start_stream(self, message: _Message, text: str) -> None:
        message.stream = await self.client.chat_stream(
            channel=self.channel, thread_ts=str(self.thread_ts), recipient_team_id=self.team_id,
            recipient_user_id=self.user_id, buffer_size=1)  # we pace appends ourselves: flush each one
        safe = neutralize_markdown(text)
        await message.stream.append(markdown_text=safe)
        message.ts, message.mode, message.shown, message.sent = message.stream.ts, "stream", text, safe

    async def _append(self, message: _Message, text: str) -> None:
        assert message.stream is not None
        safe = neutralize_markdown(text)
        try:
            if not safe.startswith(message.sent):
                # A stream can only grow; stop it and show the rewritten text with chat.update.
                await message.stream.stop()
                raise _Rewritten
            if safe != message.sent:
                await message.stream.append(markdown_text=safe[len(message.sent):])
        except (SlackApiError, _Rewritten) as exc:
            await self._fall_back(message, text, exc)
            return
        message.shown, message.sent = text, safe

    async def _fall_back(self, message: _Message, text: str, cause: Exception) -> None:
        error = cause.response.get("error") if isinstance(cause, SlackApiError) else "text rewritten"
        if isinstance(cause, SlackApiError) and error != "message_not_in_streaming_state":
            raise cause
        log.info("Slack stream %s ended (%s); finishing it with chat.update", message.ts, error)
        message.mode = "update"
        await self._update(str(message.ts), to_mrkdwn(text))
        message.shown = text

    async def _delete(self, ts: str | None) -> None:
        try:
            await self.client.chat_delete(channel=self.channel, ts=str(ts))
        except SlackApiError as exc:  # a leftover "Thinking…" is untidy, not worth failing the reply
            log.warning("could not delete the placeholder %s: %s", ts, exc.response.get("error"))


class _Rewritten(Exception):
    """The reply's text changed in a way an append-only stream cannot show."""
