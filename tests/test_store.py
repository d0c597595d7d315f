"""The store, one suite over both backends: SQLite in tmp_path and PostgreSQL on a throwaway cluster."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.conversations import ConversationManager
from bot.engine import Engine
from bot.errors import StoreError
from bot.store import Status, Store, StoredToolCall, open_store, redact_url
from bot.store.sqlite import SQLiteStore
from bot.store.transfer import export_jsonl, import_jsonl
from tests.conftest import MODEL_PATH
from tests.conversations.helpers import Target, message
from tests.postgres import Cluster

KEY = "discord:g1:c1"
OTHER = "discord:g1:c2"


@pytest.fixture(params=["sqlite", "postgres"])
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a fresh database lives: an SQLite file or the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "store.sqlite3"
    return await request.getfixturevalue("postgres").database()


@pytest.fixture
async def store(target: str | Path) -> AsyncIterator[Store]:
    store = await open_store(target)
    yield store
    await store.close()


async def reply_pair(store: Store, key: str = KEY, text: str = "hi") -> tuple[int, int]:
    return await store.add_exchange(key, text, author_id="u1", author_name="Ann")


# -- messages ------------------------------------------------------------------------------------------


async def test_messages_come_back_in_order_with_every_field(store: Store) -> None:
    first = await store.add_message(KEY, "user", "one", Status.COMPLETE, author_id="u1", author_name="Ann")
    second = await store.add_message(KEY, "assistant", "two ✓", Status.COMPLETE)
    third = await store.add_message(KEY, "user", "three", Status.COMPLETE, author_name="Bob")
    await store.add_message(OTHER, "user", "elsewhere", Status.COMPLETE)
    assert first < second < third
    history = await store.messages(KEY)
    assert [(m.id, m.role, m.content, m.author_name) for m in history] == [
        (first, "user", "one", "Ann"),
        (second, "assistant", "two ✓", ""),
        (third, "user", "three", "Bob"),
    ]
    assert all(isinstance(m.created_at, float) and m.notes == "" and m.feedback == "" for m in history)
    assert [m.content for m in await store.messages(KEY, limit=2)] == ["two ✓", "three"]
    assert [m.content for m in await store.messages(KEY, before_id=third, limit=1)] == ["two ✓"]
    assert [m.content for m in await store.messages(KEY, before_id=third)] == ["one", "two ✓"]
    assert await store.message(second) == history[1]
    assert await store.message(10**9) is None
    assert await store.messages("nobody:here") == []


async def test_an_exchange_keeps_its_two_rows_together_under_concurrency(store: Store) -> None:
    pairs = await asyncio.gather(*(reply_pair(store, text=f"q{n}") for n in range(12)))
    history = await store.messages(KEY)
    assert len(history) == 24
    for user_id, reply_id in pairs:
        position = [m.id for m in history].index(user_id)
        assert history[position + 1].id == reply_id
        assert history[position + 1].role == "assistant" and history[position + 1].status == Status.GENERATING


async def test_writes_at_once_each_keep_their_own_transaction(store: Store) -> None:
    """Transactions of several statements (a clear, the readiness probe, the lease sweep) beside single writes on
    one connection: each is whole and none fails (SQLite said "cannot start a transaction within a transaction"
    when a reset met the probe at start-up)."""
    for round in range(5):
        await reply_pair(store, OTHER, text=f"other {round}")
        newest = (await reply_pair(store, text=f"q{round}"))[1]
        await asyncio.gather(
            store.clear_messages(KEY, through_id=newest),
            store.probe(),
            store.expire_leases("interrupted"),
            *(store.add_message(OTHER, "user", f"beside {round}.{n}", Status.COMPLETE) for n in range(3)),
            store.probe(),
            store.set_system_prompt(OTHER, f"prompt {round}"),
        )
        assert await store.messages(KEY) == []
        assert await store.system_prompt(OTHER) == f"prompt {round}"
    assert len(await store.messages(OTHER)) == 5 * 5


async def test_a_reply_is_checkpointed_finished_and_reopened(store: Store) -> None:
    _, reply = await reply_pair(store)
    await store.checkpoint(reply, "half")
    assert (await store.message(reply)).content == "half"  # type: ignore[union-attr]
    await store.finish_message(reply, "half a reply", Status.STOPPED, "⏹️ stopped")
    await store.checkpoint(reply, "late checkpoint")  # only a generating reply is checkpointed
    done = await store.message(reply)
    assert done is not None and (done.content, done.status, done.notes) == ("half a reply", "stopped", "⏹️ stopped")
    assert await store.set_feedback(KEY, reply, "good")
    await store.reopen_reply(reply, "half a reply")
    again = await store.message(reply)
    assert again is not None
    assert (again.content, again.status, again.notes, again.feedback) == ("half a reply", "generating", "", "")


async def test_feedback_is_kept_only_for_a_reply_of_that_session(store: Store) -> None:
    user, reply = await reply_pair(store)
    assert await store.set_feedback(KEY, reply, "bad")
    assert (await store.message(reply)).feedback == "bad"  # type: ignore[union-attr]
    assert not await store.set_feedback(KEY, user, "good")  # a user message
    assert not await store.set_feedback(OTHER, reply, "good")  # another session
    assert not await store.set_feedback(KEY, 10**9, "good")
    assert (await store.message(reply)).feedback == "bad"  # type: ignore[union-attr]


async def test_clearing_a_session_keeps_its_settings_and_other_sessions(store: Store) -> None:
    await reply_pair(store)
    await reply_pair(store, OTHER)
    await store.set_system_prompt(KEY, "Be brief.")
    newest = (await store.messages(KEY))[-1].id
    later = await store.add_message(KEY, "user", "sent while the reset ran", Status.COMPLETE)
    await store.clear_messages(KEY, through_id=newest)
    assert [m.id for m in await store.messages(KEY)] == [later]  # only what the reset saw is gone
    assert len(await store.messages(OTHER)) == 2
    assert await store.system_prompt(KEY) == "Be brief."


async def test_nul_characters_are_stored_the_same_on_both_backends(store: Store) -> None:
    _, reply = await reply_pair(store, text="a\x00b")
    await store.finish_message(reply, "c\x00d", Status.COMPLETE, "e\x00f")
    user, answer = await store.messages(KEY)
    assert (user.content, answer.content, answer.notes) == ("a\ufffdb", "c\ufffdd", "e\ufffdf")


# -- session settings ----------------------------------------------------------------------------------


async def test_a_sessions_model_and_the_model_of_each_reply(store: Store) -> None:
    assert await store.model(KEY) is None
    await store.set_model(KEY, "second")
    await store.set_system_prompt(KEY, "Be brief.")  # another setting leaves the model alone
    assert await store.model(KEY) == "second" and await store.model(OTHER) is None
    _, reply = await reply_pair(store)
    await store.finish_message(reply, "partly", Status.STOPPED, model="second")
    await store.finish_message(reply, "partly", Status.INTERRUPTED)  # no model said: the stored one stays
    assert [(m.role, m.model) for m in await store.messages(KEY)] == [("user", ""), ("assistant", "second")]
    await store.set_model(KEY, None)
    assert await store.model(KEY) is None and await store.system_prompt(KEY) == "Be brief."


async def test_system_prompt_and_sampling_per_session(store: Store) -> None:
    assert await store.system_prompt(KEY) is None and await store.sampling(KEY) == {}
    await store.set_system_prompt(KEY, "You are a pirate.")
    await store.set_sampling(KEY, {"temperature": 0.2, "max_tokens": 64})
    assert await store.system_prompt(KEY) == "You are a pirate."
    assert await store.sampling(KEY) == {"temperature": 0.2, "max_tokens": 64}
    assert await store.system_prompt(OTHER) is None and await store.sampling(OTHER) == {}
    await store.set_system_prompt(KEY, None)
    await store.set_sampling(KEY, {})
    assert await store.system_prompt(KEY) is None and await store.sampling(KEY) == {}
    assert await store.messages(KEY) == []  # settings alone make a session, not a message


async def test_session_keys_and_summaries_by_prefix(store: Store) -> None:
    keys = ["web:u1:a", "web:u1:b", "web:u1:c", "web:u10:x", "web:u_:y"]
    for key in keys:
        await store.set_sampling(key, {})
    await store.add_message("web:u1:a", "assistant", "an assistant first", Status.COMPLETE)
    await store.add_message("web:u1:a", "user", "question " + "x" * 600, Status.COMPLETE)
    await store.add_message("web:u1:a", "user", "second question", Status.COMPLETE)
    await store.add_message("web:u1:c", "user", "c's question", Status.COMPLETE)
    assert await store.session_keys("web:u1:") == ["web:u1:a", "web:u1:b", "web:u1:c"]
    assert await store.session_keys("web:u_:") == ["web:u_:y"]  # no pattern characters
    assert await store.session_keys("web:u1:a") == ["web:u1:a"]
    assert await store.session_summaries("web:u1:", 2) == [("web:u1:c", "c's question", 1), ("web:u1:b", "", 0)]
    oldest = (await store.session_summaries("web:u1:", 10))[-1]
    assert oldest == ("web:u1:a", ("question " + "x" * 600)[:500], 3)


# -- event dedupe --------------------------------------------------------------------------------------


async def test_an_event_is_claimed_once_until_it_expires(store: Store) -> None:
    assert await store.claim_event("ev1", 60)
    assert not await store.claim_event("ev1", 60)
    assert await store.claim_event("ev2", 60)
    assert await store.claim_event("short", 0.01)
    await asyncio.sleep(0.05)
    assert await store.claim_event("short", 60)
    assert not await store.claim_event("ev1", 60)


async def test_claims_from_two_stores_on_one_database_count_once(target: str | Path) -> None:
    stores = [await open_store(target), await open_store(target)]
    try:
        claims = await asyncio.gather(*(stores[n % 2].claim_event(f"ev{n // 2}", 60) for n in range(20)))
        assert sum(claims) == 10
    finally:
        for store in stores:
            await store.close()


# -- leases: replies of a process that died ------------------------------------------------------------------


async def test_a_reply_whose_lease_lapses_is_interrupted_once_with_its_text(target: str | Path) -> None:
    # Two stores on one database, as two processes have (on SQLite: the same process, opened twice).
    writer, survivor = await open_store(target), await open_store(target)
    try:
        _, lapsing = await writer.add_exchange(KEY, "hi", author_id="u1", author_name="Ann", lease_seconds=0.5)
        _, renewed = await writer.add_exchange(OTHER, "hi", author_id="u1", author_name="Ann", lease_seconds=0.5)
        _, unleased = await reply_pair(writer, "discord:g1:c3")  # no lease: left to the open-time check
        await writer.checkpoint(lapsing, "as far as it got")
        await writer.set_message_ref(lapsing, "where it is")
        assert await survivor.expire_leases("gone") == []  # not yet run out
        for _ in range(3):  # the process answering OTHER is alive: it keeps renewing
            await asyncio.sleep(0.3)
            await writer.renew_leases([renewed], 0.5)
        sweeps = await asyncio.gather(survivor.expire_leases("⚠️ gone"), writer.expire_leases("⚠️ gone"))
        assert sorted([(r.id, r.session_key, r.content, r.message_ref) for r in sweep] for sweep in sweeps) == [
            [],
            [(lapsing, KEY, "as far as it got", "where it is")],
        ]  # taken over once, by one of them
        cut = await writer.message(lapsing)
        assert cut is not None and (cut.status, cut.content, cut.notes) == (
            Status.INTERRUPTED,
            "as far as it got",
            "⚠️ gone",
        )
        assert (await writer.message(renewed)).status == Status.GENERATING  # type: ignore[union-attr]
        assert (await writer.message(unleased)).status == Status.GENERATING  # type: ignore[union-attr]
        await writer.checkpoint(lapsing, "a late checkpoint")  # the dead process's writes change nothing
        await writer.renew_leases([lapsing], 60)
        assert (await writer.message(lapsing)).content == "as far as it got"  # type: ignore[union-attr]
        await writer.finish_message(renewed, "done", Status.COMPLETE)
        await asyncio.sleep(0.6)
        assert await survivor.expire_leases("gone") == []  # a finished reply's lease means nothing
    finally:
        await writer.close()
        await survivor.close()


async def test_a_reopened_reply_is_leased_afresh_and_forgets_its_old_message(store: Store) -> None:
    _, reply = await reply_pair(store)
    await store.finish_message(reply, "an answer", Status.COMPLETE)
    await store.set_message_ref(reply, "the old message")
    await store.reopen_reply(reply, "an answer", lease_seconds=0.2)
    await asyncio.sleep(0.4)
    [lapsed] = await store.expire_leases("gone")
    assert (lapsed.id, lapsed.content, lapsed.message_ref) == (reply, "an answer", "")


async def test_leases_and_message_references_are_not_exported(store: Store, tmp_path: Path) -> None:
    _, reply = await store.add_exchange(KEY, "hi", author_id="u1", author_name="Ann", lease_seconds=60)
    await store.set_message_ref(reply, "where it is")
    assert await export_jsonl(store, tmp_path / "out.jsonl") == (1, 2)
    copy = await open_store(tmp_path / "copy.sqlite3")
    try:
        assert await import_jsonl(copy, tmp_path / "out.jsonl") == (1, 2)
        assert [m.content for m in await copy.messages(KEY)] == ["hi", ""]
    finally:
        await copy.close()


# -- lifecycle and schema ------------------------------------------------------------------------------


async def test_a_reply_cut_by_a_crash_is_interrupted_on_the_next_open(target: str | Path) -> None:
    store = await open_store(target)
    _, reply = await reply_pair(store)
    await store.checkpoint(reply, "what users saw")
    await store.close()
    store = await open_store(target)
    try:
        cut = await store.message(reply)
        assert cut is not None and (cut.status, cut.content) == (Status.INTERRUPTED, "what users saw")
    finally:
        await store.close()


async def test_a_closed_store_raises_store_error(target: str | Path) -> None:
    store = await open_store(target)
    await store.close()
    with pytest.raises(StoreError):
        await store.messages(KEY)


async def test_tool_messages_are_kept_in_order_with_their_reply_and_cleared_with_it(store: Store) -> None:
    _, reply = await reply_pair(store)
    first = StoredToolCall(reply, 1, "add", '{"a": 2}', "5", False)
    second = StoredToolCall(reply, 2, "crash", "{}", "the tool crash failed: gone\x00", True)
    await store.add_tool_call(first)
    await store.add_tool_call(second)
    assert await store.tool_calls(reply) == [
        first,
        StoredToolCall(reply, 2, "crash", "{}", "the tool crash failed: gone\ufffd", True),
    ]
    assert await store.tool_calls(reply + 1) == []
    assert await store.tool_calls(reply, key=KEY) == await store.tool_calls(reply)
    assert await store.tool_calls(reply, key=OTHER) == []  # a button naming it from elsewhere sees nothing
    assert await store.with_tool_calls([reply, reply - 1, reply + 1]) == {reply}
    assert await store.with_tool_calls([]) == set()
    await store.clear_messages(KEY, through_id=reply)
    assert await store.tool_calls(reply) == []
    assert await store.with_tool_calls([reply]) == set()


async def test_a_new_database_is_at_the_latest_version(store: Store) -> None:
    assert store.latest_version == 7
    assert await store.schema_version() == store.latest_version
    assert await store.migrate() == []


async def test_an_older_database_is_upgraded_at_open(target: str | Path) -> None:
    old = await open_store(target, migrate=False)
    assert await old.schema_version() == 0
    old.MIGRATIONS = type(old).MIGRATIONS[:1]  # type: ignore[misc]  # this process only knows step 1
    assert await old.migrate() == [1]
    await old.add_message(KEY, "user", "from long ago", Status.COMPLETE)
    await old.close()
    store = await open_store(target)
    try:
        assert await store.schema_version() == 7
        assert await store.migrate() == []
        [kept] = await store.messages(KEY)
        assert (kept.content, kept.notes, kept.feedback, kept.model) == ("from long ago", "", "", "")
        assert await store.model(KEY) is None
    finally:
        await store.close()


async def test_a_database_newer_than_this_llamarelay_is_refused(target: str | Path) -> None:
    store = await open_store(target)
    store.MIGRATIONS = (*type(store).MIGRATIONS, ("CREATE TABLE future (x INTEGER)",))  # type: ignore[misc]
    future = len(store.MIGRATIONS)
    assert await store.migrate() == [future]
    await store.close()
    with pytest.raises(StoreError, match=f"schema version {future}, newer than this llamarelay knows"):
        await open_store(target)


OLD_SQLITE_SCHEMA = """
CREATE TABLE sessions (key TEXT PRIMARY KEY, system_prompt TEXT, sampling TEXT NOT NULL DEFAULT '{}',
                       created_at REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, session_key TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), content TEXT NOT NULL, status TEXT NOT NULL,
    author_id TEXT NOT NULL DEFAULT '', author_name TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL);
CREATE INDEX messages_by_session ON messages (session_key, id);
CREATE TABLE seen_events (event_id TEXT PRIMARY KEY, expires REAL NOT NULL);
INSERT INTO sessions VALUES ('discord:g1:c1', 'Be old.', '{"top_k": 5}', 1.0);
INSERT INTO messages (session_key, role, content, status, created_at)
    VALUES ('discord:g1:c1', 'user', 'hello', 'complete', 1.0),
           ('discord:g1:c1', 'assistant', 'half', 'generating', 2.0);
"""


def make_old_sqlite(path: Path, extra: str = "") -> None:
    """A database as llamarelay wrote it before versions and notes were kept."""
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SQLITE_SCHEMA + extra)
    db.close()


@pytest.mark.parametrize(
    ("extra", "adopted"), [("", 1), ("ALTER TABLE messages ADD COLUMN notes TEXT NOT NULL DEFAULT '';", 2)]
)
async def test_an_unversioned_sqlite_database_is_upgraded(tmp_path: Path, extra: str, adopted: int) -> None:
    path = tmp_path / "old.sqlite3"
    make_old_sqlite(path, extra)
    store = await open_store(path, migrate=False)
    assert await store.schema_version() == adopted
    await store.close()
    store = await open_store(path)
    try:
        assert await store.schema_version() == store.latest_version
        history = await store.messages(KEY)
        assert [(m.content, m.status, m.notes, m.feedback) for m in history] == [
            ("hello", "complete", "", ""),
            ("half", "interrupted", "", ""),
        ]
        assert await store.system_prompt(KEY) == "Be old." and await store.sampling(KEY) == {"top_k": 5}
        assert await store.set_feedback(KEY, history[1].id, "good")
    finally:
        await store.close()


# -- export and import ---------------------------------------------------------------------------------


async def fill(store: Store) -> None:
    """Two conversations with settings, every status, notes, feedback and authors."""
    await store.set_system_prompt(KEY, "Answer in French. «ça»")
    await store.set_sampling(KEY, {"temperature": 0.3})
    await store.set_model(KEY, "second")
    _, reply = await reply_pair(store, text="Bonjour 👋\nsecond line")
    await store.finish_message(reply, "Salut !", Status.COMPLETE, model="second")
    await store.set_feedback(KEY, reply, "good")
    _, stopped = await reply_pair(store, text="tell a story")
    await store.finish_message(stopped, "Once upon", Status.STOPPED, "⏹️ stopped by Ann")
    await store.add_message(OTHER, "user", "only a question", Status.COMPLETE, author_id="u9", author_name="Zoé")
    _, failed = await reply_pair(store, OTHER, "and another")
    await store.finish_message(failed, "", Status.FAILED, "⚠️ the model failed")


async def dumped(store: Store) -> list[tuple[str, dict[str, object]]]:
    return [record async for record in store.dump()]


async def test_export_and_import_round_trip_sqlite_postgres_sqlite(tmp_path: Path, postgres: Cluster) -> None:
    source = await open_store(tmp_path / "source.sqlite3")
    await fill(source)
    original = await dumped(source)
    assert await export_jsonl(source, tmp_path / "one.jsonl") == (2, 7)
    await source.close()

    middle = await open_store(await postgres.database())
    try:
        assert await import_jsonl(middle, tmp_path / "one.jsonl") == (2, 7)
        assert await dumped(middle) == original
        with pytest.raises(StoreError, match="already holds conversations"):
            await import_jsonl(middle, tmp_path / "one.jsonl")
        await export_jsonl(middle, tmp_path / "two.jsonl")
        newest = max(int(record["id"]) for kind, record in original if kind == "message")  # type: ignore[call-overload]
        assert await middle.add_message(KEY, "user", "after the move", Status.COMPLETE) > newest
    finally:
        await middle.close()
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()

    back = await open_store(tmp_path / "back.sqlite3")
    try:
        await import_jsonl(back, tmp_path / "two.jsonl")
        assert await dumped(back) == original
        assert await back.system_prompt(KEY) == "Answer in French. «ça»"
        assert [m.feedback for m in await back.messages(KEY)] == ["", "good", "", ""]
        assert await back.model(KEY) == "second" and await back.model(OTHER) is None
        assert [m.model for m in await back.messages(KEY)] == ["", "second", "", ""]
    finally:
        await back.close()


async def test_an_export_from_before_schema_7_imports_without_models(store: Store, tmp_path: Path) -> None:
    old = tmp_path / "old.jsonl"
    old.write_text(
        '{"type": "llamarelay-export", "version": 1, "schema": 6}\n'
        f'{{"type": "session", "key": "{KEY}", "system_prompt": null, "sampling": {{}}, '
        '"created_at": 1.0}\n'
        f'{{"type": "message", "id": 5, "session_key": "{KEY}", "role": "user", "content": "old", '
        '"status": "complete", "author_id": "", "author_name": "", "created_at": 1.0, "notes": "", '
        '"feedback": ""}\n'
    )
    assert await import_jsonl(store, old) == (1, 1)
    assert await store.model(KEY) is None
    assert [(m.content, m.model) for m in await store.messages(KEY)] == [("old", "")]


async def test_import_refuses_a_file_that_is_not_an_export(store: Store, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(StoreError, match="is not a llamarelay export"):
        await import_jsonl(store, bad)
    bad.write_text('{"type": "llamarelay-export", "version": 1, "schema": 3}\n{"type": "message", "id": 1}\n')
    with pytest.raises(StoreError, match="bad.jsonl:2: a message has exactly these fields"):
        await import_jsonl(store, bad)
    assert await store.session_keys("") == []


# -- the command line ----------------------------------------------------------------------------------


def llamarelay(*args: str, config: Path, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLAMARELAY_DATABASE_URL"}
    if database_url:
        env["LLAMARELAY_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def sqlite_config(directory: Path, name: str) -> Path:
    config = directory / f"{name}.toml"
    config.write_text(f'[engine]\nmodel_path = "{MODEL_PATH}"\n[store]\npath = "{name}.sqlite3"\n')
    return config


async def test_the_migrate_command_shows_and_applies_migrations(tmp_path: Path) -> None:
    make_old_sqlite(tmp_path / "old.sqlite3")
    config = sqlite_config(tmp_path, "old")
    first = llamarelay("migrate", config=config)
    assert first.returncode == 0, first.stderr
    assert "schema version: 1 (latest: 7)" in first.stdout and "applied migrations: 2, 3, 4, 5, 6, 7" in first.stdout
    again = llamarelay("migrate", config=config)
    assert "schema version: 7 (latest: 7)" in again.stdout and "up to date" in again.stdout


async def test_the_commands_move_conversations_to_postgres_with_the_url_from_the_environment(
    tmp_path: Path, postgres: Cluster
) -> None:
    source = await open_store(tmp_path / "small.sqlite3")
    await fill(source)
    original = await dumped(source)
    await source.close()
    url = (await postgres.database()).replace("llamarelay@", "llamarelay:s3cret-pw@")  # trust auth ignores it
    exported = llamarelay("export", str(tmp_path / "all.jsonl"), config=sqlite_config(tmp_path, "small"))
    assert exported.returncode == 0 and "exported 2 conversations, 7 messages" in exported.stdout, exported.stderr
    # A config naming SQLite: the environment's URL wins, and the password is never printed.
    imported = llamarelay(
        "import", str(tmp_path / "all.jsonl"), config=sqlite_config(tmp_path, "unused"), database_url=url
    )
    assert imported.returncode == 0, imported.stderr
    assert "imported 2 conversations, 7 messages into " + redact_url(url) in imported.stdout
    assert "s3cret-pw" not in imported.stdout + imported.stderr and "***" in redact_url(url)
    assert not (tmp_path / "unused.sqlite3").exists()
    store = await open_store(url)
    try:
        assert await dumped(store) == original
    finally:
        await store.close()
    again = llamarelay(
        "import", str(tmp_path / "all.jsonl"), config=sqlite_config(tmp_path, "unused"), database_url=url
    )
    assert again.returncode == 1 and "already holds conversations" in again.stderr
    assert "s3cret-pw" not in again.stderr


# -- a conversation on PostgreSQL ----------------------------------------------------------------------


async def test_a_conversation_on_postgres_with_the_real_engine(
    engine: Engine, settings: Settings, postgres: Cluster
) -> None:
    settings.store.url = await postgres.database()
    store = await open_store(settings.store.target({}))
    assert not isinstance(store, SQLiteStore)
    manager = ConversationManager(engine, store, settings)
    try:
        await manager.set_system_prompt(message("").key, "Be terse.")
        result = await manager.respond(message("What is the capital of France?"), target := Target())
        assert result.status == Status.COMPLETE and result.text.strip()
        assert target.messages[-1] == result.text
        history = await manager.history(message("").key)
        assert [(m.role, m.status) for m in history] == [("user", Status.COMPLETE), ("assistant", Status.COMPLETE)]
        assert history[0].content == "What is the capital of France?" and history[1].content == result.text
        assert await manager.system_prompt(message("").key) == "Be terse."
    finally:
        await manager.shutdown()
        await store.close()
    assert not (Path(settings.store.path)).exists()


# -- configuration -------------------------------------------------------------------------------------


def test_the_environment_url_wins_over_the_config_and_the_path_is_the_fallback() -> None:
    settings = Settings.model_validate({"store": {"path": "chat.sqlite3"}})
    assert settings.store.target({}) == Path("chat.sqlite3")
    settings = Settings.model_validate({"store": {"url": "postgresql://bot@db/chat"}})
    assert settings.store.target({}) == "postgresql://bot@db/chat"
    assert (
        settings.store.target({"LLAMARELAY_DATABASE_URL": "postgresql://bot:pw@db2/chat"})
        == "postgresql://bot:pw@db2/chat"
    )
    with pytest.raises(ValueError, match="must be a postgresql:// URL"):
        Settings.model_validate({"store": {"url": "mysql://bot@db/chat"}})


async def test_an_unreachable_database_names_it_without_its_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    refused = rf"cannot connect to the database postgresql://bot:\*\*\*@127.0.0.1:{port}/x"
    with pytest.raises(StoreError, match=refused) as failure:
        await open_store(f"postgresql://bot:hunter2@127.0.0.1:{port}/x")
    assert "hunter2" not in str(failure.value)
