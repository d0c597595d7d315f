"""Shared pieces of the Slack tests: the fake server fixture, the bot running against it, event builders."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.slack import SlackBot
from bot.config import Settings
from bot.conversations import ConversationManager
from bot.store import StoredMessage
from bot.types import SessionKey
from tests.fake_slack import APP_TOKEN, BOT_TOKEN, BOT_USER_ID, TEAM_ID, FakeMessage, FakeSlack

SIGNING_SECRET = "fake-signing-secret"
ADMIN = "UADMIN"
ACK_DEADLINE_SECONDS = 3.0
REPLY_TIMEOUT_SECONDS = 120.0  # the machine is shared; generous, never slept


def channel_key(channel: str, thread: str = "") -> SessionKey:
    return SessionKey.for_channel("slack", TEAM_ID, channel, thread)


def words(word: str, count: int) -> str:
    """A grammar forcing exactly ``count`` repetitions of `` word``; its output is known in advance."""
    return f'root ::= (" {word}"){{{count}}}'


_ts = iter(range(1, 1_000_000))


def mention(
    channel: str = "C1",
    text: str = "hello there",
    *,
    user: str = "U1",
    thread_ts: str | None = None,
    event_type: str = "app_mention",
) -> dict[str, Any]:
    ts = f"1600000000.{next(_ts):06d}"
    event = {
        "type": event_type,
        "user": user,
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "team": TEAM_ID,
    }
    if event_type == "message":
        event["channel_type"] = "channel"
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def direct_message(text: str, *, user: str = "U2", channel: str = "D1") -> dict[str, Any]:
    ts = f"1600000000.{next(_ts):06d}"
    return {
        "type": "message",
        "channel_type": "im",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "team": TEAM_ID,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as server:
        yield server


@contextlib.asynccontextmanager
async def running_bot(
    manager: ConversationManager, settings: Settings, fake: FakeSlack, *, socket_mode: bool = True, **slack: Any
) -> AsyncIterator[SlackBot]:
    """The bot pointed at the fake (api_base_url), connected, and closed when the block ends."""
    settings.slack.api_base_url = fake.base_url
    settings.slack.edit_interval = 0.2
    settings.slack.admin_user_ids = [ADMIN]
    for name, value in slack.items():
        setattr(settings.slack, name, value)
    bot = SlackBot(
        manager,
        settings.slack,
        bot_token=BOT_TOKEN,
        app_token=APP_TOKEN if socket_mode else None,
        signing_secret=SIGNING_SECRET,
    )
    await bot.start()
    try:
        if socket_mode:
            await fake.wait_connected()
        yield bot
    finally:
        await bot.close()


async def settled(bot: SlackBot) -> None:
    await asyncio.wait_for(bot.manager.wait_idle(), REPLY_TIMEOUT_SECONDS)


async def answered(
    bot: SlackBot, fake: FakeSlack, channel: str, thread_ts: str | None = None, count: int = 1
) -> list[FakeMessage]:
    """Wait until ``count`` replies have appeared there and every reply in flight is delivered."""
    await fake.wait_for(
        lambda: len(fake.messages_in(channel, thread_ts)) >= count,
        timeout=REPLY_TIMEOUT_SECONDS,
        what=f"a reply in {channel}",
    )
    await settled(bot)
    return fake.messages_in(channel, thread_ts)


async def replies(manager: ConversationManager, key: SessionKey) -> list[StoredMessage]:
    return [m for m in await manager.history(key) if m.role == "assistant"]


async def timed_ack(fake: FakeSlack, envelope_id: str, pushed_at: float) -> dict[str, Any]:
    ack = await fake.wait_ack(envelope_id, timeout=10)
    elapsed = time.monotonic() - pushed_at
    assert elapsed < ACK_DEADLINE_SECONDS, f"ack took {elapsed:.2f}s"
    return ack


async def command(fake: FakeSlack, name: str, text: str = "", **kwargs: Any) -> str:
    """Run a slash command; return the ack's text (what Slack shows the user), checking the 3 s deadline."""
    pushed_at = time.monotonic()
    ack = await timed_ack(fake, await fake.push_command(name, text, **kwargs), pushed_at)
    return str(ack.get("payload", {}).get("text", ""))
