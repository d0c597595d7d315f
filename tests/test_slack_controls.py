"""Buttons under Slack replies (Stop, Regenerate, Continue, 👍/👎), pressed through the real slack-bolt app."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from adapters.slack.blocks import CONTINUE, FEEDBACK, MAX_VALUE_CHARS, REGENERATE, STOP, ButtonValue
from adapters.slack.controls import NOTHING_TO_STOP, STALE, THANKS
from bot.store import Status, Store
from bot.wording import STOPPED_NOTE
from tests.fake_slack import FakeMessage, FakeSlack
from tests.slack_helpers import (
    ACK_DEADLINE_SECONDS,
    REPLY_TIMEOUT_SECONDS,
    answered,
    channel_key,
    fake,
    mention,
    replies,
    running_bot,
    settled,
    words,
)

__all__ = ["fake"]

NOT_ALLOWED_USER = "🚫 Sorry, you're not on the list of people allowed to use this bot."  # bot.access


async def press(fake: FakeSlack, message: FakeMessage, action_id: str, **kwargs: object) -> None:
    """Press a button the message shows; Slack needs the ack within 3 s."""
    pressed_at = time.monotonic()
    await fake.wait_ack(await fake.press(message, action_id, **kwargs), timeout=10)  # type: ignore[arg-type]
    assert time.monotonic() - pressed_at < ACK_DEADLINE_SECONDS


def shown(message: FakeMessage) -> str:
    """The text a person sees: the message's section block."""
    return str(message.blocks[0]["text"]["text"])


async def test_stop_while_writing_then_continue_where_it_stopped(manager, settings, fake):
    thread_sampling = {"grammar": words("organization", 300), "max_tokens": 900, "repeat_penalty": 1.0}
    await manager.set_sampling(channel_key("C1"), **thread_sampling)
    async with running_bot(manager, settings, fake) as bot:
        question = mention("C1", "write at length")
        await fake.push_event(question)
        await fake.wait_for(
            lambda: any(
                STOP in m.buttons and "organization" in shown(m) for m in fake.messages_in("C1", question["ts"])
            ),
            timeout=REPLY_TIMEOUT_SECONDS,
            what="a streaming reply with a Stop button",
        )
        [streaming] = fake.messages_in("C1", question["ts"])
        await press(fake, streaming, STOP)
        [stopped] = await answered(bot, fake, "C1", thread_ts=question["ts"])
        assert shown(stopped).endswith(STOPPED_NOTE)
        assert set(stopped.buttons) == {REGENERATE, CONTINUE}  # a stopped reply can go on
        [before] = await replies(manager, channel_key("C1", question["ts"]))

        await manager.set_sampling(channel_key("C1"), grammar='root ::= " and that is all."', max_tokens=20)
        await press(fake, stopped, CONTINUE)
        messages = await answered(bot, fake, "C1", thread_ts=question["ts"], count=2)

    first, continued = messages
    assert first.ts == stopped.ts and first.buttons == {}  # the reply goes on below: its old buttons are gone
    assert shown(continued).strip() == "and that is all."
    assert set(continued.buttons) == {REGENERATE}
    [after] = await replies(manager, channel_key("C1", question["ts"]))
    assert after.id == before.id and after.status == Status.COMPLETE
    assert after.content == before.content + " and that is all."  # one reply, extended
    assert 0 < before.content.count("organization") < 300


async def test_regenerate_replaces_the_answer_in_place_and_in_the_history(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= "First answer."', max_tokens=30)
    async with running_bot(manager, settings, fake) as bot:
        question = mention("C1", "answer me")
        await fake.push_event(question)
        [reply] = await answered(bot, fake, "C1", thread_ts=question["ts"])
        assert shown(reply) == "First answer." and set(reply.buttons) == {REGENERATE}
        await manager.set_sampling(channel_key("C1"), grammar='root ::= "Second answer."', max_tokens=30)
        await press(fake, reply, REGENERATE)
        await fake.wait_for(lambda: "Second" in reply.text, timeout=REPLY_TIMEOUT_SECONDS, what="the new answer")
        await settled(bot)

    assert [m.ts for m in fake.messages_in("C1")] == [reply.ts]  # no second message: the same one, rewritten
    assert shown(reply) == "Second answer." and set(reply.buttons) == {REGENERATE}
    history = await manager.history(channel_key("C1", question["ts"]))
    assert [(m.role, m.content) for m in history] == [("user", "answer me"), ("assistant", "Second answer.")]


async def test_presses_on_stale_replies_and_by_strangers_are_explained_privately(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= " Fine."', max_tokens=8)
    async with running_bot(manager, settings, fake, allowed_user_ids=["U1", "U2"]) as bot:
        question = mention("C1", "first")
        await fake.push_event(question)
        [old] = await answered(bot, fake, "C1", thread_ts=question["ts"])
        await fake.push_event(fake.user_message("C1", "second", thread_ts=question["ts"]))
        await answered(bot, fake, "C1", thread_ts=question["ts"], count=2)
        calls_before = len(fake.calls_to("chat.update"))

        await press(fake, old, REGENERATE, user="U2")  # not the newest answer any more
        await press(fake, old, REGENERATE, user="U9")  # someone the bot does not answer
        stale_stop = FakeMessage(
            "C1",
            old.ts,
            old.thread_ts,
            old.text,
            blocks=[
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "action_id": STOP,
                            "value": ButtonValue(channel_key("C1", question["ts"])).dump(),
                        }
                    ],
                }
            ],
        )
        await press(fake, stale_stop, STOP, user="U1")  # a Stop left on a finished reply
        elsewhere = FakeMessage(
            "C2",
            "1.0",
            None,
            "x",
            blocks=[
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "action_id": STOP,
                            "value": ButtonValue(channel_key("C1", question["ts"])).dump(),
                        }
                    ],
                }
            ],
        )
        await press(fake, elsewhere, STOP, user="U1")  # a value that names another channel's conversation
        await fake.wait_for(lambda: len(fake.ephemeral_texts()) >= 3, what="three explanations")
        await settled(bot)

    assert fake.ephemeral_texts("U2") == [STALE]
    assert fake.ephemeral_texts("U9") == [NOT_ALLOWED_USER]
    assert fake.ephemeral_texts("U1") == [NOTHING_TO_STOP]
    assert len(fake.calls_to("chat.update")) == calls_before  # nothing was rewritten
    assert [m.content for m in await replies(manager, channel_key("C1", question["ts"]))] == [" Fine."] * 2


async def test_native_streaming_feedback_buttons_are_stored_with_the_reply(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 12), max_tokens=60, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake, native_streaming=True) as bot:
        question = mention("C1", "stream it")
        await fake.push_event(question)
        await fake.wait_for(
            lambda: fake.calls_to("chat.stopStream"), timeout=REPLY_TIMEOUT_SECONDS, what="the stream to stop"
        )
        await settled(bot)
        [reply] = fake.messages_in("C1", question["ts"])
        assert set(reply.buttons) == {REGENERATE, FEEDBACK}
        await press(fake, reply, FEEDBACK, user="U1", positive=False)
        await fake.wait_for(lambda: fake.ephemeral_texts("U1"), what="the thanks")
        await press(fake, reply, FEEDBACK, user="U2", positive=True)  # the latest rating is kept
        await fake.wait_for(lambda: fake.ephemeral_texts("U2"), what="the thanks")
        [rated] = await replies(manager, channel_key("C1", question["ts"]))

        await press(fake, reply, REGENERATE)  # a new answer starts unrated
        await fake.wait_for(lambda: fake.calls_to("chat.update"), what="the new answer")
        await settled(bot)

    assert rated.feedback == "good"
    assert fake.ephemeral_texts() == [THANKS, THANKS]
    [regenerated] = await replies(manager, channel_key("C1", question["ts"]))
    assert regenerated.id == rated.id and regenerated.feedback == "" and regenerated.status == Status.COMPLETE
    stop_blocks = fake.calls_to("chat.stopStream")[-1].args["blocks"]
    stop_blocks = json.loads(stop_blocks) if isinstance(stop_blocks, str) else stop_blocks
    assert [b["type"] for b in stop_blocks] == ["actions", "context_actions"]


async def test_a_database_from_before_feedback_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_key TEXT NOT NULL,
                role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL, author_id TEXT NOT NULL DEFAULT '',
                author_name TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL);
            INSERT INTO messages (session_key, role, content, status, created_at)
                VALUES ('slack/dm/U1', 'user', 'hi', 'complete', 1), ('slack/dm/U1', 'assistant', 'hey', 'complete', 2);
        """)
    store = await Store.open(path)
    try:
        assert await store.set_feedback("slack/dm/U1", 2, "bad")
        assert not await store.set_feedback("slack/dm/U1", 1, "bad")  # a user message is not a reply
        assert not await store.set_feedback("slack/dm/U2", 2, "bad")  # another conversation's reply
        assert [(m.content, m.notes, m.feedback) for m in await store.messages("slack/dm/U1")] == [
            ("hi", "", ""),
            ("hey", "", "bad"),
        ]
    finally:
        await store.close()


async def test_a_regenerated_ask_answer_keeps_the_question_above_it(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= "Four."', max_tokens=30)
    async with running_bot(manager, settings, fake) as bot:
        await fake.wait_ack(await fake.push_command("/ask", "What is 2+2?", user="U1"))
        [answer] = await answered(bot, fake, "C1")
        await manager.set_sampling(channel_key("C1"), grammar='root ::= "It is four."', max_tokens=30)
        await press(fake, answer, REGENERATE)
        await fake.wait_for(lambda: "It is four." in answer.text, timeout=REPLY_TIMEOUT_SECONDS, what="the new answer")
        await settled(bot)

    assert shown(answer) == "*u1 asked:* What is 2+2?\n\nIt is four."
    assert [m.content for m in await replies(manager, channel_key("C1"))] == ["It is four."]


_key_part = st.text(st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    channel=_key_part,
    thread=_key_part,
    reply_id=st.none() | st.integers(1, 2**62),
    feedback=st.sampled_from(["", "good", "bad"]),
    header=st.text(max_size=3000),
)
def test_a_button_value_reads_back_within_slacks_limit(channel, thread, reply_id, feedback, header) -> None:
    value = ButtonValue(channel_key(channel, thread), reply_id, feedback, header)
    dumped = value.dump()
    assert len(dumped) <= MAX_VALUE_CHARS
    assert ButtonValue.load(dumped) in (value, dataclasses.replace(value, header=""))  # a header too long is dropped


@hypothesis_settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_other_value_is_not_taken_for_a_button_of_ours(value: str) -> None:
    loaded = ButtonValue.load(value)
    assert loaded is None or ButtonValue.load(loaded.dump()) == loaded
