"""Slack's AI-app surface: assistant threads through bolt's AsyncAssistant, against the fake Slack."""

from __future__ import annotations

import json

import pytest

from adapters.slack.assistant import GREETING, SUGGESTED_PROMPTS
from adapters.slack.blocks import FEEDBACK, REGENERATE
from adapters.slack.targets import assistant_status
from bot.types import Phase, ReplyStatus, SessionKey
from tests.fake_slack import FakeSlack
from tests.slack_helpers import REPLY_TIMEOUT_SECONDS, answered, channel_key, fake, running_bot, settled

__all__ = ["fake"]


def prompts_offered(fake: FakeSlack) -> list[dict[str, str]]:
    [call] = fake.calls_to("assistant.threads.setSuggestedPrompts")
    prompts = call.args["prompts"]
    return json.loads(prompts) if isinstance(prompts, str) else prompts


@pytest.mark.parametrize("native", [False, True], ids=["chat.update", "native"])
async def test_an_assistant_thread_greets_shows_status_titles_and_answers_in_the_thread(
    manager, settings, fake, native
):
    thread_key = channel_key("D1", "")  # replaced below, once the thread exists
    async with running_bot(manager, settings, fake, native_streaming=native) as bot:
        thread, started = await fake.start_assistant_thread(user="U2", channel="D1")
        await fake.wait_ack(started)
        [greeting] = await answered(bot, fake, "D1", thread_ts=thread)
        thread_key = channel_key("D1", thread)
        # A reasoning model's reply: the status shows while it thinks (long enough to be shown), then the answer.
        await manager.set_sampling(
            thread_key,
            grammar='root ::= "<think>" (" hmm"){15} "</think>Four, of course."',
            max_tokens=100,
            repeat_penalty=1.0,
        )

        await fake.push_event(fake.user_message("D1", "What is 2+2?", user="U2", thread_ts=thread))
        await fake.wait_for(
            lambda: len(fake.messages_in("D1", thread)) == 2, timeout=REPLY_TIMEOUT_SECONDS, what="the answer"
        )
        await settled(bot)
        await fake.push_event(fake.user_message("D1", "And 3+3?", user="U2", thread_ts=thread))
        await fake.wait_for(
            lambda: len(fake.messages_in("D1", thread)) == 3, timeout=REPLY_TIMEOUT_SECONDS, what="the second answer"
        )
        await settled(bot)

    assert greeting.text == GREETING
    assert prompts_offered(fake) == SUGGESTED_PROMPTS
    [title] = fake.calls_to("assistant.threads.setTitle")  # from the first question only
    assert (title.args["title"], title.args["thread_ts"]) == ("What is 2+2?", thread)
    statuses = [c for c in fake.calls_to("assistant.threads.setStatus") if c.args["thread_ts"] == thread]
    assert "is thinking it through…" in [c.args["status"] for c in statuses]
    first_answer = min(
        c.at
        for c in fake.calls
        if c.method in ("chat.postMessage", "chat.startStream")
        and c.args.get("thread_ts") == thread
        and c.args.get("text") != GREETING
    )
    assert statuses[0].at < first_answer  # the status shows while there is no answer yet, never a placeholder
    _, answer, second = fake.messages_in("D1", thread)
    assert answer.text.strip() == "Four, of course."
    assert set(answer.buttons) == ({REGENERATE, FEEDBACK} if native else {REGENERATE})
    assert [(m.role, m.content) for m in await manager.history(thread_key)] == [
        ("user", "What is 2+2?"),
        ("assistant", "Four, of course."),
        ("user", "And 3+3?"),
        ("assistant", "Four, of course."),
    ]
    assert await manager.history(SessionKey.for_dm("slack", "U2")) == []  # each assistant thread is its own


async def test_a_dm_thread_that_is_not_an_assistant_thread_is_answered_as_before(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        top = fake.user_message("D1", "hello", user="U2")
        await fake.push_event(top)
        await answered(bot, fake, "D1")
        await fake.push_event(fake.user_message("D1", "and in a thread?", user="U2", thread_ts=top["ts"]))
        await answered(bot, fake, "D1", thread_ts=top["ts"])

    users = [m.content for m in await manager.history(SessionKey.for_dm("slack", "U2")) if m.role == "user"]
    assert users == ["hello", "and in a thread?"]
    assert fake.calls_to("assistant.threads.setStatus") == [] and fake.calls_to("assistant.threads.setTitle") == []


def test_the_thread_status_names_a_running_tool() -> None:
    status = ReplyStatus(Phase.TOOL, tool="Searching the wiki")
    assert assistant_status(status) == "is using a tool: Searching the wiki…"


async def test_with_one_model_the_greeting_has_no_model_select(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        thread, _ = await fake.start_assistant_thread(user="U2", channel="D1")
        [greeting] = await answered(bot, fake, "D1", thread_ts=thread)

    assert len(manager.model_choices()) == 1
    assert greeting.text == GREETING
    assert greeting.blocks == [] and greeting.selects == {}
    [post] = [c for c in fake.calls_to("chat.postMessage") if c.args.get("thread_ts") == thread]
    assert "blocks" not in post.args  # the plain greeting, as before models could be picked
