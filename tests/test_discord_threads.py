"""``[discord] thread_per_conversation``: a mention in a channel opens a public thread named after the question
and is answered there; follow-ups in that thread need no mention. Real discord.py against tests/fake_discord/,
with the real engine. Also: speakers reach the core under their display names (server nicknames included).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.discord.bot import THREAD_NAME_MAX_CHARS, thread_name
from bot.config import Settings
from bot.conversations import ConversationManager
from bot.text import clean_text
from bot.types import SessionKey
from tests.fake_discord import BOB_ID, CHANNEL_ID, GUILD_ID, THREAD_ID, FakeDiscord
from tests.test_discord import CHANNEL_KEY, THREAD_KEY, StartBot, dsettings, fake, force_reply, start_bot, stored  # noqa: F401

THREADS = f"/channels/{CHANNEL_ID}/messages/\\d+/threads"


def thread_key(thread_id: int) -> SessionKey:
    return SessionKey.for_channel("discord", str(GUILD_ID), str(CHANNEL_ID), str(thread_id))


def collapsed(text: str) -> str:
    return " ".join(clean_text(text).split())


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_thread_names_are_one_line_within_discords_limit(question: str, fallback: str) -> None:
    name = thread_name(question, fallback)
    source = collapsed(question) or collapsed(fallback) or "Conversation"
    assert 1 <= len(name) <= THREAD_NAME_MAX_CHARS and name == " ".join(name.split())
    if len(source) <= THREAD_NAME_MAX_CHARS:
        assert name == source
    else:  # cut, and marked as cut
        assert name.endswith("…") and source.startswith(name[:-1])


def test_thread_name_examples() -> None:
    assert thread_name("  What is\n a fox? ", "Alice") == "What is a fox?"
    assert thread_name("", "notes.txt") == "notes.txt"
    assert thread_name("\u200b", "") == "Conversation"
    long = thread_name("word " * 40, "")
    assert len(long) == THREAD_NAME_MAX_CHARS and long.endswith("…") and long.startswith("word word")


async def test_a_mention_opens_a_thread_whose_follow_ups_need_no_mention(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.thread_per_conversation = True
    fake.nicks[BOB_ID] = "Bobby"
    question = "What do foxes eat? " * 8  # longer than a thread name may be
    await force_reply(manager, CHANNEL_KEY, "Mostly mice.")  # the thread inherits its channel's settings
    await start_bot()
    mid = await fake.message_create(question)
    await fake.wait_for(
        lambda: any(m["content"] == "Mostly mice." for m in fake.bot_messages(mid)), "the answer in the new thread"
    )
    [created] = fake.matching("POST", THREADS)
    assert created.path == f"/channels/{CHANNEL_ID}/messages/{mid}/threads"
    name = created.body["name"]
    assert len(name) == 100 and name.endswith("…") and question.startswith(name[:-1])
    assert fake.bot_messages(CHANNEL_ID) == []  # nothing in the channel itself
    key = thread_key(mid)  # a thread opened on a message has that message's id
    assert [m.content for m in await stored(manager, key)] == [question.strip(), "Mostly mice."]
    assert await stored(manager, CHANNEL_KEY) == []

    await force_reply(manager, key, "Beetles too.")
    follow_up = await fake.message_create("and what else?", author_id=BOB_ID, channel_id=mid, mention_bot=False)
    await fake.final_reply(follow_up, "Beetles too.")
    history = await stored(manager, key)
    assert [(m.author_name, m.content) for m in history if m.role == "user"] == [
        ("Alice", question.strip()),
        ("Bobby", "and what else?"),
    ]
    assert len(fake.matching("POST", THREADS)) == 1  # a message in the thread opens no other thread
    assert fake.pinging_writes() == []


async def test_threads_people_opened_still_need_a_mention(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.thread_per_conversation = True
    await force_reply(manager, THREAD_KEY, "Right here.")
    await start_bot()
    mentioned = await fake.message_create("are you there?", channel_id=THREAD_ID)
    await fake.final_reply(mentioned, "Right here.")  # answered in the thread, as before: no thread in a thread
    ignored = await fake.message_create("just chatting", channel_id=THREAD_ID, mention_bot=False)
    await fake.final_reply(await fake.message_create("still there?", channel_id=THREAD_ID), "Right here.")
    assert fake.replies_to(ignored) == [] and fake.matching("POST", THREADS) == []
    assert [m.content for m in await stored(manager, THREAD_KEY) if m.role == "user"] == [
        "are you there?",
        "still there?",
    ]


async def test_without_thread_permission_the_answer_stays_in_the_channel(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.thread_per_conversation = True
    fake.script_status("POST", THREADS, status=403)
    await force_reply(manager, CHANNEL_KEY, "Here instead.")
    await start_bot()
    await fake.final_reply(await fake.message_create("open a thread?"), "Here instead.")
    assert [r.status for r in fake.matching("POST", THREADS)] == [403]
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["open a thread?", "Here instead."]
