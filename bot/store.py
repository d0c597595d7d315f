"""SQLite persistence through aiosqlite (WAL): sessions, messages, and seen event ids. Only module that speaks SQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from bot.errors import StoreError

__all__ = ["Store", "StoredMessage", "Status"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key            TEXT PRIMARY KEY,
    system_prompt  TEXT,             -- NULL: the configured default
    sampling       TEXT NOT NULL DEFAULT '{}',
    created_at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    session_key  TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content      TEXT NOT NULL,
    status       TEXT NOT NULL,
    author_id    TEXT NOT NULL DEFAULT '',
    author_name  TEXT NOT NULL DEFAULT '',
    created_at   REAL NOT NULL,
    notes        TEXT NOT NULL DEFAULT '', -- what the bot added below a reply (stopped, errors), never model words
    feedback     TEXT NOT NULL DEFAULT ''  -- a reply: what a user said of it ("good", "bad"), '' when nothing
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_key, id);
CREATE TABLE IF NOT EXISTS seen_events (
    event_id  TEXT PRIMARY KEY,
    expires   REAL NOT NULL
);
"""


class Status:
    """What became of a stored message. Only COMPLETE replies are fed back to the model as they are."""

    COMPLETE = "complete"
    GENERATING = "generating"  # still being written; left over after a crash, it becomes INTERRUPTED
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str
    content: str  # a reply: exactly what the model wrote
    status: str
    author_name: str
    created_at: float
    notes: str = ""  # a reply: the lines the bot showed below it (stopped, errors), kept apart from its text
    feedback: str = ""  # a reply: "good" or "bad" when a user rated it (Slack's feedback buttons)


_MESSAGE_COLUMNS = "id, role, content, status, author_name, created_at, notes, feedback"


class Store:
    """One SQLite database shared by every session. Open with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._exchange_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path)
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.executescript(_SCHEMA)
                async with db.execute("SELECT name FROM pragma_table_info('messages')") as cursor:
                    columns = {row[0] async for row in cursor}
                for column in ("notes", "feedback"):  # a database from before these were kept
                    if column not in columns:
                        await db.execute(f"ALTER TABLE messages ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
                # A reply that was still generating when the process died is cut short, not complete.
                await db.execute("UPDATE messages SET status = ? WHERE status = ?",
                                 (Status.INTERRUPTED, Status.GENERATING))
                await db.commit()
            except BaseException:
                await db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from None
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> aiosqlite.Cursor:
        try:
            cursor = await self._db.execute(sql, params)
            await self._db.commit()
            return cursor
        except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is closed
            raise StoreError(f"cannot write to the database {self.path}: {exc}") from None

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            async with self._db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except (sqlite3.Error, ValueError) as exc:
            raise StoreError(f"cannot read the database {self.path}: {exc}") from None

    async def _ensure_session(self, key: str) -> None:
        await self._write("INSERT OR IGNORE INTO sessions (key, created_at) VALUES (?, ?)", (key, time.time()))

    # -- messages ---------------------------------------------------------------------------------------

    async def add_message(self, key: str, role: str, content: str, status: str, *,
                          author_id: str = "", author_name: str = "") -> int:
        await self._ensure_session(key)
        cursor = await self._write(
            "INSERT INTO messages (session_key, role, content, status, author_id, author_name, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, role, content, status, author_id, author_name, time.time()))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def add_exchange(self, key: str, text: str, *, author_id: str, author_name: str) -> tuple[int, int]:
        """Store a user message and reserve its reply's row right after it: (message id, reply id).

        Done under one lock so another message of the session can never land between the two rows.
        """
        async with self._exchange_lock:
            user_id = await self.add_message(key, "user", text, Status.COMPLETE,
                                              author_id=author_id, author_name=author_name)
            return user_id, await self.add_message(key, "assistant", "", Status.GENERATING)

    async def message(self, message_id: int) -> StoredMessage | None:
        rows = await self._read(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        return StoredMessage(*rows[0]) if rows else None

    async def reopen_reply(self, message_id: int, content: str) -> None:
        """Make a stored reply "generating" again, holding ``content`` (Regenerate: empty; Continue: the text).
        A rating of the old answer does not carry over to the new one."""
        await self._write("UPDATE messages SET content = ?, status = ?, notes = '', feedback = '' WHERE id = ?",
                          (content, Status.GENERATING, message_id))

    async def checkpoint(self, message_id: int, content: str) -> None:
        """Save a reply's text so far while it is still generating: a crash keeps what users have seen."""
        await self._write("UPDATE messages SET content = ? WHERE id = ? AND status = ?",
                          (content, message_id, Status.GENERATING))

    async def finish_message(self, message_id: int, content: str, status: str, notes: str = "") -> None:
        await self._write("UPDATE messages SET content = ?, status = ?, notes = ? WHERE id = ?",
                          (content, status, notes, message_id))

    async def set_feedback(self, key: str, message_id: int, feedback: str) -> bool:
        """Keep a user's rating of reply ``message_id`` of session ``key``; False when there is no such reply."""
        cursor = await self._write("UPDATE messages SET feedback = ? WHERE id = ? AND session_key = ? AND role = ?",
                                   (feedback, message_id, key, "assistant"))
        return cursor.rowcount == 1

    async def messages(self, key: str, *, before_id: int | None = None, limit: int | None = None) -> list[StoredMessage]:
        """The session's messages, oldest first; with ``before_id`` / ``limit``, only the newest ones before it."""
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_key = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (key, before_id if before_id is not None else 2**62, limit if limit is not None else -1))
        return [StoredMessage(*row) for row in reversed(rows)]

    async def clear_messages(self, key: str) -> None:
        await self._write("DELETE FROM messages WHERE session_key = ?", (key,))

    # -- session settings --------------------------------------------------------------------------------

    async def system_prompt(self, key: str) -> str | None:
        rows = await self._read("SELECT system_prompt FROM sessions WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_system_prompt(self, key: str, prompt: str | None) -> None:
        await self._ensure_session(key)
        await self._write("UPDATE sessions SET system_prompt = ? WHERE key = ?", (prompt, key))

    async def sampling(self, key: str) -> dict[str, Any]:
        rows = await self._read("SELECT sampling FROM sessions WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else {}

    async def set_sampling(self, key: str, overrides: dict[str, Any]) -> None:
        await self._ensure_session(key)
        await self._write("UPDATE sessions SET sampling = ? WHERE key = ?", (json.dumps(overrides), key))

    async def session_keys(self, prefix: str) -> list[str]:
        """Keys of every stored session whose key starts with ``prefix``."""
        rows = await self._read("SELECT key FROM sessions WHERE substr(key, 1, ?) = ? ORDER BY created_at",
                                (len(prefix), prefix))
        return [row[0] for row in rows]

    async def session_summaries(self, prefix: str, limit: int) -> list[tuple[str, str, int]]:
        """(key, first user message, message count) of the newest ``limit`` sessions under ``prefix``, newest first.

        One query, without reading whole conversations: the first message is cut to 500 characters.
        """
        async with self._db.execute(
            "SELECT s.key,"
            " COALESCE((SELECT substr(m.content, 1, 500) FROM messages m"
            "           WHERE m.session_key = s.key AND m.role = 'user' ORDER BY m.id LIMIT 1), ''),"
            " (SELECT COUNT(*) FROM messages m WHERE m.session_key = s.key)"
            " FROM sessions s WHERE substr(s.key, 1, ?) = ? ORDER BY s.created_at DESC, s.rowid DESC LIMIT ?",
                (len(prefix), prefix, limit)) as cursor:
            return [(key, first, count) async for key, first, count in cursor]

    # -- event dedupe ------------------------------------------------------------------------------------

    async def claim_event(self, event_id: str, ttl_seconds: float) -> bool:
        """True the first time ``event_id`` is seen within ``ttl_seconds``; False for a repeat."""
        now = time.time()
        await self._write("DELETE FROM seen_events WHERE expires < ?", (now,))
        cursor = await self._write("INSERT OR IGNORE INTO seen_events (event_id, expires) VALUES (?, ?)",
                                   (event_id, now + ttl_seconds))
        return cursor.rowcount == 1
