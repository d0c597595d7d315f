"""The streaming reply policy, driven by a fake clock: deterministic, no model needed."""

from __future__ import annotations

from typing import Any

import pytest

from bot.streaming import FINAL_EDIT_ATTEMPTS, StreamingReply, split_message


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class RecordingTarget:
    """A ReplyTarget that records every call with the fake time it happened at."""

    def __init__(self, clock: FakeClock, max_length: int = 2000, min_edit_interval: float = 1.0) -> None:
        self.clock = clock
        self.max_length = max_length
        self.min_edit_interval = min_edit_interval
        self.messages: list[str] = []
        self.calls: list[tuple[str, float, int, str]] = []
        self.failing_edits = 0

    async def post(self, text: str) -> int:
        return self._new("post", text)

    async def post_continuation(self, text: str) -> int:
        return self._new("continue", text)

    async def edit(self, handle: Any, text: str) -> None:
        if self.failing_edits:
            self.failing_edits -= 1
            raise RuntimeError("429 Too Many Requests")
        assert len(text) <= self.max_length
        self.messages[handle] = text
        self.calls.append(("edit", self.clock.now, handle, text))

    def _new(self, kind: str, text: str) -> int:
        assert len(text) <= self.max_length
        self.messages.append(text)
        self.calls.append((kind, self.clock.now, len(self.messages) - 1, text))
        return len(self.messages) - 1

    def edit_times(self, handle: int) -> list[float]:
        return [t for kind, t, h, _ in self.calls if kind == "edit" and h == handle]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def feed(reply: StreamingReply, clock: FakeClock, deltas: list[str], every: float) -> None:
    for delta in deltas:
        clock.now += every
        await reply.append(delta)


async def test_placeholder_is_posted_at_once_and_replaced_by_text(clock: FakeClock) -> None:
    target = RecordingTarget(clock)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    await reply.status("⏳ Queued: #2 in line…")
    assert target.calls == [("post", 0.0, 0, "⏳ Queued: #2 in line…")]
    clock.now = 3.0
    await reply.append("Hello")
    assert target.messages == ["Hello"]


async def test_first_token_is_posted_as_soon_as_it_arrives(clock: FakeClock) -> None:
    target = RecordingTarget(clock)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    clock.now = 0.4
    await reply.append("Hi")
    assert target.calls == [("post", 0.4, 0, "Hi")]


async def test_edits_are_at_most_one_per_interval_and_carry_all_text(clock: FakeClock) -> None:
    target = RecordingTarget(clock, min_edit_interval=1.0)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    words = [f"w{i} " for i in range(50)]
    await feed(reply, clock, words, every=0.1)  # 5 seconds of tokens
    times = target.edit_times(0)
    assert 3 <= len(times) <= 5
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip([0.1, *times], times))
    for _kind, _, _, text in target.calls:  # every edit shows a prefix of the reply, never a fragment
        assert "".join(words).startswith(text)


async def test_final_edit_has_the_complete_text_without_breaking_the_interval(clock: FakeClock) -> None:
    target = RecordingTarget(clock, min_edit_interval=1.0)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    await feed(reply, clock, ["a", "b", "c"], every=0.1)
    last_edit = max([0.1, *target.edit_times(0)])
    await reply.finish()
    assert target.messages == ["abc"]
    assert target.edit_times(0)[-1] - last_edit >= 1.0 - 1e-9


async def test_error_mid_stream_keeps_text_and_adds_a_clear_line(clock: FakeClock) -> None:
    target = RecordingTarget(clock)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    await feed(reply, clock, ["Partial ", "answer"], every=0.5)
    await reply.finish("⚠️ The model failed.")
    assert target.messages == ["Partial answer\n\n⚠️ The model failed."]
    assert reply.text == "Partial answer\n\n⚠️ The model failed."


async def test_long_reply_continues_in_new_messages_split_on_paragraphs(clock: FakeClock) -> None:
    target = RecordingTarget(clock, max_length=100)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    paragraphs = [f"Paragraph {i} " + "x" * 40 for i in range(5)]
    text = "\n\n".join(paragraphs)
    await feed(reply, clock, [text[i:i + 7] for i in range(0, len(text), 7)], every=0.3)
    await reply.finish()
    assert len(target.messages) >= 3
    assert all(len(m) <= 100 for m in target.messages)
    assert [p for m in target.messages for p in m.split("\n\n")] == paragraphs
    assert [kind for kind, *_ in target.calls].count("post") == 1


async def test_split_inside_a_code_block_closes_and_reopens_the_fence(clock: FakeClock) -> None:
    target = RecordingTarget(clock, max_length=120)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    code = "\n".join(f"print({i})" for i in range(30))
    await reply.append(f"Here:\n```python\n{code}\n```\nDone.")
    await reply.finish()
    assert len(target.messages) >= 3
    for message in target.messages:
        assert message.count("```") % 2 == 0, message
    assert target.messages[1].startswith("```python\n")
    body = "\n".join(target.messages)
    assert all(f"print({i})" in body for i in range(30))
    assert target.messages[-1].endswith("Done.")


def test_split_prefers_paragraph_then_line_then_word() -> None:
    assert split_message("a" * 60 + "\n\n" + "b" * 60, 100) == ("a" * 60, "b" * 60)
    assert split_message("a" * 60 + "\n" + "b" * 60, 100) == ("a" * 60, "b" * 60)
    assert split_message("aaa " * 30, 50)[0] == ("aaa " * 11).strip()
    head, rest = split_message("x" * 250, 100)
    assert len(head) <= 100 and head + rest == "x" * 250


async def test_failed_edit_loses_nothing_next_edit_carries_all_text(clock: FakeClock) -> None:
    target = RecordingTarget(clock)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    await reply.append("one ")
    target.failing_edits = 1
    await feed(reply, clock, ["two ", "three "], every=1.5)
    await reply.finish()
    assert target.messages == ["one two three "]
    assert [kind for kind, *_ in target.calls].count("post") == 1


async def test_failed_final_edit_is_retried_without_a_duplicate(clock: FakeClock) -> None:
    target = RecordingTarget(clock)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    await reply.append("start")
    await reply.append(" end")
    target.failing_edits = FINAL_EDIT_ATTEMPTS - 1
    await reply.finish()
    assert target.messages == ["start end"]


async def test_final_edit_that_keeps_failing_is_posted_rather_than_lost(clock: FakeClock) -> None:
    target = RecordingTarget(clock)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    await reply.append("start")
    await reply.append(" end")
    target.failing_edits = FINAL_EDIT_ATTEMPTS
    await reply.finish()
    assert target.messages == ["start", "start end"]


async def test_split_uses_the_targets_own_measure_of_length(clock: FakeClock) -> None:
    class EscapingTarget(RecordingTarget):
        """A platform that sends '<' as '&lt;': four characters where the model wrote one."""

        def measure(self, text: str) -> int:
            return len(text.replace("<", "&lt;"))

        async def edit(self, handle: Any, text: str) -> None:
            assert self.measure(text) <= self.max_length
            await super().edit(handle, text)

    target = EscapingTarget(clock, max_length=100)
    reply = StreamingReply(target, clock=clock, sleep=clock.sleep)
    text = " ".join(["<b>"] * 60)
    await reply.append(text)
    await reply.finish()
    assert all(target.measure(m) <= 100 for m in target.messages)
    assert " ".join(target.messages).split() == text.split()
