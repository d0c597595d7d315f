"""Persistence: one `Store` interface, backed by SQLite (`sqlite.py`) or PostgreSQL (`postgres.py`).

Only this package speaks SQL. `open_store(target)` picks the backend: a ``postgresql://`` URL selects
PostgreSQL, anything else is the path of an SQLite file. Both keep their schema versioned and upgrade an older
database when it is opened.
"""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeGuard

from bot.types import ImagePart

__all__ = [
    "ADDED_FIELDS",
    "Store",
    "StoredImage",
    "StoredMessage",
    "StoredToolCall",
    "LapsedReply",
    "Status",
    "open_store",
    "is_database_url",
    "redact_url",
]


class Status:
    """What became of a stored message. Only COMPLETE replies are fed back to the model as they are."""

    COMPLETE = "complete"
    GENERATING = "generating"  # still being written; left by a dead process (its lease lapsed), INTERRUPTED
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
    model: str = ""  # a reply: the name of the model that wrote it ("" before schema 7, or not yet known)


@dataclass(frozen=True)
class StoredToolCall:
    """A tool message of a reply: one call the model made (its round, tool, arguments as JSON) and the result it
    read back (plain text, untrusted)."""

    reply_id: int
    round: int
    tool: str
    arguments: str
    result: str
    is_error: bool


@dataclass(frozen=True)
class StoredImage:
    """An image of a user message; ``data`` is None once it was pruned to keep images within their budget."""

    id: int
    message_id: int
    name: str
    media_type: str
    width: int
    height: int
    data: bytes | None


@dataclass(frozen=True)
class LapsedReply:
    """A reply whose process stopped renewing its lease, as `Store.expire_leases` took it over."""

    id: int
    session_key: str
    content: str  # its last checkpointed text
    message_ref: str  # where its platform message is (see `Store.set_message_ref`), "" when unknown


# Every column of a session and of a message, as `dump` yields them and `load` takes them back; a reply's
# lease and message reference are the running processes' business, never exported.
SESSION_FIELDS = ("key", "system_prompt", "sampling", "created_at", "model")
MESSAGE_FIELDS = (
    "id",
    "session_key",
    "role",
    "content",
    "status",
    "author_id",
    "author_name",
    "created_at",
    "notes",
    "feedback",
    "model",
)
# Fields an export written before schema 7 lacks, and what `load` reads in their place.
ADDED_FIELDS: dict[str, dict[str, Any]] = {"session": {"model": None}, "message": {"model": ""}}


# The row `probe` writes: a seen event that has already expired, so the next `claim_event` sweeps it away.
PROBE_EVENT = "llamarelay/probe"


def storable(text: str) -> str:
    """``text`` without NUL characters, which PostgreSQL's text type refuses (both backends store the same)."""
    return text.replace("\x00", "\ufffd")


class Store(abc.ABC):
    """Sessions, their messages and settings, and seen event ids. Open with `await Store.open(path_or_url)`."""

    # Numbered schema steps: MIGRATIONS[n - 1] takes a database from version n - 1 to n.
    MIGRATIONS: ClassVar[tuple[tuple[str, ...], ...]]

    @classmethod
    async def open(cls, target: Path | str, *, migrate: bool = True) -> Store:
        """Open the database at ``target`` (SQLite path or PostgreSQL URL); see `open_store`."""
        return await open_store(target, migrate=migrate)

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def probe(self) -> None:
        """Write one row and commit it: raises StoreError unless the database can take a message now.

        Readiness asks this, not a read: a database that answers reads but refuses writes loses every message.
        """

    @property
    def latest_version(self) -> int:
        """The schema version this llamarelay writes."""
        return len(self.MIGRATIONS)

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version of the open database (0: empty)."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations in order, each in its own transaction; the versions applied."""

    # -- messages ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_message(
        self, key: str, role: str, content: str, status: str, *, author_id: str = "", author_name: str = ""
    ) -> int: ...

    @abc.abstractmethod
    async def add_exchange(
        self, key: str, text: str, *, author_id: str, author_name: str, lease_seconds: float | None = None
    ) -> tuple[int, int]:
        """Store a user message and reserve its reply's row right after it: (message id, reply id).

        Another message of the session can never land between the two rows. With ``lease_seconds`` the reply
        is leased (see `renew_leases`) from the start.
        """

    @abc.abstractmethod
    async def message(self, message_id: int) -> StoredMessage | None: ...

    @abc.abstractmethod
    async def reopen_reply(self, message_id: int, content: str, *, lease_seconds: float | None = None) -> None:
        """Make a stored reply "generating" again, holding ``content`` (Regenerate: empty; Continue: the text),
        leased for ``lease_seconds`` when given. A rating and a message reference of the old answer do not
        carry over to the new one."""

    @abc.abstractmethod
    async def renew_leases(self, message_ids: Iterable[int], seconds: float) -> None:
        """Extend the lease of those replies still generating to ``seconds`` from now (the database's clock):
        the process writing them is alive. A reply whose lease runs out is taken over by `expire_leases`."""

    @abc.abstractmethod
    async def expire_leases(self, note: str) -> list[LapsedReply]:
        """Mark every generating reply whose lease has run out interrupted, keeping its text, with ``note``;
        the replies marked. Each is returned to one caller only, whichever process asks first."""

    @abc.abstractmethod
    async def set_message_ref(self, message_id: int, ref: str) -> None:
        """Record where a reply's platform message is (opaque to the store), so another process can rewrite
        it if this one dies."""

    @abc.abstractmethod
    async def checkpoint(self, message_id: int, content: str) -> None:
        """Save a reply's text so far while it is still generating: a crash keeps what users have seen."""

    @abc.abstractmethod
    async def finish_message(
        self, message_id: int, content: str, status: str, notes: str = "", *, model: str | None = None
    ) -> None:
        """Store a reply's final text, status and notes; ``model``: the name of the model that wrote it (None
        leaves what is stored)."""

    @abc.abstractmethod
    async def set_feedback(self, key: str, message_id: int, feedback: str) -> bool:
        """Keep a user's rating of reply ``message_id`` of session ``key``; False when there is no such reply."""

    @abc.abstractmethod
    async def messages(
        self, key: str, *, before_id: int | None = None, limit: int | None = None
    ) -> list[StoredMessage]:
        """The session's messages, oldest first; with ``before_id`` / ``limit``, only the newest ones before it."""

    @abc.abstractmethod
    async def clear_messages(self, key: str, through_id: int) -> None:
        """Delete the session's messages up to and including ``through_id`` (those arriving later stay)."""

    # -- images ------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_images(self, message_id: int, images: Sequence[ImagePart]) -> None:
        """Keep the images of user message ``message_id``, in order (deleted with the message)."""

    @abc.abstractmethod
    async def images(self, message_ids: Iterable[int]) -> dict[int, list[StoredImage]]:
        """The images of those messages, in order, by message id (messages without any are left out)."""

    @abc.abstractmethod
    async def prune_images(self, budget_bytes: int) -> int:
        """Drop the data of the oldest images until the rest fit ``budget_bytes``; how many were dropped.
        Their rows stay (name and size), so a conversation can say an image was there."""

    # -- tool messages -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_tool_call(self, call: StoredToolCall) -> None:
        """Keep one tool call of a reply and its result (deleted with the reply)."""

    @abc.abstractmethod
    async def tool_calls(self, reply_id: int, *, key: str | None = None) -> list[StoredToolCall]:
        """The tool calls of reply ``reply_id``, in the order they were made; with ``key``, only if the reply is
        in that conversation (a pressed button names a reply: it must not show another conversation's)."""

    @abc.abstractmethod
    async def with_tool_calls(self, reply_ids: Iterable[int]) -> set[int]:
        """Those of ``reply_ids`` that called tools (one query, for a history's expandable replies)."""

    # -- session settings --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def system_prompt(self, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_system_prompt(self, key: str, prompt: str | None) -> None: ...

    @abc.abstractmethod
    async def model(self, key: str) -> str | None:
        """The name of the model session ``key`` chose itself (/model), None when it chose none."""

    @abc.abstractmethod
    async def set_model(self, key: str, name: str | None) -> None: ...

    @abc.abstractmethod
    async def sampling(self, key: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def set_sampling(self, key: str, overrides: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def session_keys(self, prefix: str) -> list[str]:
        """Keys of every stored session whose key starts with ``prefix``, oldest first."""

    @abc.abstractmethod
    async def session_summaries(self, prefix: str, limit: int) -> list[tuple[str, str, int]]:
        """(key, first user message, message count) of the newest ``limit`` sessions under ``prefix``, newest first.

        One query, without reading whole conversations: the first message is cut to 500 characters.
        """

    # -- turns -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def turn(self, key: str) -> AbstractAsyncContextManager[None]:
        """Hold session ``key``'s turn while the context lasts: one reply at a time per conversation.

        PostgreSQL's spans every process on the database; SQLite's, which serves one process, spans this one.
        """

    # -- event dedupe ------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_event(self, event_id: str, ttl_seconds: float) -> bool:
        """True the first time ``event_id`` is seen within ``ttl_seconds``; False for a repeat."""

    # -- export and import -------------------------------------------------------------------------------

    @abc.abstractmethod
    def dump(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Every session then its messages, in order: ("session", {SESSION_FIELDS}) and ("message", {...})."""

    @abc.abstractmethod
    async def load(self, sessions: Iterable[dict[str, Any]], messages: Iterable[dict[str, Any]]) -> None:
        """Insert dumped sessions and messages, keeping their ids, in one transaction.

        Raises StoreError when the database already holds a conversation: an import never merges.
        """


def is_database_url(target: Path | str) -> TypeGuard[str]:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """``url`` with its password replaced, fit for logs and error messages."""
    return re.sub(r"^([a-z]+://[^:/@]*):[^@]*@", r"\1:***@", url)


async def open_store(target: Path | str, *, migrate: bool = True) -> Store:
    """Open the store at ``target``: a ``postgresql://`` URL or an SQLite file path.

    With ``migrate`` (the default) an older schema is upgraded first; `llamarelay migrate` opens without it
    to show the versions before applying them.
    """
    if is_database_url(target):
        from bot.store.postgres import PostgresStore

        return await PostgresStore.open(str(target), migrate=migrate)
    from bot.store.sqlite import SQLiteStore

    return await SQLiteStore.open(Path(target), migrate=migrate)
