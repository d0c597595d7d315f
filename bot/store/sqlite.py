"""SQLite backend through aiosqlite (WAL): one file, one connection, one process.

Over 400 lines: every query of the store interface in this dialect, kept in one file as `postgres.py` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from bot.errors import StoreError
from bot.store import (
    MESSAGE_FIELDS,
    PROBE_EVENT,
    SESSION_FIELDS,
    LapsedReply,
    Status,
    Store,
    StoredImage,
    StoredMessage,
    StoredToolCall,
    storable,
)
from bot.types import ImagePart

__all__ = ["SQLiteStore", "ONE_PROCESS_ONLY"]

log = logging.getLogger(__name__)

ONE_PROCESS_ONLY = (
    "another process has the SQLite database {path} open: SQLite serves one bot process only, so "
    "replies may come out of order or twice; several processes need PostgreSQL ([store] url)"
)

_MESSAGE_COLUMNS = "id, role, content, status, author_name, created_at, notes, feedback, model"

# Version n is MIGRATIONS[n - 1]. Never edit a released step: add the next one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: sessions, messages, seen events
        """CREATE TABLE IF NOT EXISTS sessions (
            key            TEXT PRIMARY KEY,
            system_prompt  TEXT,             -- NULL: the configured default
            sampling       TEXT NOT NULL DEFAULT '{}',
            created_at     REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS messages (
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            session_key  TEXT NOT NULL,
            role         TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content      TEXT NOT NULL,
            status       TEXT NOT NULL,
            author_id    TEXT NOT NULL DEFAULT '',
            author_name  TEXT NOT NULL DEFAULT '',
            created_at   REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_key, id)",
        "CREATE TABLE IF NOT EXISTS seen_events (event_id TEXT PRIMARY KEY, expires REAL NOT NULL)",
    ),
    # 2: what the bot added below a reply (stopped, errors), never model words
    ("ALTER TABLE messages ADD COLUMN notes TEXT NOT NULL DEFAULT ''",),
    # 3: what a user said of a reply ("good", "bad"), '' when nothing
    ("ALTER TABLE messages ADD COLUMN feedback TEXT NOT NULL DEFAULT ''",),
    # 4: a generating reply's lease (Unix time, renewed by its process) and where its platform message is
    (
        "ALTER TABLE messages ADD COLUMN lease_until REAL",
        "ALTER TABLE messages ADD COLUMN message_ref TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX messages_leased ON messages (lease_until) WHERE status = 'generating'",
    ),
    (  # 5: images of user messages; data NULL once pruned to keep the images' disk budget
        """CREATE TABLE images (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id  INTEGER NOT NULL,
            position    INTEGER NOT NULL,
            name        TEXT NOT NULL,
            media_type  TEXT NOT NULL,
            width       INTEGER NOT NULL,
            height      INTEGER NOT NULL,
            bytes       INTEGER NOT NULL,
            data        BLOB,
            created_at  REAL NOT NULL
        )""",
        "CREATE INDEX images_by_message ON images (message_id, position)",
        "CREATE INDEX images_kept ON images (id) WHERE data IS NOT NULL",
    ),
    (  # 6: tool messages: each call a reply made and the result fed back to the model
        """CREATE TABLE tool_calls (
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            reply_id    INTEGER NOT NULL,
            round       INTEGER NOT NULL,
            tool        TEXT NOT NULL,
            arguments   TEXT NOT NULL,
            result      TEXT NOT NULL,
            is_error    BOOLEAN NOT NULL,
            created_at  REAL NOT NULL
        )""",
        "CREATE INDEX tool_calls_by_reply ON tool_calls (reply_id, id)",
    ),
    (  # 7: a conversation's own model (NULL: inherited, else the default) and the model that wrote each reply
        # (a database from before versions were kept may lack the sessions table: step 1's, made first)
        """CREATE TABLE IF NOT EXISTS sessions (
            key            TEXT PRIMARY KEY,
            system_prompt  TEXT,
            sampling       TEXT NOT NULL DEFAULT '{}',
            created_at     REAL NOT NULL
        )""",
        "ALTER TABLE sessions ADD COLUMN model TEXT",
        "ALTER TABLE messages ADD COLUMN model TEXT NOT NULL DEFAULT ''",
    ),
)


class SQLiteStore(Store):
    """One SQLite database shared by every session."""

    MIGRATIONS = MIGRATIONS

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._exchange_lock = asyncio.Lock()
        # One write at a time on the one connection: a transaction spans awaits, and a write beside it would join
        # it (or fail to BEGIN its own) and commit the other's half.
        self._writing = asyncio.Lock()
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}  # per session: its lock, and who holds or waits
        self._owner = _claim(path)  # the lock file held while open: a second process is told at once
        self._file: tuple[int, int] | None = None  # (device, inode) of the file this connection writes
        self._lost: str | None = None  # why nothing can be saved any more, once the file is gone

    @classmethod
    async def open(cls, target: Path | str, *, migrate: bool = True) -> SQLiteStore:
        path = Path(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database {path}: {exc}") from None
        store = cls(db, path)
        try:
            await store._write("PRAGMA journal_mode=WAL")
            store._file = _identity(path)
            await store._adopt_unversioned()
            version = await store.schema_version()
            if version > store.latest_version:
                raise StoreError(
                    f"the database {path} has schema version {version}, newer than this llamarelay "
                    f"knows ({store.latest_version}): upgrade llamarelay"
                )
            if migrate:
                await store.migrate()
                # A reply that was still generating when the process died is cut short, not complete.
                await store._write(
                    "UPDATE messages SET status = ? WHERE status = ?", (Status.INTERRUPTED, Status.GENERATING)
                )
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        with contextlib.suppress(StoreError):  # a file that went away says so, at the latest here
            self._check_file()
        await self._db.close()
        if self._owner is not None:
            os.close(self._owner)  # closing the file lets go of its lock
            self._owner = None

    async def probe(self) -> None:
        async with self._immediate("write to"):
            await self._db.execute(
                "INSERT OR REPLACE INTO seen_events (event_id, expires) VALUES (?, ?)", (PROBE_EVENT, time.time())
            )

    # -- schema ------------------------------------------------------------------------------------------

    async def _adopt_unversioned(self) -> None:
        """Record the version of a database made before versions were kept (its columns tell which)."""
        tables = {row[0] for row in await self._read("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_migrations" in tables:
            return
        version = 0
        if "messages" in tables:
            columns = {row[0] for row in await self._read("SELECT name FROM pragma_table_info('messages')")}
            version = 3 if "feedback" in columns else 2 if "notes" in columns else 1
        await self._transaction(
            ["CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)"]
            + [f"INSERT INTO schema_migrations VALUES ({v}, {time.time()})" for v in range(1, version + 1)]
        )

    async def schema_version(self) -> int:
        return (await self._read("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))[0][0]

    async def migrate(self) -> list[int]:
        applied = []
        for version in range(await self.schema_version() + 1, self.latest_version + 1):
            await self._transaction(
                [*self.MIGRATIONS[version - 1], f"INSERT INTO schema_migrations VALUES ({version}, {time.time()})"]
            )
            applied.append(version)
        return applied

    async def _transaction(self, statements: list[str]) -> None:
        async with self._immediate("write to"):
            for statement in statements:
                await self._db.execute(statement)

    # -- plumbing ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        """sqlite3's errors as one `StoreError` line: "cannot <doing> the database <path>"."""
        try:
            yield
        except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is closed
            raise StoreError(f"cannot {doing} the database {self.path}: {exc}") from None

    def _check_file(self) -> None:
        """Raise StoreError once the path no longer holds the file this connection writes (deleted or replaced
        under the running bot): every write would go to a file that no one will open again. Logged once."""
        if self._lost is None and self._file is not None:
            try:
                same = _identity(self.path) == self._file
            except OSError:
                same = False
            if not same:
                self._lost = (
                    f"the database file {self.path} was deleted or replaced while the bot was running: "
                    "nothing can be saved until llamarelay is restarted"
                )
                log.error("%s", self._lost)
        if self._lost is not None:
            raise StoreError(self._lost)

    @contextlib.asynccontextmanager
    async def _immediate(self, doing: str) -> AsyncIterator[None]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT), rolled back if anything in it fails."""
        self._check_file()
        async with self._writing:
            with self._failing(doing):
                await self._db.execute("BEGIN IMMEDIATE")
                async with self._committing():
                    yield

    @contextlib.asynccontextmanager
    async def _committing(self) -> AsyncIterator[None]:
        """Commit what the context wrote, or roll it back if anything failed, the commit included: a write the
        disk refused must not stay pending, to be committed later with someone else's."""
        try:
            yield
            await self._db.commit()
        except BaseException:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await self._db.rollback()
            raise

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> aiosqlite.Cursor:
        self._check_file()
        async with self._writing:
            with self._failing("write to"):
                async with self._committing():
                    return await self._db.execute(sql, params)

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._failing("read"):
            async with self._db.execute(sql, params) as cursor:
                return list(await cursor.fetchall())

    async def _ensure_session(self, key: str) -> None:
        await self._write("INSERT OR IGNORE INTO sessions (key, created_at) VALUES (?, ?)", (key, time.time()))

    # -- messages ---------------------------------------------------------------------------------------

    async def add_message(
        self, key: str, role: str, content: str, status: str, *, author_id: str = "", author_name: str = ""
    ) -> int:
        await self._ensure_session(key)
        cursor = await self._write(
            "INSERT INTO messages (session_key, role, content, status, author_id, author_name, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, role, storable(content), status, author_id, storable(author_name), time.time()),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def add_exchange(
        self, key: str, text: str, *, author_id: str, author_name: str, lease_seconds: float | None = None
    ) -> tuple[int, int]:
        async with self._exchange_lock:  # one process per SQLite file: a lock in memory is enough
            user_id = await self.add_message(
                key, "user", text, Status.COMPLETE, author_id=author_id, author_name=author_name
            )
            reply_id = await self.add_message(key, "assistant", "", Status.GENERATING)
        if lease_seconds is not None:
            await self.renew_leases([reply_id], lease_seconds)
        return user_id, reply_id

    async def message(self, message_id: int) -> StoredMessage | None:
        rows = await self._read(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        return StoredMessage(*rows[0]) if rows else None

    async def reopen_reply(self, message_id: int, content: str, *, lease_seconds: float | None = None) -> None:
        await self._write(
            "UPDATE messages SET content = ?, status = ?, notes = '', feedback = '', message_ref = '',"
            " lease_until = ? WHERE id = ?",
            (
                storable(content),
                Status.GENERATING,
                None if lease_seconds is None else time.time() + lease_seconds,
                message_id,
            ),
        )

    async def renew_leases(self, message_ids: Iterable[int], seconds: float) -> None:
        ids = list(message_ids)
        if ids:
            marks = ", ".join("?" * len(ids))
            await self._write(
                f"UPDATE messages SET lease_until = ? WHERE status = ? AND id IN ({marks})",
                (time.time() + seconds, Status.GENERATING, *ids),
            )

    async def expire_leases(self, note: str) -> list[LapsedReply]:
        async with self._immediate("write to"):
            async with self._db.execute(
                "UPDATE messages SET status = ?, notes = ?, lease_until = NULL WHERE status = ? AND lease_until < ?"
                " RETURNING id, session_key, content, message_ref",
                (Status.INTERRUPTED, storable(note), Status.GENERATING, time.time()),
            ) as cursor:
                rows = list(await cursor.fetchall())
        return [LapsedReply(*row) for row in sorted(rows)]

    async def set_message_ref(self, message_id: int, ref: str) -> None:
        await self._write("UPDATE messages SET message_ref = ? WHERE id = ?", (ref, message_id))

    async def checkpoint(self, message_id: int, content: str) -> None:
        await self._write(
            "UPDATE messages SET content = ? WHERE id = ? AND status = ?",
            (storable(content), message_id, Status.GENERATING),
        )

    async def finish_message(
        self, message_id: int, content: str, status: str, notes: str = "", *, model: str | None = None
    ) -> None:
        await self._write(
            "UPDATE messages SET content = ?, status = ?, notes = ?, model = COALESCE(?, model) WHERE id = ?",
            (storable(content), status, storable(notes), model, message_id),
        )

    async def set_feedback(self, key: str, message_id: int, feedback: str) -> bool:
        cursor = await self._write(
            "UPDATE messages SET feedback = ? WHERE id = ? AND session_key = ? AND role = ?",
            (feedback, message_id, key, "assistant"),
        )
        return cursor.rowcount == 1

    async def messages(
        self, key: str, *, before_id: int | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_key = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (key, before_id if before_id is not None else 2**62, limit if limit is not None else -1),
        )
        return [StoredMessage(*row) for row in reversed(rows)]

    async def clear_messages(self, key: str, through_id: int) -> None:
        async with self._immediate("write to"):
            await self._db.execute(
                "DELETE FROM images WHERE message_id IN (SELECT id FROM messages WHERE session_key = ? AND id <= ?)",
                (key, through_id),
            )
            await self._db.execute(
                "DELETE FROM tool_calls WHERE reply_id IN (SELECT id FROM messages WHERE session_key = ? AND id <= ?)",
                (key, through_id),
            )
            await self._db.execute("DELETE FROM messages WHERE session_key = ? AND id <= ?", (key, through_id))

    # -- tool messages -----------------------------------------------------------------------------------

    async def add_tool_call(self, call: StoredToolCall) -> None:
        async with self._immediate("write to"):
            await self._db.execute(
                "INSERT INTO tool_calls (reply_id, round, tool, arguments, result, is_error, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    call.reply_id,
                    call.round,
                    storable(call.tool),
                    storable(call.arguments),
                    storable(call.result),
                    call.is_error,
                    time.time(),
                ),
            )

    async def tool_calls(self, reply_id: int, *, key: str | None = None) -> list[StoredToolCall]:
        in_key = "" if key is None else " AND reply_id IN (SELECT id FROM messages WHERE session_key = ?)"
        rows = await self._read(
            "SELECT reply_id, round, tool, arguments, result, is_error FROM tool_calls "
            f"WHERE reply_id = ?{in_key} ORDER BY id",
            (reply_id, *([] if key is None else [key])),
        )
        return [StoredToolCall(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    async def with_tool_calls(self, reply_ids: Iterable[int]) -> set[int]:
        ids = list(reply_ids)
        found: set[int] = set()
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            rows = await self._read(
                f"SELECT DISTINCT reply_id FROM tool_calls WHERE reply_id IN ({', '.join('?' * len(chunk))})",
                tuple(chunk),
            )
            found.update(int(row[0]) for row in rows)
        return found

    # -- images ------------------------------------------------------------------------------------------

    async def add_images(self, message_id: int, images: Sequence[ImagePart]) -> None:
        async with self._immediate("write to"):
            await self._db.executemany(
                "INSERT INTO images (message_id, position, name, media_type, width, height, bytes, data, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        message_id,
                        position,
                        image.name,
                        image.media_type,
                        image.width,
                        image.height,
                        len(image.data),
                        image.data,
                        time.time(),
                    )
                    for position, image in enumerate(images)
                ],
            )

    async def images(self, message_ids: Iterable[int]) -> dict[int, list[StoredImage]]:
        ids = list(message_ids)
        found: dict[int, list[StoredImage]] = {}
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            rows = await self._read(
                "SELECT id, message_id, name, media_type, width, height, data FROM images "
                f"WHERE message_id IN ({', '.join('?' * len(chunk))}) ORDER BY message_id, "
                "position",
                tuple(chunk),
            )
            for row in rows:
                found.setdefault(row[1], []).append(StoredImage(*row))
        return found

    async def prune_images(self, budget_bytes: int) -> int:
        async with self._immediate("write to"):
            async with self._db.execute("SELECT id, bytes FROM images WHERE data IS NOT NULL ORDER BY id DESC") as rows:
                kept, dropped = 0, []
                async for image_id, size in rows:
                    kept += size
                    if kept > budget_bytes:
                        dropped.append((image_id,))
            await self._db.executemany("UPDATE images SET data = NULL WHERE id = ?", dropped)
        return len(dropped)

    # -- session settings --------------------------------------------------------------------------------

    async def system_prompt(self, key: str) -> str | None:
        rows = await self._read("SELECT system_prompt FROM sessions WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_system_prompt(self, key: str, prompt: str | None) -> None:
        await self._ensure_session(key)
        await self._write(
            "UPDATE sessions SET system_prompt = ? WHERE key = ?", (None if prompt is None else storable(prompt), key)
        )

    async def model(self, key: str) -> str | None:
        rows = await self._read("SELECT model FROM sessions WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_model(self, key: str, name: str | None) -> None:
        await self._ensure_session(key)
        await self._write("UPDATE sessions SET model = ? WHERE key = ?", (name, key))

    async def sampling(self, key: str) -> dict[str, Any]:
        rows = await self._read("SELECT sampling FROM sessions WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else {}

    async def set_sampling(self, key: str, overrides: dict[str, Any]) -> None:
        await self._ensure_session(key)
        await self._write("UPDATE sessions SET sampling = ? WHERE key = ?", (json.dumps(overrides), key))

    async def session_keys(self, prefix: str) -> list[str]:
        rows = await self._read(
            "SELECT key FROM sessions WHERE substr(key, 1, ?) = ? ORDER BY created_at, rowid", (len(prefix), prefix)
        )
        return [row[0] for row in rows]

    async def session_summaries(self, prefix: str, limit: int) -> list[tuple[str, str, int]]:
        rows = await self._read(
            "SELECT s.key,"
            " COALESCE((SELECT substr(m.content, 1, 500) FROM messages m"
            "           WHERE m.session_key = s.key AND m.role = 'user' ORDER BY m.id LIMIT 1), ''),"
            " (SELECT COUNT(*) FROM messages m WHERE m.session_key = s.key)"
            " FROM sessions s WHERE substr(s.key, 1, ?) = ? ORDER BY s.created_at DESC, s.rowid DESC LIMIT ?",
            (len(prefix), prefix, limit),
        )
        return [(key, first, count) for key, first, count in rows]

    # -- turns -------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        """A lock in memory: one process per SQLite file (`_claim` warns when a second one opens it)."""
        lock, users = self._turns.get(key, (asyncio.Lock(), 0))
        self._turns[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._turns[key]
            if users == 1:  # nobody else holds or waits for it: forget it
                del self._turns[key]
            else:
                self._turns[key] = (lock, users - 1)

    # -- event dedupe ------------------------------------------------------------------------------------

    async def claim_event(self, event_id: str, ttl_seconds: float) -> bool:
        now = time.time()
        await self._write("DELETE FROM seen_events WHERE expires < ?", (now,))
        cursor = await self._write(
            "INSERT OR IGNORE INTO seen_events (event_id, expires) VALUES (?, ?)", (event_id, now + ttl_seconds)
        )
        return cursor.rowcount == 1

    # -- export and import -------------------------------------------------------------------------------

    async def dump(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        sessions = await self._read(f"SELECT {', '.join(SESSION_FIELDS)} FROM sessions ORDER BY created_at, rowid")
        for session in sessions:
            record = dict(zip(SESSION_FIELDS, session))
            record["sampling"] = json.loads(record["sampling"])
            yield "session", record
            rows = await self._read(
                f"SELECT {', '.join(MESSAGE_FIELDS)} FROM messages WHERE session_key = ? ORDER BY id", (record["key"],)
            )
            for row in rows:
                yield "message", dict(zip(MESSAGE_FIELDS, row))

    async def load(self, sessions: Iterable[dict[str, Any]], messages: Iterable[dict[str, Any]]) -> None:
        if (await self._read("SELECT COUNT(*) FROM sessions"))[0][0]:
            raise StoreError(f"the database {self.path} already holds conversations: import into a new one")
        async with self._immediate("import into"):
            await self._db.executemany(
                f"INSERT INTO sessions ({', '.join(SESSION_FIELDS)}) VALUES ({', '.join('?' * len(SESSION_FIELDS))})",
                (
                    (s["key"], s["system_prompt"], json.dumps(s["sampling"]), s["created_at"], s["model"])
                    for s in sessions
                ),
            )
            await self._db.executemany(
                f"INSERT INTO messages ({', '.join(MESSAGE_FIELDS)}) VALUES ({', '.join('?' * len(MESSAGE_FIELDS))})",
                (tuple(m[field] for field in MESSAGE_FIELDS) for m in messages),
            )


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _claim(path: Path) -> int | None:
    """Hold an exclusive lock on ``path``.lock for as long as the store is open; warn when another holds it.

    The descriptor (to close on `close`), or None when no lock file can be made (a read-only directory).
    """
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning(ONE_PROCESS_ONLY.format(path=path))
    return fd
