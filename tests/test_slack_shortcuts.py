"""Message shortcuts ("Ask llamarelay about it", "Summarize thread") through the real slack-bolt app."""

from __future__ import annotations

import json
import time

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from adapters.slack import shortcuts
from adapters.slack.shortcuts import (
    ASK_ABOUT,
    ASK_VIEW,
    CANNOT_READ,
    METADATA_LIMIT,
    QUESTION_BLOCK,
    QUESTION_INPUT,
    SUMMARIZE,
    view_metadata,
)
from tests.fake_slack import FakeMessage, FakeSlack
from tests.slack_helpers import ACK_DEADLINE_SECONDS, answered, channel_key, fake, running_bot, settled

__all__ = ["fake"]

NOT_ALLOWED_USER = "🚫 Sorry, you're not on the list of people allowed to use this bot."  # bot.access


def shown(message: FakeMessage) -> str:
    return str(message.blocks[0]["text"]["text"])


async def use(fake: FakeSlack, callback_id: str, message: FakeMessage, *, user: str = "U1") -> None:
    """Use a message shortcut; Slack needs the ack within 3 s."""
    used_at = time.monotonic()
    await fake.wait_ack(await fake.message_shortcut(callback_id, message, user=user), timeout=10)
    assert time.monotonic() - used_at < ACK_DEADLINE_SECONDS


def posted(fake: FakeSlack, event: dict) -> FakeMessage:
    return fake.messages[event["ts"]]


async def test_ask_about_a_message_opens_a_modal_and_answers_in_its_thread(manager, settings, fake):
    fake.add_user("U1", "Ana")
    fake.add_user("U2", "Bo")
    await manager.set_sampling(channel_key("C1"), grammar='root ::= "It means the disk is full."', max_tokens=30)
    async with running_bot(manager, settings, fake) as bot:
        their = posted(fake, fake.user_message("C1", "Deploy failed: error &lt;42&gt;", user="U2"))
        await use(fake, ASK_ABOUT, their)
        await fake.wait_for(lambda: fake.views, what="the question modal")
        [view] = fake.views
        assert view["callback_id"] == ASK_VIEW and "error &lt;42&gt;" in json.dumps(view["blocks"])
        await fake.wait_ack(await fake.submit_view(view, {QUESTION_BLOCK: {QUESTION_INPUT: "What does it mean?"}}))
        [answer] = await answered(bot, fake, "C1", thread_ts=their.ts)

        # The thread is now a conversation: a follow-up there needs no mention.
        await fake.push_event(fake.user_message("C1", "How do I fix it?", thread_ts=their.ts))
        await answered(bot, fake, "C1", thread_ts=their.ts, count=2)

    assert shown(answer) == "*Ana asked about a message:* What does it mean?\n\nIt means the disk is full."
    asked, follow_up = [m for m in await manager.history(channel_key("C1", their.ts)) if m.role == "user"]
    assert asked.content == "Bo wrote:\n> Deploy failed: error <42>\n\nWhat does it mean?"
    assert asked.author_name == "Ana" and follow_up.content == "How do I fix it?"


async def test_summarize_thread_reads_the_newest_messages_and_answers_in_the_thread(
    manager, settings, fake, monkeypatch
):
    monkeypatch.setattr(shortcuts, "REPLIES_PAGE", 2)  # the thread comes in three pages
    fake.add_user("U1", "Ana")
    fake.add_user("U2", "Bo")
    settings.conversation.summarize_messages = 3
    await manager.set_sampling(channel_key("C1"), grammar='root ::= "They chose Friday."', max_tokens=30)
    async with running_bot(manager, settings, fake) as bot:
        parent = fake.user_message("C1", "When is the offsite?", user="U1")
        said = [("U2", "Thursday?"), ("U1", "Thursday is full."), ("U2", "Then Friday."), ("U1", "Friday it is.")]
        replies = [fake.user_message("C1", text, user=user, thread_ts=parent["ts"]) for user, text in said]
        await use(fake, SUMMARIZE, posted(fake, replies[1]), user="U2")
        [answer] = await answered(bot, fake, "C1", thread_ts=parent["ts"])

    assert shown(answer) == "*Bo asked for a summary of this thread.*\n\nThey chose Friday."
    [request] = [m for m in await manager.history(channel_key("C1", parent["ts"])) if m.role == "user"]
    assert request.content.endswith("\n\nAna: Thursday is full.\nBo: Then Friday.\nAna: Friday it is.")
    assert "offsite" not in request.content  # only the newest three messages were read
    assert [c.args["ts"] for c in fake.calls_to("conversations.replies")] == [parent["ts"]] * 3


async def test_shortcuts_refuse_privately_where_the_bot_may_not_answer_or_read(manager, settings, fake):
    async with running_bot(manager, settings, fake, allowed_user_ids=["U1"]) as bot:
        message = posted(fake, fake.user_message("C1", "hello", user="U2"))
        await use(fake, ASK_ABOUT, message, user="U9")
        fake.fail("conversations.replies", "not_in_channel")
        await use(fake, SUMMARIZE, message, user="U1")
        await fake.wait_for(lambda: len(fake.calls_to("response_url")) == 2, what="two private answers")
        await settled(bot)

    texts = {c.args["text"] for c in fake.calls_to("response_url")}
    assert texts == {NOT_ALLOWED_USER, CANNOT_READ.format(error="not_in_channel")}
    assert all(c.args["response_type"] == "ephemeral" for c in fake.calls_to("response_url"))
    assert fake.views == [] and fake.messages_in("C1") == []


@hypothesis_settings(max_examples=150, deadline=None)
@given(st.text(max_size=6000), st.text(max_size=200))
def test_the_modal_carries_as_much_of_the_message_as_slack_allows(text: str, author: str) -> None:
    fields = {"c": "C1", "t": "1700000000.000100", "a": author, "r": "https://hooks.slack.com/x"}
    metadata = view_metadata(fields, text)
    assert len(metadata) <= METADATA_LIMIT
    carried = json.loads(metadata)
    assert {k: carried[k] for k in fields} == fields
    assert carried["x"] == text or (carried["x"].endswith("…") and text.startswith(carried["x"][:-1].rstrip()))
