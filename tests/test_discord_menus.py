"""Message commands (Apps menu): "Ask llamarelay" and "Summarize". Real discord.py against tests/fake_discord/,
with the real engine; both are answered in the channel's conversation, in the command's response.
"""

from __future__ import annotations

from bot.config import Settings
from bot.context import ask_about, summarize
from bot.conversations import ConversationManager
from tests.fake_discord import (
    ALICE_ID,
    BOB_ID,
    CHANNEL_ID,
    EPHEMERAL_FLAG,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    THREAD_ID,
    FakeDiscord,
    FakeInteraction,
)
from tests.test_discord import CHANNEL_KEY, THREAD_KEY, StartBot, dsettings, fake, force_reply, start_bot, stored  # noqa: F401

MODAL, DEFERRED = 9, 5  # interaction callback types


async def answered(fake: FakeDiscord, inter: FakeInteraction, text: str) -> None:
    await fake.wait_for(
        lambda: inter.original_id and fake.messages[inter.original_id]["content"] == text, f"the answer {text!r}"
    )


async def test_ask_about_a_message_quotes_it_under_the_question(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.allowed_role_ids = [MEMBER_ROLE_ID]
    await force_reply(manager, CHANNEL_KEY, "On Friday.")
    await start_bot()
    assert {name: fake.commands[name]["type"] for name in ("Ask llamarelay", "Summarize")} == {
        "Ask llamarelay": 3,
        "Summarize": 3,
    }  # message commands: they appear under Apps
    said = await fake.message_create(
        "The meeting moved to Friday, see notes.",
        author_id=BOB_ID,
        mention_bot=False,
        files=[("notes.txt", b"Room 4.", "text/plain")],
    )
    opened = await fake.context_menu("Ask llamarelay", said)
    await fake.wait_for(lambda: opened.callbacks, "the modal")
    assert [c["type"] for c in opened.callbacks] == [MODAL]
    submitted = await fake.submit_modal(opened, {"Your question": "When is the meeting?"})
    await answered(fake, submitted, "On Friday.")
    assert [c["type"] for c in submitted.callbacks] == [DEFERRED]
    [question, _] = await stored(manager, CHANNEL_KEY)
    quoted = ask_about("Bob", "The meeting moved to Friday, see notes.", "When is the meeting?")
    assert question.content == quoted + "\n\nFile notes.txt:\n```\nRoom 4.\n```" and question.author_name == "Alice"

    refused = await fake.context_menu("Ask llamarelay", said, user_id=MALLORY_ID)
    await fake.wait_for(lambda: refused.original_id, "the refusal")
    [refusal] = fake.interaction_messages(refused)
    assert refusal["flags"] & EPHEMERAL_FLAG and "not on the list" in refusal["content"]


async def test_summarize_reads_the_thread_up_to_the_chosen_message(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.conversation.summarize_messages = 3
    await force_reply(manager, THREAD_KEY, "You agreed on tea.")
    await start_bot()
    lines = [("Alice", "coffee or tea?"), ("Bob", "tea, please"), ("Alice", "tea it is"), ("Bob", "with milk")]
    ids = [
        await fake.message_create(
            text, author_id=BOB_ID if who == "Bob" else ALICE_ID, channel_id=THREAD_ID, mention_bot=False
        )
        for who, text in lines
    ]
    await fake.message_create("unrelated", channel_id=CHANNEL_ID, mention_bot=False)
    inter = await fake.context_menu("Summarize", ids[2])  # the last 3 messages up to "tea it is"
    await answered(fake, inter, "You agreed on tea.")
    [history] = fake.matching("GET", f"/channels/{THREAD_ID}/messages")
    assert history.query["limit"] == "3"
    [question, _] = await stored(manager, THREAD_KEY)
    assert question.content == summarize(lines[:3], dsettings.conversation.summarize_chars)
    assert await stored(manager, CHANNEL_KEY) == []
