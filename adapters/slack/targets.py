"""Reply targets for Slack: where one reply is shown, and how it grows.

`UpdateTarget` posts a message and rewrites it with ``chat.update`` (the default). `NativeStreamTarget`
uses Slack's native streaming (``chat.startStream`` / ``appendStream`` / ``stopStream`` through slack-sdk's
``chat_stream``) and falls back to ``chat.update`` whenever a stream cannot carry the text.
`AssistantTarget` answers in an assistant thread: while the reply has no text, its status goes to
``assistant.threads.setStatus`` instead of a placeholder message. Every message carries its text in a section
block, with the core's `Controls` as buttons under the reply's last message.

Over 400 lines: Slack's three ways of showing a growing reply, which share their blocks, limits and fallbacks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_chat_stream import AsyncChatStream
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.blocks import SECTION_TEXT_LIMIT, button_blocks, feedback_blocks, reply_blocks
from adapters.slack.mrkdwn import neutralize_markdown, to_mrkdwn
from bot.errors import MessageGone
from bot.types import Controls, Phase, ReplyStatus, SessionKey
from bot.wording import status_line

__all__ = ["UpdateTarget", "NativeStreamTarget", "AssistantTarget", "MAX_REPLY_CHARS", "assistant_status", "locate"]

log = logging.getLogger(__name__)

MAX_REPLY_CHARS = SECTION_TEXT_LIMIT
"""Characters per Slack message, counted after conversion to mrkdwn; the rest continues in a new message.

A reply's text lives in a section block (so buttons can sit under it), which holds at most 3,000 characters."""
_CLIPPED_TEXT_CHARS = 2500
_CLIPPED_MARK = "\n…"
# Refusals a second, different try mends at once.
_RETRIED_ERRORS = {"msg_too_long": "shortened", "invalid_blocks": "as plain text, without buttons"}
# Errors that no retry can mend: the message is gone (edit), or the bot cannot post here at all (post).
_GONE_ERRORS = {
    "message_not_found",
    "cant_update_message",
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "restricted_action",
    "no_permission",
    "thread_not_found",
}


def _clip(text: str, limit: int = SECTION_TEXT_LIMIT) -> str:
    # Escaping can lengthen text (``&`` → ``&amp;``); never cut inside an entity or a <link>.
    if len(text) <= limit:
        return text
    cut = text[: limit - len(_CLIPPED_MARK)]
    for opener, closer in (("&", ";"), ("<", ">")):
        start = cut.rfind(opener)
        if start != -1 and closer not in cut[start:]:
            cut = cut[:start]
    return cut + _CLIPPED_MARK


def _visible(text: str) -> str:
    # Slack shows a blank message as nothing at all (and slack-sdk warns); a new message needs something.
    return text if text.strip() else "…"


_ASSISTANT_STATUSES = {
    Phase.THINKING: "is thinking…",
    Phase.REASONING: "is thinking it through…",
    Phase.WAITING: "is finishing the previous reply…",
}


def assistant_status(status: ReplyStatus) -> str | None:
    """The assistant thread status ("<app> is thinking…") for one of the core's statuses; None for one that
    belongs in a message (the model server being retried)."""
    if status.phase is Phase.QUEUED:
        return f"is waiting in line (#{status.position})…"
    if status.phase is Phase.TOOL:
        return f"is using a tool: {status.tool}…"
    return _ASSISTANT_STATUSES.get(status.phase)


class UpdateTarget:
    """A reply shown by ``chat.postMessage`` and rewritten by ``chat.update``.

    ``thread_ts`` places the reply in a thread; without one, ``continue_in_thread`` puts continuations in
    the thread of the first message instead of the channel. ``header`` (already mrkdwn) opens the first
    message only, e.g. the question of a ``/ask``. ``replace_ts`` (Regenerate) makes the first message an
    edit of that existing message. ``key`` is the conversation the buttons act on. Every reply in one
    workspace shares its pace (``edit_interval`` between calls): Slack rate-limits these methods per
    workspace, not per message.
    """

    @property
    def asks_approval(self) -> bool:
        """Run / Deny buttons (adapters.slack.controls), which need the conversation's key."""
        return self.key is not None

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        *,
        team_id: str,
        key: SessionKey | None = None,
        thread_ts: str | None = None,
        header: str = "",
        edit_interval: float = 1.0,
        continue_in_thread: bool = False,
        replace_ts: str | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.key = key
        self.thread_ts = thread_ts
        self.header = header
        self.max_length = MAX_REPLY_CHARS - len(header)
        self.min_edit_interval = edit_interval
        self.bucket = f"slack:{team_id}"
        self.refusal: str | None = None  # Slack's error when it would not take a post
        self.continue_in_thread = continue_in_thread
        self.replace_ts = replace_ts
        self.first_ts: str | None = None

    def measure(self, text: str) -> int:
        """Length as Slack counts it: after the Markdown → mrkdwn conversion and its escaping."""
        return len(to_mrkdwn(text))

    async def post(self, text: str, controls: Controls | None = None) -> Any:
        body = self.header + to_mrkdwn(_visible(text))
        if self.replace_ts is not None:
            try:
                await self._update(self.replace_ts, body, controls, self.header)
                self.first_ts = self.replace_ts
                return self.first_ts
            except MessageGone:  # deleted meanwhile: the new answer gets a message of its own
                self.replace_ts = None
        self.first_ts = await self._post(body, self.thread_ts, controls, self.header)
        return self.first_ts

    async def post_continuation(self, text: str, controls: Controls | None = None) -> Any:
        return await self._post(to_mrkdwn(_visible(text)), self._continuation_thread(), controls)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        if not text.strip():
            return  # nothing to see yet (a first delta of " "); the next edit carries the text
        header = self.header if handle == self.first_ts else ""
        await self._update(handle, header + to_mrkdwn(text), controls, header)

    async def close(self) -> None:
        """Nothing to finish: every chat.update already carried the whole text."""

    def reference(self, handle: Any) -> str | None:
        """The message's channel and ts (and the header it opens with), for `locate`."""
        ts = handle.ts if isinstance(handle, _Message) else handle
        if ts is None:
            return None  # an assistant thread's status: no message yet
        header = [self.header] if ts == self.first_ts and self.header else []
        return json.dumps([self.channel, ts, *header])

    def _continuation_thread(self) -> str | None:
        return self.thread_ts or (self.first_ts if self.continue_in_thread else None)

    async def _post(self, text: str, thread_ts: str | None, controls: Controls | None = None, header: str = "") -> str:
        kwargs: dict[str, Any] = {
            "channel": self.channel,
            "thread_ts": thread_ts,
            "unfurl_links": False,
            "unfurl_media": False,
        }
        try:
            response = await self.client.chat_postMessage(**self._content(text, controls, header), **kwargs)
        except SlackApiError as exc:
            self.refusal = exc.response.get("error")
            if self.refusal not in _RETRIED_ERRORS:
                raise _gone(exc)  # noqa: B904 -- _gone sets the cause itself, or is exc unchanged
            log.warning("Slack refused a post (%s); sending it again %s", self.refusal, _RETRIED_ERRORS[self.refusal])
            content = self._content(text, controls, header, refused=self.refusal)
            if not content["blocks"]:
                del content["blocks"]  # a new message needs none
            response = await self.client.chat_postMessage(**content, **kwargs)
        return str(response["ts"])

    async def _update(self, ts: str, text: str, controls: Controls | None = None, header: str = "") -> None:
        try:
            await self.client.chat_update(channel=self.channel, ts=ts, **self._content(text, controls, header))
        except SlackApiError as exc:
            error = exc.response.get("error")
            if error not in _RETRIED_ERRORS:
                raise _gone(exc)  # noqa: B904 -- _gone sets the cause itself, or is exc unchanged
            log.warning("Slack refused an update (%s); sending it again %s", error, _RETRIED_ERRORS[error])
            await self.client.chat_update(
                channel=self.channel, ts=ts, **self._content(text, controls, header, refused=error)
            )

    def _content(
        self, text: str, controls: Controls | None, header: str, *, refused: str | None = None
    ) -> dict[str, Any]:
        """A message's ``text`` (what notifications and screen readers use) and the blocks it shows; after
        ``refused`` (an error from `_RETRIED_ERRORS`), the shorter or plainer form that Slack should take."""
        text = _clip(text, _CLIPPED_TEXT_CHARS if refused == "msg_too_long" else SECTION_TEXT_LIMIT)
        if refused == "invalid_blocks":  # the text alone still reaches people; [] clears blocks on an update
            return {"text": text, "blocks": []}
        return {"text": text, "blocks": reply_blocks(text, controls, self.key, header)}


def locate(client: AsyncWebClient, key: SessionKey, reference: str) -> tuple[UpdateTarget, str]:
    """A target and handle that rewrite the message at ``reference`` (`UpdateTarget.reference`) with chat.update:
    how a surviving process shows the end of a reply another process left."""
    channel, ts, *header = json.loads(reference)
    target = UpdateTarget(client, channel, team_id=key.workspace, key=key, header=header[0] if header else "")
    target.first_ts = ts
    return target, ts


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
    # "status" (no message yet: an assistant thread's status shows), "placeholder" (chat.update), "stream"
    # (appendStream) or "update" (chat.update, after a stream ended)
    mode: str = "placeholder"
    shown: str = ""  # model text the message shows now
    sent: str = ""  # neutralized Markdown already appended to the stream
    controls: Controls | None = None  # the buttons it should end with
    stream: AsyncChatStream | None = field(default=None, repr=False)


class NativeStreamTarget(UpdateTarget):
    """A reply streamed with Slack's native streaming API, for ``native_streaming = true``.

    The first message starts as an ordinary placeholder (statuses such as "queued #2" must be replaceable,
    and a stream only appends); once the reply text is growing, a stream takes over and the placeholder is
    deleted. Any change a stream cannot express (text rewritten, not extended) and a stream that Slack has
    ended (``message_not_in_streaming_state``) fall back to ``chat.update`` with the whole text. A stream
    cannot show buttons while it grows; its last message gets them (and Slack's 👍/👎) when it stops.
    """

    @property
    def asks_approval(self) -> bool:
        """A growing stream cannot show buttons: tools marked confirm = true are not offered."""
        return False

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        *,
        thread_ts: str,
        team_id: str,
        user_id: str,
        key: SessionKey | None = None,
        edit_interval: float = 1.0,
    ) -> None:
        super().__init__(client, channel, team_id=team_id, key=key, thread_ts=thread_ts, edit_interval=edit_interval)
        self.team_id = team_id
        self.user_id = user_id
        self._messages: list[_Message] = []

    async def post(self, text: str, controls: Controls | None = None) -> Any:
        message = _Message(
            ts=await self._post(to_mrkdwn(_visible(text)), self.thread_ts, controls), shown=text, controls=controls
        )
        self._messages.append(message)
        return message

    async def post_continuation(self, text: str, controls: Controls | None = None) -> Any:
        message = _Message(controls=controls)
        self._messages.append(message)
        await self._start_stream(message, text)
        return message

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        message: _Message = handle
        message.controls = controls
        if message.mode == "placeholder":
            if text != message.shown and text.startswith(message.shown) and message.shown:
                placeholder = message.ts
                await self._start_stream(message, text)
                await self._delete(placeholder)
            elif text.strip():
                await self._update(str(message.ts), to_mrkdwn(text), controls)
                message.shown = text
        elif message.mode == "stream":
            await self._append(message, text)
        elif text.strip():
            await self._update(str(message.ts), to_mrkdwn(text), controls)
            message.shown = text

    async def close(self) -> None:
        """Stop every stream still open, with its buttons, so Slack shows the messages as finished."""
        for message in self._messages:
            if message.mode == "stream" and message.stream is not None:
                try:
                    await message.stream.stop(blocks=self._final_blocks(message.controls) or None)
                except SlackApiError as exc:
                    await self._fall_back(message, message.shown, exc)
                message.mode = "update"

    def _final_blocks(self, controls: Controls | None) -> list[dict[str, Any]]:
        blocks = button_blocks(controls, self.key)
        if controls is not None and controls.reply_id is not None and self.key is not None:
            blocks += feedback_blocks(self.key, controls.reply_id)
        return blocks

    async def _start_stream(self, message: _Message, text: str) -> None:
        message.stream = await self.client.chat_stream(
            channel=self.channel,
            thread_ts=str(self.thread_ts),
            recipient_team_id=self.team_id,
            recipient_user_id=self.user_id,
            buffer_size=1,
        )  # we pace appends ourselves: flush each one
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
                await message.stream.append(markdown_text=safe[len(message.sent) :])
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
        await self._update(str(message.ts), to_mrkdwn(text), message.controls)
        message.shown = text

    async def _delete(self, ts: str | None) -> None:
        try:
            await self.client.chat_delete(channel=self.channel, ts=str(ts))
        except SlackApiError as exc:  # a leftover "Thinking…" is untidy, not worth failing the reply
            log.warning("could not delete the placeholder %s: %s", ts, exc.response.get("error"))


class AssistantTarget(NativeStreamTarget):
    """A reply in an assistant thread (Slack's AI-app surface): the status line ("is thinking…") shows through
    ``assistant.threads.setStatus`` until the reply has text, which is then streamed natively (or posted and
    updated when ``native`` is off). Slack clears the status itself once the reply appears.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        *,
        thread_ts: str,
        team_id: str,
        user_id: str,
        key: SessionKey | None = None,
        edit_interval: float = 1.0,
        native: bool = True,
    ) -> None:
        super().__init__(
            client, channel, thread_ts=thread_ts, team_id=team_id, user_id=user_id, key=key, edit_interval=edit_interval
        )
        self.native = native
        self._status_refused = False  # e.g. the app lacks assistant:write: statuses become messages

    async def post(self, text: str, controls: Controls | None = None) -> Any:
        message = _Message(mode="status", controls=controls)
        self._messages.append(message)
        await self.edit(message, text, controls)
        return message

    async def post_status(self, status: ReplyStatus, controls: Controls | None = None) -> Any:
        message = _Message(mode="status", controls=controls)
        self._messages.append(message)
        await self.edit_status(message, status, controls)
        return message

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        message: _Message = handle
        if message.mode != "status":
            await super().edit(message, text, controls)
            return
        message.controls = controls
        if not text.strip():
            return
        if self.native:
            await self._start_stream(message, text)
        else:
            message.ts = await self._post(to_mrkdwn(text), self.thread_ts, controls)
            message.mode, message.shown = "update", text

    async def edit_status(self, handle: Any, status: ReplyStatus, controls: Controls | None = None) -> None:
        message: _Message = handle
        line = status_line(status)
        if message.mode != "status":
            await super().edit(message, line, controls)
            return
        message.controls = controls
        thread_status = assistant_status(status)
        if thread_status is not None and not self._status_refused:
            try:
                await self.client.assistant_threads_setStatus(
                    channel_id=self.channel, thread_ts=str(self.thread_ts), status=thread_status
                )
                return
            except SlackApiError as exc:
                log.warning(
                    "assistant.threads.setStatus refused (%s); showing statuses as messages", exc.response.get("error")
                )
                self._status_refused = True
        # A placeholder message: a stream only appends, and the status must give way to the reply.
        message.ts = await self._post(to_mrkdwn(line), self.thread_ts, controls)
        message.mode, message.shown = ("placeholder" if self.native else "update"), line


class _Rewritten(Exception):
    """The reply's text changed in a way an append-only stream cannot show."""
