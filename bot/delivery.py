"""Delivery: brings a platform up to date with a reply, one call at a time, at the pace of its rate bucket.

The one place that paces, retries and falls back. What a reply should look like is derived from its text
(`bot.replies.split_reply`); `Delivery` compares that with what each posted message shows and makes the
next call that closes the gap: post a missing message, or edit one that differs. The producer (the engine's
stream) only sets the newest text and never waits for the platform, so status changes and text coalesce:
whatever is newest when the bucket allows a call is what gets sent. A status (`ReplyStatus`) is shown as its
`bot.wording.status_line`, or by the target's own ``post_status`` / ``edit_status`` where it has them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bot.errors import MessageGone
from bot.replies import split_reply
from bot.types import Controls, ReplyStatus, ReplyTarget
from bot.wording import status_line

__all__ = ["Delivery", "Pacer", "Pacers", "display_text"]

log = logging.getLogger(__name__)

HOLD_STATUS_SECONDS = 0.4
"""A status placeholder waits this long for the first text, so an idle engine's answer is the first post."""
GIVE_UP_AFTER_FAILURES = 6  # consecutive failed calls after which the platform is taken to be gone
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
Shown = tuple[str | ReplyStatus, Controls | None]  # what one message shows: text or a status, and its buttons


def display_text(text: str, notes: str) -> str:
    """The reply as shown: the model's text, then the bot's notes (stopped, errors) below it."""
    if not notes:
        return text
    return f"{text.rstrip()}\n\n{notes}" if text.strip() else notes


class Pacer:
    """One platform rate bucket: one call per ``interval`` on average, up to ``burst`` back to back after a quiet
    spell (a token bucket), taken in arrival order by every reply in it."""

    def __init__(
        self, interval: float, *, burst: int = 1, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        self.interval = interval
        self.burst = burst
        self._clock, self._sleep = clock, sleep
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = asyncio.Lock()  # FIFO: replies sharing a bucket take turns

    async def turn(self) -> None:
        """Wait until the bucket allows the next call, and claim it."""
        async with self._lock:
            now = self._clock()
            refill = (now - self._updated) / self.interval if self.interval > 0 else self.burst
            self._tokens, self._updated = min(self.burst, self._tokens + refill), now
            if self._tokens < 1:
                await self._sleep((1 - self._tokens) * self.interval)
                self._tokens, self._updated = 1.0, self._clock()
            self._tokens -= 1


class Pacers:
    """The process's rate buckets by name; a target without a bucket name gets a pacer of its own."""

    def __init__(self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._buckets: dict[str, Pacer] = {}

    def for_target(self, target: ReplyTarget) -> Pacer:
        bucket: str = getattr(target, "bucket", "")
        burst: int = getattr(target, "burst", 1)
        if not bucket:
            return Pacer(target.min_edit_interval, burst=burst, clock=self._clock, sleep=self._sleep)
        pacer = self._buckets.get(bucket)
        if pacer is None:
            pacer = self._buckets[bucket] = Pacer(
                target.min_edit_interval, burst=burst, clock=self._clock, sleep=self._sleep
            )
        return pacer


class Delivery:
    """Shows one reply on a `ReplyTarget`: a status until text arrives, then the text as it grows, then notes.

    `status` and `update` only record the newest state; a background task (`start`) makes the platform
    calls. `finish` records the notes and waits until the platform shows everything, or has failed.
    """

    def __init__(
        self,
        target: ReplyTarget,
        pacer: Pacer,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        hold: float = HOLD_STATUS_SECONDS,
        on_failure: Callable[[BaseException], None] | None = None,
        on_moved: Callable[[int, str], Awaitable[None]] | None = None,
    ) -> None:
        self._target = target
        self._on_failure = on_failure  # told of each platform call that fails (the metrics count them)
        # Told where the message with the buttons is (its index, the target's reference) whenever that changes.
        self._on_moved = on_moved
        self._reference: tuple[int, str] | None = None
        self._pacer = pacer
        self._measure: Callable[[str], int] = getattr(target, "measure", len)
        self._clock, self._sleep = clock, sleep
        self._hold_until = clock() + hold
        self._status: ReplyStatus | None = None
        self._text = ""
        self._notes = ""
        self._final = False
        self._controls: Controls | None = None
        self._changed = asyncio.Event()
        self._handles: list[Any] = []
        self._shown: list[Shown] = []  # what each posted message shows now
        self._task: asyncio.Task[None] | None = None
        self.failed = False
        """True once the platform refused so often that the reply cannot be shown."""

    @property
    def asks_approval(self) -> bool:
        """Whether the target shows Run / Deny buttons for a tool call (`ReplyTarget`'s ``asks_approval``)."""
        return bool(getattr(self._target, "asks_approval", False))

    # -- what to show ------------------------------------------------------------------------------------

    def status(self, status: ReplyStatus) -> None:
        """Show ``status`` (queued, thinking) while the reply has no text yet."""
        self._status = status
        self._changed.set()

    def update(self, text: str) -> None:
        """The reply's whole text so far."""
        self._text = text
        self._changed.set()

    def controls(self, controls: Controls | None) -> None:
        """The buttons to show under the reply's last message."""
        self._controls = controls
        self._changed.set()

    def wanted(self) -> list[Shown]:
        """The text or status (and buttons) each message of the reply should show now."""
        texts: list[str | ReplyStatus]
        if self._text.strip() or self._final:
            shown = display_text(self._text, self._notes)
            texts = [piece.text for piece in split_reply(shown, self._target.max_length, self._measure)]
        else:
            texts = [self._status] if self._status is not None else []
        return [(text, self._controls if i == len(texts) - 1 else None) for i, text in enumerate(texts)]

    # -- running -----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="reply delivery")

    async def finish(self, notes: str = "") -> bool:
        """Show the final text with ``notes`` below it; True once the platform shows it all."""
        self._notes, self._final = notes, True
        self._changed.set()
        self.start()
        assert self._task is not None
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if not self._task.cancelled():  # our caller was cancelled, not the delivery: pass it on
                self._task.cancel()
                raise
        return not self.failed and not self._task.cancelled()

    def cancel(self) -> None:
        """Stop making calls (the shutdown deadline has passed)."""
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        failures = 0
        while True:
            if self._next_call() is None:
                if self._final:
                    return
                await self._wait_for_change()
                continue
            if not self._handles and not self._final and not self._text.strip():
                # Only a status so far: hold it briefly, the first text may be about to arrive.
                remaining = self._hold_until - self._clock()
                if remaining > 0:
                    await self._wait_for_change(remaining)
                    continue
            await self._pacer.turn()
            call = self._next_call()  # the newest state, after waiting for the turn
            if call is None:
                continue
            try:
                await call()
            except MessageGone as exc:  # a post refused for good: the bot cannot write here at all
                self._failed_call(exc)
                log.warning("cannot show a reply here: %s", exc)
                self.failed = True
                return
            except Exception as exc:
                self._failed_call(exc)
                failures += 1
                log.warning("a platform call for a reply failed (%d in a row): %s", failures, _describe(exc))
                if failures >= GIVE_UP_AFTER_FAILURES:
                    log.error("giving up on showing a reply: the platform refused %d calls in a row", failures)
                    self.failed = True
                    return
                await self._sleep(BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS)) - 1])  # backoff, no storm
            else:
                failures = 0
                await self._moved()

    async def _moved(self) -> None:
        reference = getattr(self._target, "reference", None)
        if self._on_moved is None or reference is None or not self._handles:
            return
        where = reference(self._handles[-1])
        if where is not None and (len(self._handles) - 1, where) != self._reference:
            self._reference = (len(self._handles) - 1, where)
            await self._on_moved(*self._reference)

    def _failed_call(self, exc: BaseException) -> None:
        if self._on_failure is not None:
            self._on_failure(exc)

    async def _wait_for_change(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return
        self._changed.clear()

    def _next_call(self) -> Callable[[], Awaitable[None]] | None:
        """The one platform call that brings the reply closest to what it should show, or None if it does."""
        for index, shown in enumerate(self.wanted()):
            if index >= len(self._handles):
                return lambda: self._post(index, shown)
            if self._shown[index] != shown:
                return lambda: self._edit(index, shown)
        return None

    async def _post(self, index: int, shown: Shown) -> None:
        content, controls = shown
        post_status = getattr(self._target, "post_status", None)
        if isinstance(content, ReplyStatus) and post_status is not None:
            self._handles.append(await post_status(content, controls))
        else:
            post = self._target.post if index == 0 else self._target.post_continuation
            self._handles.append(await post(_text(content), controls))
        self._shown.append(shown)

    async def _edit(self, index: int, shown: Shown) -> None:
        content, controls = shown
        edit_status = getattr(self._target, "edit_status", None)
        try:
            if isinstance(content, ReplyStatus) and edit_status is not None:
                await edit_status(self._handles[index], content, controls)
            else:
                await self._target.edit(self._handles[index], _text(content), controls)
        except MessageGone as gone:
            # Deleted, or no longer editable: the text goes into a new message rather than being lost.
            log.info("a reply's message is gone (%s); showing its text in a new message", gone)
            self._handles[index] = await self._target.post_continuation(_text(content), controls)
        self._shown[index] = shown


def _text(content: str | ReplyStatus) -> str:
    return status_line(content) if isinstance(content, ReplyStatus) else content


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]
