"""Delivery: the one place that paces, retries and falls back. Real time, short intervals, no model needed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bot.delivery import Delivery, Pacer, Pacers, display_text
from bot.errors import MessageGone
from bot.replies import split_reply
from bot.types import Controls, Phase, ReplyStatus


class RecordingTarget:
    """A ReplyTarget that records every call with the time it happened."""

    def __init__(self, max_length: int = 2000, min_edit_interval: float = 0.05, bucket: str = "") -> None:
        self.max_length = max_length
        self.min_edit_interval = min_edit_interval
        self.bucket = bucket
        self.messages: list[str] = []
        self.calls: list[tuple[str, float, int, str]] = []
        self.failing_edits = 0
        self.gone: set[int] = set()
        self.refuse_posts = False

    async def post(self, text: str, controls: Controls | None = None) -> int:
        return self._new("post", text)

    async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
        return self._new("continue", text)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        if handle in self.gone:
            raise MessageGone("deleted by a user")
        if self.failing_edits:
            self.failing_edits -= 1
            raise RuntimeError("502 Bad Gateway")
        assert len(text) <= self.max_length
        self.messages[handle] = text
        self.calls.append(("edit", time.monotonic(), handle, text))

    def _new(self, kind: str, text: str) -> int:
        if self.refuse_posts:
            raise MessageGone("not_in_channel")
        assert len(text) <= self.max_length
        self.messages.append(text)
        self.calls.append((kind, time.monotonic(), len(self.messages) - 1, text))
        return len(self.messages) - 1


def delivery(target: RecordingTarget, pacers: Pacers | None = None, **options: Any) -> Delivery:
    return Delivery(target, (pacers or Pacers()).for_target(target), **options)


async def test_first_text_is_the_first_post_when_it_comes_quickly() -> None:
    target = RecordingTarget()
    reply = delivery(target)
    reply.status(ReplyStatus(Phase.THINKING))
    reply.start()
    await asyncio.sleep(0.05)
    reply.update("Hello")
    await reply.finish()
    assert [(kind, text) for kind, _, _, text in target.calls] == [("post", "Hello")]


class StatusTarget(RecordingTarget):
    """A target that shows statuses its own way (as the web page and Slack's assistant threads do)."""

    def __init__(self) -> None:
        super().__init__(min_edit_interval=0.0)
        self.statuses: list[ReplyStatus] = []

    async def post_status(self, status: ReplyStatus, controls: Controls | None = None) -> int:
        self.statuses.append(status)
        return self._new("post_status", "")

    async def edit_status(self, handle: Any, status: ReplyStatus, controls: Controls | None = None) -> None:
        self.statuses.append(status)


async def test_a_target_with_its_own_status_display_gets_typed_statuses_and_text_apart() -> None:
    target = StatusTarget()
    reply = delivery(target, hold=0.0)
    reply.status(ReplyStatus(Phase.QUEUED, 2))
    reply.start()
    await asyncio.sleep(0.05)
    reply.status(ReplyStatus(Phase.THINKING))
    await asyncio.sleep(0.05)
    reply.update("💭 Thinking…")  # the model's own words, however much they look like a status line
    await reply.finish()
    assert target.statuses == [ReplyStatus(Phase.QUEUED, 2), ReplyStatus(Phase.THINKING)]
    assert [(kind, text) for kind, _, _, text in target.calls] == [("post_status", ""), ("edit", "💭 Thinking…")]


async def test_status_is_shown_when_no_text_comes_within_the_hold() -> None:
    target = RecordingTarget()
    reply = delivery(target, hold=0.1)
    started = time.monotonic()
    reply.status(ReplyStatus(Phase.QUEUED, 2))
    reply.start()
    await asyncio.sleep(0.3)
    assert target.messages == ["⏳ Queued: #2 in line…"]
    assert target.calls[0][1] - started >= 0.09
    reply.update("Answer")
    await reply.finish()
    assert target.messages == ["Answer"]


async def test_status_updates_coalesce_to_the_newest() -> None:
    target = RecordingTarget(min_edit_interval=0.3)
    reply = delivery(target, hold=0)
    reply.status(ReplyStatus(Phase.QUEUED, 3))
    reply.start()
    await asyncio.sleep(0.05)  # posted; the next call must wait 0.3 s
    for position in (2, 1):
        reply.status(f"⏳ Queued: #{position} in line…")
    reply.status(ReplyStatus(Phase.THINKING))
    await asyncio.sleep(0.4)
    assert [text for _, _, _, text in target.calls] == ["⏳ Queued: #3 in line…", "💭 Thinking…"]
    reply.update("Done.")
    await reply.finish()


async def test_replies_in_one_bucket_share_its_pace() -> None:
    pacers = Pacers()
    targets = [RecordingTarget(min_edit_interval=0.1, bucket="discord:channel:1") for _ in range(3)]
    replies = [delivery(target, pacers, hold=0) for target in targets]
    for reply in replies:
        reply.start()
    for step in range(6):
        for i, reply in enumerate(replies):
            reply.update(f"reply {i} " + "word " * step)
        await asyncio.sleep(0.05)
    await asyncio.gather(*(reply.finish() for reply in replies))
    times = sorted(t for target in targets for _, t, _, _ in target.calls)
    assert len(times) >= 6
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.095  # one call per interval for the whole bucket
    for i, target in enumerate(targets):
        assert target.messages == [f"reply {i} " + "word " * 5]


async def test_own_bucket_when_the_target_names_none() -> None:
    pacers = Pacers()
    first, second = RecordingTarget(min_edit_interval=10), RecordingTarget(min_edit_interval=10)
    assert pacers.for_target(first) is not pacers.for_target(second)
    shared = [RecordingTarget(bucket="slack:T1") for _ in range(2)]
    assert pacers.for_target(shared[0]) is pacers.for_target(shared[1])


async def test_pacer_spaces_turns() -> None:
    pacer = Pacer(0.05)
    times = []
    for _ in range(4):
        await pacer.turn()
        times.append(time.monotonic())
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.045


async def test_long_reply_takes_exactly_the_messages_its_pieces_need() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "words and more words " * 12 for i in range(12))
    target = RecordingTarget(max_length=500, min_edit_interval=0.0)
    reply = delivery(target, hold=0)
    reply.start()
    for end in range(0, len(text) + 40, 40):
        reply.update(text[:end])
        await asyncio.sleep(0)
    await reply.finish()
    pieces = [piece.text for piece in split_reply(text, 500)]
    assert target.messages == pieces
    assert sum(kind != "edit" for kind, _, _, _ in target.calls) == len(pieces)


async def test_long_fence_opening_line_does_not_post_forever() -> None:
    text = "```" + "x=1;" * 700 + "\n```\nafter"  # minified code on the opening line: ~2,800 characters
    target = RecordingTarget(max_length=2000, min_edit_interval=0.0)
    reply = delivery(target, hold=0)
    reply.update(text)
    async with asyncio.timeout(5):
        await reply.finish()
    assert len(target.messages) == len(split_reply(text, 2000)) <= 3


async def test_notes_are_shown_below_the_text_which_stays_the_models() -> None:
    target = RecordingTarget()
    reply = delivery(target, hold=0)
    reply.update("Partial answer ")
    await reply.finish("⏹️ Stopped.")
    assert target.messages == ["Partial answer\n\n⏹️ Stopped."]
    assert display_text("", "⚠️ failed") == "⚠️ failed"


async def test_a_deleted_message_continues_in_a_new_one() -> None:
    target = RecordingTarget(min_edit_interval=0.0)
    reply = delivery(target, hold=0)
    reply.update("first words")
    reply.start()
    await asyncio.sleep(0.05)
    target.gone.add(0)
    reply.update("first words and the rest")
    assert await reply.finish()
    assert target.messages[-1] == "first words and the rest"
    assert [kind for kind, _, _, _ in target.calls] == ["post", "continue"]


async def test_a_refused_edit_is_retried_without_a_duplicate() -> None:
    target = RecordingTarget(min_edit_interval=0.0)
    reply = delivery(target, hold=0)
    reply.update("one")
    reply.start()
    await asyncio.sleep(0.05)
    target.failing_edits = 1
    reply.update("one two")
    assert await reply.finish()
    assert target.messages == ["one two"]


async def test_a_platform_that_keeps_failing_is_given_up_on_with_backoff() -> None:
    target = RecordingTarget(min_edit_interval=0.0)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    reply = delivery(target, hold=0, sleep=sleep)
    reply.update("one")
    reply.start()
    await asyncio.sleep(0.05)
    target.failing_edits = 100
    reply.update("one two")
    assert not await reply.finish()
    assert reply.failed and target.messages == ["one"]  # no new message for a mere failure
    assert slept == sorted(slept) and slept[-1] >= 4 * slept[0]  # backing off, not a retry storm


async def test_a_platform_that_refuses_posts_fails_at_once() -> None:
    target = RecordingTarget()
    target.refuse_posts = True
    reply = delivery(target, hold=0)
    reply.update("hello")
    async with asyncio.timeout(1):
        assert not await reply.finish()
    assert reply.failed


@pytest.mark.parametrize("empty", ["", "   "])
async def test_whitespace_only_text_keeps_the_status(empty: str) -> None:
    target = RecordingTarget()
    reply = delivery(target, hold=0)
    reply.status(ReplyStatus(Phase.THINKING))
    reply.update(empty)
    reply.start()
    await asyncio.sleep(0.05)
    assert target.messages == ["💭 Thinking…"]
    reply.update(empty + "Hi")
    await reply.finish()
    assert target.messages == [empty + "Hi"]


async def test_a_bucket_with_a_burst_allows_that_many_writes_back_to_back_then_keeps_its_pace() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        now[0] += seconds

    pacer = Pacer(1.0, burst=2, clock=lambda: now[0], sleep=sleep)
    await pacer.turn()
    await pacer.turn()  # a status line, then the first words at once
    assert slept == []
    await pacer.turn()
    assert slept == [1.0]  # then one a second
    now[0] += 5.0  # a quiet spell refills the burst, never beyond it
    for _ in range(3):
        await pacer.turn()
    assert slept == [1.0, 1.0]
