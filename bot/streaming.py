"""Streaming reply policy: turns a growing reply into the posts and edits a platform should make.

Platform-free and per reply: it only knows the target's ``max_length`` and ``min_edit_interval``. Interim
edits are skipped while the interval has not passed (the next one carries all text anyway); edits that
must happen (a status change, a finished message) wait for the interval instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bot.types import ReplyTarget

__all__ = ["StreamingReply", "split_message"]

log = logging.getLogger(__name__)

_FENCE_LINE = re.compile(r"^ {0,3}(```+|~~~+)(.*)$", re.MULTILINE)
_CLOSING_FENCE_ROOM = 4  # "\n```"
FINAL_EDIT_ATTEMPTS = 3  # a status or final text is retried this often before it is posted anew


def _open_fence(text: str) -> str | None:
    """The opening line of a code fence left open at the end of ``text``, or None if all are closed."""
    opening: str | None = None
    for match in _FENCE_LINE.finditer(text):
        if opening is None:
            opening = match.group(0).strip()
        elif match.group(1)[0] == opening[0] and not match.group(2).strip():
            opening = None
    return opening


def split_message(text: str, limit: int, measure: Callable[[str], int] = len) -> tuple[str, str]:
    """Cut ``text`` into a head of at most ``limit`` (as ``measure`` counts) and the rest.

    The cut falls on a paragraph, line or word boundary when one is near enough; a cut inside a fenced code
    block closes the fence in the head and reopens it (same language) at the start of the rest.
    """
    room = limit - _CLOSING_FENCE_ROOM
    fits, too_long = 0, len(text) + 1  # the longest prefix that fits, by bisection (measure grows with text)
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if measure(text[:middle]) <= room:
            fits = middle
        else:
            too_long = middle
    window = text[:fits]
    for separator, not_before in (("\n\n", limit // 2), ("\n", limit // 3), (" ", 1)):
        cut = window.rfind(separator)
        if cut >= not_before:
            head, rest = text[:cut], text[cut + len(separator):]
            break
    else:
        head, rest = window, text[len(window):]
    fence = _open_fence(head)
    if fence is not None:
        head = head.rstrip("\n") + "\n" + fence[:3]
        rest = fence + "\n" + rest
    return head, rest


class StreamingReply:
    """Shows one reply on a `ReplyTarget` as it grows: status first, then throttled edits, then the final text."""

    def __init__(self, target: ReplyTarget, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self._target = target
        # A platform whose text grows when sent (escaping) counts length its own way.
        self._measure: Callable[[str], int] = getattr(target, "measure", len)
        self._clock = clock
        self._sleep = sleep
        self._sealed: list[str] = []  # texts of earlier messages, final
        self._text = ""  # the current message's text
        self._handle: Any = None
        self._posted = False
        self._shown: str | None = None  # what the current message shows now
        self._last_edit = 0.0

    @property
    def text(self) -> str:
        """The whole reply so far, without status lines (after `finish`, with its note)."""
        return "".join(self._sealed) + self._text

    async def status(self, line: str) -> None:
        """Show a status line (queued, thinking) while no reply text has arrived yet."""
        if self._text or self._sealed:
            return
        if not self._posted:
            await self._post_first(line)
        else:
            await self._edit(line, wait=True)

    async def append(self, delta: str) -> None:
        """Add generated text; edits the message if the interval has passed, moves on past the length limit."""
        self._text += delta
        if self._posted and self._clock() - self._last_edit < self._target.min_edit_interval:
            return  # nothing is shown until the next edit, so the (possibly costly) length check can wait too
        await self._seal_full_messages()
        if not self._posted:
            await self._post_first(self._text)
        elif self._text and self._clock() - self._last_edit >= self._target.min_edit_interval:
            await self._edit(self._text, wait=False)

    async def finish(self, note: str = "") -> None:
        """Show the complete text at once (after the interval), with ``note`` (an error, a warning) below it."""
        if note:
            self._text = f"{self._text.rstrip()}\n\n{note}" if self._text.strip() else note
        await self._seal_full_messages()
        if not self._posted:
            await self._post_first(self._text)
        else:
            await self._edit(self._text, wait=True)

    async def _seal_full_messages(self) -> None:
        while self._measure(self._text) > self._target.max_length:
            head, rest = split_message(self._text, self._target.max_length, self._measure)
            if not self._posted:
                await self._post_first(head)
            else:
                await self._edit(head, wait=True)
            self._sealed.append(head)
            self._text = rest
            self._handle = await self._target.post_continuation(rest[:self._target.max_length] or "…")
            self._shown = rest
            self._last_edit = self._clock()

    async def _post_first(self, text: str) -> None:
        self._handle = await self._target.post(text)
        self._posted = True
        self._shown = text
        self._last_edit = self._clock()

    async def _edit(self, text: str, *, wait: bool) -> None:
        if text == self._shown:
            return
        if wait:
            delay = self._last_edit + self._target.min_edit_interval - self._clock()
            if delay > 0:
                await self._sleep(delay)
        for attempt in range(FINAL_EDIT_ATTEMPTS if wait else 1):
            if attempt:
                await self._sleep(max(1.0, self._target.min_edit_interval))
            try:
                await self._target.edit(self._handle, text)
            except Exception:  # the platform failed after its own retries; the next edit carries all text
                log.warning("editing a reply failed (attempt %d)", attempt + 1, exc_info=True)
            else:
                self._shown = text
                self._last_edit = self._clock()
                return
        self._last_edit = self._clock()
        if wait:  # a text that must be shown could not be edited in: post it rather than lose it
            self._handle = await self._target.post_continuation(text)
            self._shown = text
