"""The web page's reply target: turns the core's whole-text edits into Server-Sent Events.

The core streams a reply as "post, then edit with the whole text" (see `bot.types.ReplyTarget`). An event
stream can only append, so `EventStreamTarget` sends each edit as the part not sent yet (``delta``), or the
whole text again (``replace``) in the rare case an edit is not an extension of what was sent (a status line
giving way to the reply, a trailing space trimmed before a note). The core's typed statuses shown before
the reply starts (thinking, reasoning, waiting, queued #n, retrying) become ``status`` events, so the page
never mistakes them for text. A Continue's stream opens with the answer so far (``replace``): the core shows
only what it adds. A tool call waiting for Run / Deny sends ``approval`` (its id, answered with
``POST …/approvals/{id}``; ``null`` once it no longer waits); ``done`` says whether the reply's tool calls can be
expanded (``tool_details``, fetched from ``GET …/replies/{id}/tools``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

from bot.conversations import ReplyResult
from bot.types import Controls, ReplyStatus
from bot.wording import status_line

__all__ = ["EventStreamTarget", "encode_event", "json_dumps"]

_SURROGATE = re.compile("[\ud800-\udfff]")

KEEPALIVE_SECONDS = 15.0  # an SSE comment this often keeps proxies from closing a long queue wait

_END = object()


def json_dumps(value: Any) -> str:
    """JSON with ``<``, ``>`` and ``&`` as \\u escapes: no response body ever holds raw markup. A lone
    surrogate (which UTF-8 cannot encode) travels as its \\u escape too, so any text can be sent."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def encode_event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE frame. ``json_dumps`` never emits a newline, so one ``data:`` line holds it all."""
    return f"event: {name}\ndata: {json_dumps(data)}\n\n".encode()


class EventStreamTarget:
    """A `bot.types.ReplyTarget` that queues SSE events for one reply; `events` hands them to the response.

    The target never blocks and never raises, so a slow or vanished browser cannot hold up or break the
    reply: the core finishes and stores it either way.
    """

    max_length = sys.maxsize  # one bubble holds the whole reply: no continuation messages
    asks_approval = True  # the page shows Run / Deny on an ``approval`` event

    def __init__(self, *, min_edit_interval: float, prefix: str = "") -> None:
        self.min_edit_interval = min_edit_interval
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._prefix = prefix  # Continue: the answer so far, which the core's text extends
        self._parts: list[str] = []  # text of each message the core posted (one, unless an edit failed)
        self._sent = ""  # reply text the page has been sent
        self._replying = False  # True once real reply text has appeared
        self._approval: str | None = None  # the approval request the page was last told of
        if prefix:
            self._queue.put_nowait(("replace", {"text": prefix}))
            self._sent = prefix

    # -- ReplyTarget -----------------------------------------------------------------------------------

    async def post(self, text: str, controls: Controls | None = None) -> int:
        self._parts.append("")
        handle = len(self._parts) - 1
        await self.edit(handle, text, controls)
        return handle

    async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
        return await self.post(text, controls)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        self._replying = True
        self._parts[handle] = text
        self._send_text(self._prefix + "".join(self._parts))
        self._send_approval(controls)

    async def post_status(self, status: ReplyStatus, controls: Controls | None = None) -> int:
        self._parts.append("")
        handle = len(self._parts) - 1
        await self.edit_status(handle, status, controls)
        return handle

    async def edit_status(self, handle: Any, status: ReplyStatus, controls: Controls | None = None) -> None:
        if self._replying or len(self._parts) != 1:  # once the reply has begun, a status is text like any other
            await self.edit(handle, status_line(status), controls)
            return
        self._queue.put_nowait(
            ("status", {"kind": status.phase.value, "text": status_line(status), "position": status.position})
        )
        self._send_approval(controls)

    # -- the event stream -------------------------------------------------------------------------------

    def _send_approval(self, controls: Controls | None) -> None:
        approval = controls.approval if controls is not None else None
        if approval != self._approval:
            self._queue.put_nowait(("approval", {"id": approval}))
            self._approval = approval

    def _send_text(self, text: str) -> None:
        if text == self._sent:
            return
        if text.startswith(self._sent):
            self._queue.put_nowait(("delta", {"text": text[len(self._sent) :]}))
        else:
            self._queue.put_nowait(("replace", {"text": text}))
        self._sent = text

    def close(self, result: ReplyResult | None, error: str | None = None) -> None:
        """Queue the closing ``done`` event (``result`` is None when the reply could not be produced)."""
        if result is None:
            done: dict[str, Any] = {
                "status": "failed",
                "text": self._sent,
                "notes": [error or "The reply failed."],
                "reply_id": None,
                "can_continue": False,
                "stored": False,
                "tool_details": False,
            }
        else:
            done = {
                "status": result.status,
                "text": result.text,
                "notes": list(result.notes),
                "reply_id": result.reply_id,
                "can_continue": result.can_continue,
                "stored": result.stored,
                "tool_details": result.tool_details,
            }
        self._queue.put_nowait(("done", done))
        self._queue.put_nowait(_END)

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]] | None]:
        """Yield queued events until ``done``; None means "nothing for a while: send a keep-alive"."""
        while True:
            try:
                event = await asyncio.wait_for(self._queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield None
                continue
            if event is _END:
                return
            yield event
