"""Several bot processes on one database: conversation turns that span stores, start-up that leaves other
processes' replies alone, and SQLite saying it serves one process only."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import discord
import pytest
from pydantic import ValidationError

from adapters.discord import ShardedDiscordBot, make_client
from adapters.slack.blocks import STOP
from bot.config import DiscordSettings, Settings
from bot.conversations import ConversationManager
from bot.engine import Engine
from bot.store import Status, Store, open_store
from bot.types import Controls
from bot.wording import TAKEN_OVER_NOTE
from tests.conftest import MODEL_PATH
from tests.conversations.helpers import CHANNEL, Target, message
from tests.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.inference_server import InferenceServer
from tests.slack_helpers import REPLY_TIMEOUT_SECONDS, direct_message, fake, running_bot, settled, words
from tests.test_cli import ENV

__all__ = ["fake"]  # the fixture

KEY = str(CHANNEL)
OTHER = KEY + "-other"


@pytest.fixture
async def two_stores(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one PostgreSQL database, as two bot processes have."""
    first, second = await open_store(postgres_url), await open_store(postgres_url)
    yield first, second
    await first.close()
    await second.close()


async def advisory_locks(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval("SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
    finally:
        await connection.close()


async def test_processes_starting_at_once_on_a_new_database_all_start(postgres: Any) -> None:
    for _ in range(3):  # the race is narrow: several fresh databases
        url = await postgres.database()
        stores = await asyncio.gather(*(open_store(url) for _ in range(4)))
        assert {await store.schema_version() for store in stores} == {stores[0].latest_version}
        for store in stores:
            await store.close()


# -- the store's turn ------------------------------------------------------------------------------------


async def test_a_turn_on_postgres_spans_stores(two_stores: tuple[Store, Store]) -> None:
    first, second = two_stores
    entered, release = asyncio.Event(), asyncio.Event()

    async def other_process() -> None:
        async with second.turn(KEY):
            entered.set()
            await release.wait()

    async with first.turn(KEY):
        waiting = asyncio.create_task(other_process())
        await asyncio.sleep(0.3)
        assert not entered.is_set()  # the other "process" waits for the conversation
        async with asyncio.timeout(2), second.turn(OTHER):  # another conversation does not
            pass
    async with asyncio.timeout(2):
        await entered.wait()
    release.set()
    await waiting


async def test_a_turn_given_up_while_waiting_holds_nothing(two_stores: tuple[Store, Store], postgres_url: str) -> None:
    first, second = two_stores
    async with first.turn(KEY):
        waiting = asyncio.create_task(_hold(second, KEY, asyncio.Event()))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    async with asyncio.timeout(2), second.turn(KEY), first.turn(OTHER):
        assert await advisory_locks(postgres_url) == 2
    assert await advisory_locks(postgres_url) == 0


async def _hold(store: Store, key: str, release: asyncio.Event) -> None:
    async with store.turn(key):
        await release.wait()


async def test_sqlite_turns_are_one_at_a_time_per_conversation(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "one.sqlite3")
    try:
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(store, KEY, release))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(_hold(store, KEY, asyncio.Event()))
        async with asyncio.timeout(1), store.turn(OTHER):
            pass
        await asyncio.sleep(0.05)
        assert not waiter.done() and not holder.done()
        release.set()
        await holder
        await asyncio.sleep(0.05)
        assert not waiter.done()  # it holds the turn now, until its event
        waiter.cancel()
        async with asyncio.timeout(1), store.turn(KEY):  # given up, it lets the next one in
            pass
    finally:
        await store.close()


async def test_a_second_process_on_one_sqlite_file_is_told_to_use_postgresql(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "one.sqlite3"
    with caplog.at_level(logging.WARNING, logger="bot.store.sqlite"):
        first = await open_store(path)
        assert not caplog.records
        second = await open_store(path)  # its own descriptor: the lock file refuses it as it would a process
        assert len(caplog.records) == 1 and "PostgreSQL" in caplog.records[0].getMessage()
        await second.close()
        await first.close()
        caplog.clear()
        third = await open_store(path)  # the first let go when it closed
        await third.close()
        assert not caplog.records


# -- start-up ---------------------------------------------------------------------------------------------


async def test_opening_postgres_leaves_other_processes_replies_generating(
    two_stores: tuple[Store, Store], postgres_url: str
) -> None:
    running, _ = two_stores
    _, live = await running.add_exchange(KEY, "hi", author_id="u1", author_name="Ann")
    _, orphan = await running.add_exchange(OTHER, "hi", author_id="u1", author_name="Ann")
    async with running.turn(KEY):  # a process answering KEY; nobody answers OTHER (its process died)
        starting = await open_store(postgres_url)
        await starting.close()
    assert (await running.message(live)).status == Status.GENERATING  # type: ignore[union-attr]
    assert (await running.message(orphan)).status == Status.INTERRUPTED  # type: ignore[union-attr]


# -- two managers, one conversation -----------------------------------------------------------------------


class TimedTarget(Target):
    """A Target that notes when the model's text first showed and when the reply was finished."""

    def __init__(self) -> None:
        super().__init__()
        self.started: float | None = None
        self.finished: float | None = None

    def _saw(self, text: str) -> None:
        if text.startswith(("💭", "⏳")) or (self.messages and self.messages[-1] == text):
            return  # a status, or the last edit adding buttons (delivery may finish after the turn)
        self.started = self.started or time.monotonic()
        self.finished = time.monotonic()

    async def post(self, text: str, controls: Controls | None = None) -> int:
        self._saw(text)
        return await super().post(text, controls)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        self._saw(text)
        await super().edit(handle, text, controls)


@pytest.fixture
async def two_managers(
    engine: Engine, settings: Settings, two_stores: tuple[Store, Store]
) -> AsyncIterator[list[ConversationManager]]:
    managers = [ConversationManager(engine, store, settings) for store in two_stores]
    yield managers
    for manager in managers:
        await manager.shutdown()


async def test_one_conversation_on_two_managers_is_answered_once_each_in_order(
    two_managers: list[ConversationManager],
) -> None:
    texts = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a city."]
    targets = [TimedTarget() for _ in texts]
    replies = []
    for n, (text, target) in enumerate(zip(texts, targets)):  # alternate managers, as a load balancer might
        replies.append(asyncio.create_task(two_managers[n % 2].respond(message(text), target)))
        await asyncio.sleep(0.05)
    results = await asyncio.gather(*replies)
    assert [r.status for r in results] == [Status.COMPLETE] * len(texts)
    history = await two_managers[0].history(CHANNEL)
    assert [(m.role, m.content) for m in history if m.role == "user"] == [("user", t) for t in texts]
    assert [m.id for m in history if m.role == "assistant"] == [r.reply_id for r in results]
    assert all(m.status == Status.COMPLETE for m in history)
    # (Slack shows edits paced, after the turn, so the order of generation is checked on the manager above.)
    for earlier, later in zip(targets, targets[1:]):  # one reply at a time, in the order they were sent
        assert earlier.finished is not None and later.started is not None
        assert earlier.finished <= later.started


async def test_a_message_waiting_for_another_process_can_be_stopped(
    two_managers: list[ConversationManager], two_stores: tuple[Store, Store]
) -> None:
    other_process, manager = two_stores[0], two_managers[1]
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(other_process, KEY, release))
    await asyncio.sleep(0.1)
    try:
        reply = asyncio.create_task(manager.respond(message("Are you there?"), Target()))
        await asyncio.sleep(0.3)
        assert not reply.done()  # it waits for the other process's turn
        assert manager.stop(CHANNEL) == 1
        async with asyncio.timeout(2):
            result = await reply
        assert result.status == Status.STOPPED and not result.text
    finally:
        release.set()  # a store closes only once its turns are given back
        await holder
    async with asyncio.timeout(60):  # the conversation goes on: nothing was left locked
        assert (await manager.respond(message("Hello?"), Target())).status == Status.COMPLETE


# -- Discord sharding ---------------------------------------------------------------------------------------


async def test_discord_shards_come_from_the_config(manager: ConversationManager) -> None:
    plain = make_client(manager, DiscordSettings())
    sharded = make_client(manager, DiscordSettings(shard_count=4, shard_ids=[1, 3]))
    everything = make_client(manager, DiscordSettings(shard_count=2))
    # Never started, none has a session to close (discord.py's sharded close needs a started client).
    assert not isinstance(plain, discord.AutoShardedClient)
    assert isinstance(sharded, ShardedDiscordBot) and isinstance(sharded, discord.AutoShardedClient)
    assert (sharded.shard_count, sharded.shard_ids) == (4, [1, 3])
    assert (everything.shard_count, everything.shard_ids) == (2, None)  # discord.py connects all of them
    assert sharded.manager is manager and sharded.tree is not None  # still llamarelay's client


@pytest.mark.parametrize(
    "shards",
    [
        {"shard_ids": [0]},
        {"shard_count": 2, "shard_ids": [2]},
        {"shard_count": 2, "shard_ids": [1, 1]},
        {"shard_count": 0},
    ],
)
def test_discord_shards_that_cannot_work_are_refused(shards: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DiscordSettings(**shards)


# -- Slack: two bots on one app ------------------------------------------------------------------------------


async def test_two_slack_bots_answer_every_event_once_in_order(
    two_managers: list[ConversationManager], settings: Settings, fake: FakeSlack
) -> None:
    chooser = random.Random(12)
    texts = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a city.", "Name a tree."]
    async with (
        running_bot(two_managers[0], settings, fake) as first,
        running_bot(two_managers[1], settings, fake) as second,
    ):
        await fake.wait_for(lambda: fake.open_sockets == 2, what="both bots connected")
        for n, text in enumerate(texts):
            event, event_id = direct_message(text), f"Ev{n:04d}"
            await fake.push_event(event, event_id=event_id, to=chooser.randrange(2))  # whichever connection
            if n % 2 == 0:  # and some twice: Slack retries, or the other connection gets it too
                await fake.push_event(event, event_id=event_id, to=chooser.randrange(2), retry_attempt=1)
            await asyncio.sleep(0.05)
        await fake.wait_for(
            lambda: len(fake.messages_in("D1")) >= len(texts), timeout=REPLY_TIMEOUT_SECONDS, what="every reply"
        )
        await settled(first)
        await settled(second)
        await asyncio.sleep(0.5)  # a duplicate answered late would show by now
    assert len(fake.messages_in("D1")) == len(texts)
    [key] = await two_managers[0].store.session_keys("")
    history = await two_managers[0].store.messages(key)
    assert [(m.role, m.content) for m in history if m.role == "user"] == [("user", t) for t in texts]
    assert [m.role for m in history] == ["user", "assistant"] * len(texts)
    assert all(m.status == Status.COMPLETE for m in history)
    # (Slack shows edits paced, after the turn, so the order of generation is checked on the manager above.)


async def test_two_bot_processes_on_one_database_and_one_inference_server_answer_each_event_once_in_order(
    tmp_path: Path, postgres_url: str, fake: FakeSlack
) -> None:
    """Two `llamarelay run` processes on one Slack app, one PostgreSQL and one remote inference server; the fake
    Slack delivers each event to a random connection, and some twice."""
    server = await InferenceServer(tmp_path).start()
    env = {
        **ENV,
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "LLAMARELAY_DATABASE_URL": postgres_url,
        "LLAMARELAY_SLACK__API_BASE_URL": fake.base_url,
        "LLAMARELAY_WEB__ENABLED": "false",
        "LLAMARELAY_ENGINE__BACKEND": "openai",
        "LLAMARELAY_ENGINE__BASE_URL": server.base_url,
        "LLAMARELAY_SAMPLING__MAX_TOKENS": "12",
        "LLAMARELAY_SAMPLING__TEMPERATURE": "0",
    }
    bots: list[asyncio.subprocess.Process] = []
    chooser = random.Random(7)
    texts = ["Name a fruit.", "Name a color.", "Name an animal.", "Name a city.", "Name a tree."]
    try:
        for n in range(2):
            with (tmp_path / f"bot{n}.log").open("wb") as log:
                bots.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "bot",
                        "run",
                        cwd=tmp_path,
                        env={**env, "PYTHONPATH": str(Path.cwd())},
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=log,
                    )
                )
        await fake.wait_for(lambda: fake.open_sockets == 2, timeout=60, what="both processes connected")
        for n, text in enumerate(texts):
            event, event_id = direct_message(text), f"Ev{n:04d}"
            await fake.push_event(event, event_id=event_id, to=chooser.randrange(2))
            if n % 2 == 0:
                await fake.push_event(event, event_id=event_id, to=chooser.randrange(2), retry_attempt=1)
            # Apart by more than a process takes to store a message (which of two processes stores first is
            # up to them), and by less than a reply takes, so turns pass from process to process.
            await asyncio.sleep(0.5)
        store = await open_store(postgres_url)
        try:

            async def answered() -> list[Any]:
                keys = await store.session_keys("")
                history = await store.messages(keys[0]) if keys else []
                return [m for m in history if m.role == "assistant" and m.status != Status.GENERATING]

            deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
            while len(await answered()) < len(texts) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await fake.wait_for(
                lambda: len(fake.messages_in("D1")) >= len(texts),
                timeout=REPLY_TIMEOUT_SECONDS,
                what="every reply posted",
            )
            await asyncio.sleep(1.0)  # a duplicate answered late would show by now
            [key] = await store.session_keys("")
            history = await store.messages(key)
        finally:
            await store.close()
        assert [(m.role, m.content) for m in history if m.role == "user"] == [("user", t) for t in texts]
        assert [m.role for m in history] == ["user", "assistant"] * len(texts)
        assert all(m.status == Status.COMPLETE for m in history)
        assert len(fake.messages_in("D1")) == len(texts)
    finally:
        for bot in bots:
            if bot.returncode is None:
                bot.terminate()
        for bot in bots:
            assert await asyncio.wait_for(bot.wait(), 15) == 0
        await server.stop()


async def test_a_reply_of_a_killed_process_is_taken_over_by_the_survivor(
    tmp_path: Path, postgres_url: str, fake: FakeSlack
) -> None:
    """kill -9 of the process writing a reply: the other one marks it interrupted with its saved text, and its
    Slack message loses the Stop button and says why it ended."""
    lease = 3.0
    env = {
        **ENV,
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "LLAMARELAY_DATABASE_URL": postgres_url,
        "LLAMARELAY_SLACK__API_BASE_URL": fake.base_url,
        "LLAMARELAY_WEB__ENABLED": "false",
        "LLAMARELAY_ENGINE__MODEL_PATH": str(MODEL_PATH),
        "LLAMARELAY_ENGINE__N_CTX": "2048",
        "LLAMARELAY_ENGINE__N_THREADS": "1",
        "LLAMARELAY_STORE__REPLY_LEASE": str(lease),
        # A reply far longer than the test: it is still being written when its process is killed.
        "LLAMARELAY_SAMPLING__MAX_TOKENS": "2000",
        "LLAMARELAY_SAMPLING__GRAMMAR": words("lease", 1900),
        "LLAMARELAY_SAMPLING__TEMPERATURE": "0",
        "PYTHONPATH": str(Path.cwd()),
    }
    bots: list[asyncio.subprocess.Process] = []
    store = await open_store(postgres_url)
    try:
        for n in range(2):  # one at a time: the fake's first socket is the first process's
            with (tmp_path / f"bot{n}.log").open("wb") as log:
                bots.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "bot",
                        "run",
                        cwd=tmp_path,
                        env=env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=log,
                    )
                )
            await fake.wait_for(lambda n=n: fake.open_sockets == n + 1, timeout=60, what=f"process {n} connected")
        victim, survivor = bots
        await fake.push_event(direct_message("Say lease."), event_id="Ev0001", to=0)

        async def reply() -> Any:
            keys = await store.session_keys("")
            history = await store.messages(keys[0]) if keys else []
            return history[-1] if history and history[-1].role == "assistant" else None

        deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
        while not (
            (row := await reply())
            and row.content
            and fake.messages_in("D1")
            and STOP in fake.messages_in("D1")[-1].buttons
        ):
            assert time.monotonic() < deadline, "no reply was checkpointed"
            await asyncio.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        assert await asyncio.wait_for(victim.wait(), 15) == -signal.SIGKILL
        saved = await reply()
        assert saved.status == Status.GENERATING and "lease lease" in saved.content
        [shown] = fake.messages_in("D1")

        killed_at = time.monotonic()
        while (row := await reply()).status == Status.GENERATING:
            assert time.monotonic() - killed_at < 6 * lease, "the survivor did not take over the reply"
            await asyncio.sleep(0.1)
        assert (row.id, row.status, row.content, row.notes) == (
            saved.id,
            Status.INTERRUPTED,
            saved.content,
            TAKEN_OVER_NOTE,
        )
        await fake.wait_for(lambda: TAKEN_OVER_NOTE in shown.text, timeout=10, what="the message rewritten")
        assert shown.text.lstrip().startswith(saved.content.strip()) and STOP not in shown.buttons
        assert shown.buttons  # Regenerate and Continue instead, which the survivor answers
        assert survivor.returncode is None
    finally:
        await store.close()
        for bot in bots:
            if bot.returncode is None:
                bot.terminate()
        for bot in bots:
            await asyncio.wait_for(bot.wait(), 15)
    assert survivor.returncode == 0
