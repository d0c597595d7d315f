"""The Discord adapter end to end: real discord.py over real sockets, against tests/fake_discord/, with the
real engine and model. Exact model output is forced per session with a GBNF grammar where a test needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import discord
import discord.gateway
import discord.http
import pytest
import yarl

from adapters.discord import run_discord
from adapters.discord.targets import ChannelTarget
from bot.config import Secrets, Settings
from bot.conversations import ConversationManager
from bot.delivery import HOLD_STATUS_SECONDS
from bot.store import Store, StoredMessage
from bot.types import SessionKey
from bot.wording import SHUTTING_DOWN, THINKING
from tests.fake_discord import (
    ALICE_ID,
    APP_ID,
    BOB_ID,
    CHANNEL_ID,
    EPHEMERAL_FLAG,
    GUILD_ID,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    OTHER_BOT_ID,
    OTHER_CHANNEL_ID,
    THREAD_ID,
    FakeDiscord,
)

CHANNEL_KEY = SessionKey.for_channel("discord", str(GUILD_ID), str(CHANNEL_ID))
OTHER_KEY = SessionKey.for_channel("discord", str(GUILD_ID), str(OTHER_CHANNEL_ID))
THREAD_KEY = SessionKey.for_channel("discord", str(GUILD_ID), str(CHANNEL_ID), str(THREAD_ID))
ALICE_DM_KEY = SessionKey.for_dm("discord", str(ALICE_ID))
FOX = "The quick brown fox jumps over the lazy dog. "  # about 4.4 characters per generated token
THANKS = "Thank you for your understanding and cooperation. "  # about 6.2: the cheapest long text found


def foxes(n: int) -> str:
    return (FOX * n).strip()


StartBot = Callable[..., Awaitable["asyncio.Task[None]"]]


async def force_reply(manager: ConversationManager, key: SessionKey, text: str, max_tokens: int = 0) -> None:
    """Make the real model answer exactly ``text`` in this session (greedy sampling under a grammar)."""
    literal = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    await manager.set_sampling(key, grammar=f'root ::= "{literal}"', max_tokens=max_tokens or len(text) + 8)


async def stored(manager: ConversationManager, key: SessionKey, timeout: float = 30.0) -> list[StoredMessage]:
    """The session's history once no reply in it is still being written (its last edit can land first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        history = await manager.history(key)
        if all(m.status != "generating" for m in history):
            return history
        assert loop.time() < deadline, f"a reply in {key} is still being written"
        await asyncio.sleep(0.05)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    async with FakeDiscord() as server:
        yield server
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@pytest.fixture
def dsettings(settings: Settings, fake: FakeDiscord) -> Settings:
    settings.discord.api_base_url = fake.api_base_url
    settings.discord.gateway_url = fake.gateway_url
    settings.discord.edit_interval = 0.2
    return settings


@pytest.fixture
async def start_bot(manager: ConversationManager, dsettings: Settings, fake: FakeDiscord) -> AsyncIterator[StartBot]:
    """Starts `run_discord` (as `llamarelay run` does) and waits for it to identify; stops it at teardown."""
    tasks: list[asyncio.Task[None]] = []

    async def start(with_manager: ConversationManager | None = None) -> asyncio.Task[None]:
        identified = fake.identify_count
        task = asyncio.create_task(
            run_discord(
                with_manager or manager, dsettings, Secrets(discord_token="fake-token"), guild_ready_timeout=0.1
            )
        )
        tasks.append(task)
        await fake.wait_for(lambda: fake.identify_count > identified or task.done(), "the bot to identify")
        if task.done():
            task.result()
        return task

    yield start
    await manager.shutdown()  # as `llamarelay run` does: replies end while Discord can still take their last edit
    for task in tasks:
        await _stop(task)


async def test_fake_discord_serves_a_plain_client(fake: FakeDiscord) -> None:
    """The fake itself: a bare discord.Client logs in, gets READY, sends and edits a message."""
    discord.http.Route.BASE = fake.api_base_url
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.1)
    done = asyncio.Event()

    @client.event
    async def on_message(message: discord.Message) -> None:
        sent = await message.channel.send("hello")
        await sent.edit(content="hello world")
        done.set()

    task = asyncio.create_task(client.start("fake-token"))
    try:
        await asyncio.wait_for(client.wait_until_ready(), 10)
        assert client.user is not None and client.get_channel(CHANNEL_ID) is not None
        await fake.message_create("hi", mention_bot=False)
        await asyncio.wait_for(done.wait(), 10)
        [sent] = fake.bot_messages(CHANNEL_ID)
        assert fake.contents[int(sent["id"])] == ["hello", "hello world"]
    finally:
        await client.close()
        await task


async def test_guild_mention_is_streamed_with_several_edits(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    expected = foxes(5)
    await force_reply(manager, CHANNEL_KEY, expected)
    await start_bot()
    assert {"ask", "reset", "system", "stop", "status"} <= set(fake.commands)
    mentioned = time.monotonic()
    mid = await fake.message_create(f"tell me about <@{BOB_ID}>", mention_ids=(BOB_ID,))
    reply = await fake.final_reply(mid, expected)
    shown = fake.contents[int(reply["id"])]
    posted = fake.matching("POST", f"/channels/{CHANNEL_ID}/messages")[0].at
    if shown[0] == THINKING:  # only when no text came within the hold (a busy machine): never a flash of it
        assert posted - mentioned >= HOLD_STATUS_SECONDS
        shown = shown[1:]
    partial = shown[:-1]
    assert len(partial) >= 2, shown
    assert all(expected.startswith(text) for text in partial), partial
    assert [len(t) for t in partial] == sorted(len(t) for t in partial)
    edits = [r.at for r in fake.matching("PATCH", f"/channels/{CHANNEL_ID}/messages/{reply['id']}")]
    # Paced at edit_interval (0.2 s) when sent; the fake times their arrival, which a loaded machine may bunch a
    # little: an unpaced stream would put edits milliseconds apart.
    gaps = [b - a for a, b in zip(edits, edits[1:])]
    assert min(gaps) >= 0.1 and sum(gaps) / len(gaps) >= 0.18, ("edits came faster than edit_interval", edits, shown)
    assert fake.matching("POST", f"/channels/{CHANNEL_ID}/typing")
    assert len(fake.bot_messages()) == 1
    history = await stored(manager, CHANNEL_KEY)
    assert [(m.role, m.status) for m in history] == [("user", "complete"), ("assistant", "complete")]
    assert history[0].content == "tell me about @Bob"  # bot mention stripped, user mention by name
    assert history[0].author_name == "Alice"
    assert fake.pinging_writes() == []


async def test_dm_gets_a_private_session(fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot) -> None:
    await force_reply(manager, ALICE_DM_KEY, "Only you can read this.")
    await start_bot()
    mid = await fake.message_create("a secret question", dm=True, mention_bot=False)
    await fake.final_reply(mid, "Only you can read this.")
    [reply] = fake.bot_messages()
    assert reply["channel_id"] == str(fake.dm_channel_id(ALICE_ID)) and "guild_id" not in reply
    assert [m.content for m in await stored(manager, ALICE_DM_KEY)] == ["a secret question", "Only you can read this."]
    assert await stored(manager, CHANNEL_KEY) == []


async def test_ask_streams_into_the_interaction_response(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    expected = foxes(3)
    await force_reply(manager, CHANNEL_KEY, expected)
    await start_bot()
    inter = await fake.slash("ask", {"prompt": "what does the fox do?"})
    await fake.wait_for(
        lambda: inter.original_id and fake.messages[inter.original_id]["content"] == expected, "the /ask answer"
    )
    assert [c["type"] for c in inter.callbacks] == [5]  # deferred at once: "thinking…"
    shown = fake.contents[inter.original_id]
    assert len(shown) >= 3 and all(expected.startswith(t) for t in shown[2:-1])
    assert fake.messages[inter.original_id]["flags"] & EPHEMERAL_FLAG == 0
    history = await stored(manager, CHANNEL_KEY)
    assert [m.content for m in history] == ["what does the fox do?", expected]
    assert fake.pinging_writes() == []


async def test_reset_clears_the_channel_session(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, "Noted.")
    await start_bot()
    await fake.final_reply(await fake.message_create("remember 42"), "Noted.")
    inter = await fake.slash("reset")
    await fake.wait_for(lambda: inter.original_id, "the /reset answer")
    [answer] = fake.interaction_messages(inter)
    assert "cleared" in answer["content"] and not answer["flags"] & EPHEMERAL_FLAG
    assert await stored(manager, CHANNEL_KEY) == []


async def test_system_prompt_needs_manage_server_to_change(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    refused = await fake.slash("system", {"prompt": "You are a pirate."}, user_id=BOB_ID)
    await fake.wait_for(lambda: refused.original_id, "the refusal")
    [refusal] = fake.interaction_messages(refused)
    assert refusal["flags"] & EPHEMERAL_FLAG and "Manage Server" in refusal["content"]
    assert await manager.system_prompt(CHANNEL_KEY) == "You are a helpful assistant."

    changed = await fake.slash("system", {"prompt": "You are a pirate."}, manage_guild=True)
    await fake.wait_for(lambda: changed.original_id, "the confirmation")
    assert await manager.system_prompt(CHANNEL_KEY) == "You are a pirate."

    shown = await fake.slash("system", user_id=BOB_ID)
    await fake.wait_for(lambda: shown.original_id, "the current prompt")
    [answer] = fake.interaction_messages(shown)
    assert answer["flags"] & EPHEMERAL_FLAG and "You are a pirate." in answer["content"]


async def test_stop_keeps_the_partial_reply_marked_stopped(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, FOX * 40, max_tokens=1200)
    await start_bot()
    mid = await fake.message_create("write a lot")
    await fake.wait_for(
        lambda: (r := fake.replies_to(mid)) and r[0]["content"].startswith("The quick"), "the reply to start streaming"
    )
    inter = await fake.slash("stop", user_id=BOB_ID)
    await fake.wait_for(
        lambda: (r := fake.replies_to(mid)) and r[0]["content"].endswith("⏹️ Stopped."), "the stopped reply"
    )
    [stopping] = fake.interaction_messages(inter)
    assert "Stopping" in stopping["content"] and not stopping["flags"] & EPHEMERAL_FLAG
    history = await stored(manager, CHANNEL_KEY)
    assert history[-1].status == "stopped"
    assert len(history[-1].content) < len(FOX * 40) and (FOX * 40).startswith(history[-1].content)
    assert fake.replies_to(mid)[0]["content"].startswith(history[-1].content.rstrip())

    idle = await fake.slash("stop")
    await fake.wait_for(lambda: idle.original_id, "the idle /stop answer")
    assert fake.interaction_messages(idle)[0]["flags"] & EPHEMERAL_FLAG


async def test_status_shows_model_queue_and_speed(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    inter = await fake.slash("status", dm=True)
    await fake.wait_for(lambda: inter.original_id, "the /status answer")
    [answer] = fake.interaction_messages(inter)
    assert answer["flags"] & EPHEMERAL_FLAG
    assert manager.engine.model_name in answer["content"]
    assert "Queue:** 0 waiting" in answer["content"] and "nothing queued" in answer["content"]


async def test_two_channels_at_once_get_separate_sessions(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    answers = {CHANNEL_ID: "Alpha. " + foxes(3), OTHER_CHANNEL_ID: "Beta. " + foxes(3)}
    await force_reply(manager, CHANNEL_KEY, answers[CHANNEL_ID])
    await force_reply(manager, OTHER_KEY, answers[OTHER_CHANNEL_ID])
    await start_bot()
    first = await fake.message_create("question one")
    second = await fake.message_create("question two", author_id=BOB_ID, channel_id=OTHER_CHANNEL_ID)
    await asyncio.gather(
        fake.final_reply(first, answers[CHANNEL_ID]), fake.final_reply(second, answers[OTHER_CHANNEL_ID])
    )
    # Both streamed at the same time: each showed text before the other had finished.
    edits = {
        c: [r for r in fake.matching("PATCH", rf"/channels/{c}/messages/\d+") if r.body["content"] != a]
        for c, a in answers.items()
    }
    assert edits[CHANNEL_ID][0].at < edits[OTHER_CHANNEL_ID][-1].at
    assert edits[OTHER_CHANNEL_ID][0].at < edits[CHANNEL_ID][-1].at
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["question one", answers[CHANNEL_ID]]
    assert [m.content for m in await stored(manager, OTHER_KEY)] == ["question two", answers[OTHER_CHANNEL_ID]]


async def test_queued_reply_shows_its_place_and_status_reports_it(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    """The engine has two slots: with both busy, a third conversation's placeholder shows its queue place."""
    for key in (CHANNEL_KEY, OTHER_KEY):
        await force_reply(manager, key, FOX * 40, max_tokens=1200)
    await force_reply(manager, THREAD_KEY, "Your turn came.")
    await start_bot()
    busy = [await fake.message_create("long one"), await fake.message_create("long two", channel_id=OTHER_CHANNEL_ID)]
    for mid in busy:
        await fake.wait_for(
            lambda mid=mid: (r := fake.replies_to(mid)) and r[0]["content"].startswith("The quick"),
            "both slots to be generating",
        )
    queued = await fake.message_create("me too", channel_id=THREAD_ID)
    await fake.wait_for(
        lambda: (r := fake.replies_to(queued)) and r[0]["content"] == "⏳ Queued: #1 in line…", "the queued placeholder"
    )
    inter = await fake.slash("status", channel_id=THREAD_ID)
    await fake.wait_for(lambda: inter.original_id, "the /status answer")
    status = fake.interaction_messages(inter)[0]["content"]
    assert "1 waiting, 2 generating" in status and "#1 in the queue" in status
    for channel in (CHANNEL_ID, OTHER_CHANNEL_ID):
        await fake.slash("stop", channel_id=channel)
    await fake.final_reply(queued, "Your turn came.")
    await fake.wait_for(
        lambda: all(fake.replies_to(mid)[0]["content"].endswith("⏹️ Stopped.") for mid in busy),
        "both long replies to show they were stopped",
    )


async def test_follow_up_carries_the_history_and_threads_have_their_own(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, "Hello Zed.")
    await start_bot()
    await fake.final_reply(await fake.message_create("my name is Zed"), "Hello Zed.")
    await fake.final_reply(await fake.message_create("what is my name?", author_id=BOB_ID), "Hello Zed.")
    history = await stored(manager, CHANNEL_KEY)
    assert [(m.role, m.content) for m in history] == [
        ("user", "my name is Zed"),
        ("assistant", "Hello Zed."),
        ("user", "what is my name?"),
        ("assistant", "Hello Zed."),
    ]
    assert [m.author_name for m in history if m.role == "user"] == ["Alice", "Bob"]

    await force_reply(manager, THREAD_KEY, "A fresh thread.")
    await fake.final_reply(await fake.message_create("hi thread", channel_id=THREAD_ID), "A fresh thread.")
    assert [m.content for m in await stored(manager, THREAD_KEY)] == ["hi thread", "A fresh thread."]
    assert len(await stored(manager, CHANNEL_KEY)) == 4


async def test_long_answer_continues_in_a_second_message(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A message holds at most Discord's 2,000 characters; 1,000 here, so the model writes half as much.
    monkeypatch.setattr(ChannelTarget, "max_length", 1000)
    expected = (THANKS * 25).strip()  # 1,249 characters
    await force_reply(manager, CHANNEL_KEY, expected, max_tokens=600)
    await start_bot()
    mid = await fake.message_create("a long one please")
    first = (await fake.wait_for(lambda: fake.replies_to(mid), "the first part"))[0]
    await fake.wait_for(
        lambda: (
            len(fake.bot_messages(CHANNEL_ID)) == 2
            and "".join(m["content"] for m in fake.bot_messages(CHANNEL_ID)) == expected
        ),
        "both parts",
    )
    second = fake.bot_messages(CHANNEL_ID)[1]
    assert len(first["content"]) <= 1000 and len(second["content"]) <= 1000
    assert second.get("message_reference") is None
    assert all(len(text) <= 1000 for texts in fake.contents.values() for text in texts)


@pytest.mark.parametrize("mode", ["retried", "refused", "final-refused"])
async def test_429_on_an_edit_loses_no_text_and_duplicates_nothing(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot, mode: str
) -> None:
    """retried: discord.py waits and retries (Via header). refused: no Via, so discord.py gives up and the next
    edit carries the text. final-refused: every edit fails until the final one has been refused too."""
    expected = foxes(3)
    edits = rf"/channels/{CHANNEL_ID}/messages/\d+"
    await force_reply(manager, CHANNEL_KEY, expected)
    await start_bot()
    fake.script_status(
        "PATCH", edits, times=1000 if mode == "final-refused" else 3, retry_after=0.3, via=mode == "retried"
    )
    mid = await fake.message_create("go")
    if mode == "final-refused":
        await fake.wait_for(
            lambda: any(r.status == 429 and r.body["content"] == expected for r in fake.matching("PATCH", edits)),
            "the final edit to be refused",
        )
        fake.clear_scripts()
    await fake.final_reply(mid, expected)
    assert [r.status for r in fake.matching("PATCH", edits)][:3] == [429] * 3
    assert len(fake.bot_messages()) == 1
    assert [m.status for m in await stored(manager, CHANNEL_KEY)] == ["complete", "complete"]


async def test_edits_stay_within_the_channel_rate_limit(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    """Discord announces a per-channel bucket in X-RateLimit-* headers: 3 writes a second here, fewer than the
    5 edits a second that edit_interval = 0.2 s would make. The bot must wait, never overrun, lose nothing."""
    fake.limit_channel_writes(3, 1.0)
    expected = foxes(5)
    await force_reply(manager, CHANNEL_KEY, expected)
    await start_bot()
    reply = await fake.final_reply(await fake.message_create("pace yourself"), expected)
    writes = [r.at for r in fake.requests if r.method in ("POST", "PATCH") and "/messages" in r.path]
    assert len(writes) >= 4 and fake.rate_limit_violations == 0
    assert all(b - a >= 0.9 for a, b in zip(writes, writes[3:])), "more than 3 writes in one second"
    assert len(fake.contents[int(reply["id"])]) >= 3


async def test_gateway_reconnect_mid_stream_resumes_and_misses_nothing(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    expected = foxes(6)
    await force_reply(manager, CHANNEL_KEY, expected)
    await force_reply(manager, OTHER_KEY, "Still here.")
    await start_bot()
    first = await fake.message_create("long one")
    await fake.wait_for(
        lambda: (r := fake.replies_to(first)) and r[0]["content"].startswith("The quick"), "streaming to start"
    )
    await fake.reconnect()
    second = await fake.message_create("during the reconnect", channel_id=OTHER_CHANNEL_ID)
    await fake.final_reply(first, expected)
    await fake.final_reply(second, "Still here.")
    assert fake.resume_count == 1 and fake.identify_count == 1 and fake.replayed_count >= 1
    assert len(fake.bot_messages()) == 2


async def test_access_lists_bots_and_rate_limit(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.allowed_role_ids = [MEMBER_ROLE_ID]
    dsettings.discord.user_messages_per_minute = 1
    await force_reply(manager, CHANNEL_KEY, "Members only.")
    await start_bot()
    ignored = [
        await fake.message_create("let me in", author_id=MALLORY_ID),
        await fake.message_create("beep", author_id=OTHER_BOT_ID),
    ]
    refused = await fake.slash("ask", {"prompt": "let me in"}, user_id=MALLORY_ID)
    await fake.final_reply(await fake.message_create("hello", author_id=BOB_ID), "Members only.")
    await fake.wait_for(lambda: refused.original_id, "the /ask refusal")
    [refusal] = fake.interaction_messages(refused)
    assert refusal["flags"] & EPHEMERAL_FLAG and "not on the list" in refusal["content"]
    assert all(not fake.replies_to(mid) for mid in ignored)

    too_fast = await fake.message_create("again", author_id=BOB_ID)
    notice = (await fake.wait_for(lambda: fake.replies_to(too_fast), "the rate-limit notice"))[0]
    assert "a minute" in notice["content"]
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["hello", "Members only."]


async def test_model_output_cannot_ping_anyone(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    pings = f"Hi @everyone and @here and <@&{MEMBER_ROLE_ID}> and <@{ALICE_ID}> there"
    await force_reply(manager, CHANNEL_KEY, pings)
    await force_reply(manager, ALICE_DM_KEY, pings)
    await start_bot()
    await fake.final_reply(await fake.message_create("greet everyone"), pings)
    inter = await fake.slash("ask", {"prompt": "greet everyone"}, dm=True)
    await fake.wait_for(
        lambda: inter.original_id and fake.messages[inter.original_id]["content"] == pings, "the /ask answer"
    )
    assert fake.pinging_writes() == []


async def test_shutdown_mid_reply_then_restart_keeps_the_sessions(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, FOX * 40, max_tokens=1200)
    first_run = await start_bot()
    before = await fake.message_create("before the restart")
    await fake.wait_for(
        lambda: (r := fake.replies_to(before)) and r[0]["content"].startswith("The quick"),
        "the reply to start streaming",
    )
    await manager.shutdown()  # what SIGTERM does to `llamarelay run`: the reply in flight is ended and kept
    await _stop(first_run)
    assert fake.replies_to(before)[0]["content"].endswith(SHUTTING_DOWN)
    await manager.store.close()

    store = await Store.open(dsettings.store.path)
    try:
        revived = ConversationManager(manager.engine, store, dsettings)
        await force_reply(revived, CHANNEL_KEY, "Second life.")
        second_run = await start_bot(revived)
        assert fake.identify_count == 2
        await fake.final_reply(await fake.message_create("after the restart"), "Second life.")
        history = await stored(revived, CHANNEL_KEY)
        assert [m.content for m in history][2:] == ["after the restart", "Second life."]
        assert history[0].content == "before the restart"
        assert history[1].status == "stopped" and (FOX * 40).startswith(history[1].content)
        await _stop(second_run)
        await revived.shutdown()
    finally:
        await store.close()


async def test_a_deleted_reply_continues_in_a_new_message(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    expected = foxes(20)
    await force_reply(manager, CHANNEL_KEY, expected, max_tokens=1200)
    await start_bot()
    mid = await fake.message_create("a long one")
    first = (
        await fake.wait_for(
            lambda: (r := fake.replies_to(mid)) and r[0]["content"].startswith("The quick") and r, "streaming to start"
        )
    )[0]
    del fake.messages[int(first["id"])]  # someone deletes the bot's message mid-stream
    await fake.wait_for(
        lambda: any(m["content"] == expected for m in fake.bot_messages(CHANNEL_ID)),
        "the reply to go on in a new message",
    )
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["a long one", expected]


async def test_an_expired_interaction_continues_in_the_channel(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    expected = foxes(20)  # still streaming when the token expires, short enough for a busy machine
    await force_reply(manager, CHANNEL_KEY, expected, max_tokens=1200)
    await start_bot()
    inter = await fake.slash("ask", {"prompt": "a long one"})
    await fake.wait_for(
        lambda: inter.original_id and fake.messages[inter.original_id]["content"].startswith("The"),
        "the /ask answer to start",
    )
    fake.expired_tokens.add(inter.token)  # 15 minutes later, as far as Discord is concerned
    continued = await fake.wait_for(
        lambda: [m for m in fake.bot_messages(CHANNEL_ID) if m["content"] == expected],
        "the answer to go on in the channel",
    )
    assert "webhook_id" not in continued[0] and fake.messages[inter.original_id]["content"] != expected
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["a long one", expected]


async def test_engine_failure_ends_the_reply_with_an_error_line(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await manager.set_sampling(CHANNEL_KEY, grammar="root ::= ((")  # llama.cpp refuses it: an engine error
    await start_bot()
    failed = await fake.message_create("break please")
    reply = await fake.wait_for(
        lambda: (r := fake.replies_to(failed)) and r[0]["content"].startswith("⚠️") and r, "the error line"
    )
    assert "grammar" in reply[0]["content"]
    assert (await stored(manager, CHANNEL_KEY))[-1].status == "failed"
    await force_reply(manager, CHANNEL_KEY, "Back on my feet.")
    await fake.final_reply(await fake.message_create("and now?"), "Back on my feet.")


async def test_commands_sync_to_configured_guilds_and_dms_can_be_off(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.guild_ids = [GUILD_ID]
    dsettings.discord.dms_enabled = False
    dsettings.discord.always_answer_channel_ids = [OTHER_CHANNEL_ID]
    await force_reply(manager, OTHER_KEY, "No mention needed here.")
    await start_bot()
    assert [r.path for r in fake.matching("PUT", r"/applications/.*")] == [
        f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands"
    ]
    ignored = [
        await fake.message_create("psst", dm=True, mention_bot=False),
        await fake.message_create("no mention here", mention_bot=False),
    ]
    refused = await fake.slash("status", dm=True)
    await fake.final_reply(
        await fake.message_create("anyone?", channel_id=OTHER_CHANNEL_ID, mention_bot=False), "No mention needed here."
    )
    await fake.wait_for(lambda: refused.original_id, "the DM refusal")
    [refusal] = fake.interaction_messages(refused)
    assert refusal["flags"] & EPHEMERAL_FLAG and "Direct messages are turned off" in refusal["content"]
    assert all(not fake.replies_to(mid) for mid in ignored) and len(fake.bot_messages()) == 2


async def test_the_connection_is_reported_for_readiness(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    bot = await start_bot()
    await fake.wait_for(lambda: manager.platforms.status().get("discord"), "the bot to report itself connected")
    await _stop(bot)
    assert manager.platforms.status()["discord"] is False
