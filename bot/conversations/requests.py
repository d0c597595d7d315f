"""The request types: what a message asks for, where it is on its way to a reply, and how the reply ended."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bot.delivery import Delivery
from bot.engine.base import EngineStatus, Figures
from bot.types import Incoming, ReplyTarget, SessionKey
from bot.wording import conversation_place

__all__ = [
    "BEFORE_STORED",
    "ConversationStatus",
    "Exchange",
    "Locator",
    "NewMessage",
    "Redo",
    "ReplyResult",
    "Request",
    "State",
]

# Per platform: the target and handle that edit the message at an adapter's reference (`ReplyTarget.reference`).
Locator = Callable[[SessionKey, str], tuple[ReplyTarget, Any]]


class State(str, enum.Enum):
    """Where a message is on its way to a reply."""

    WAITING = "waiting"  # for the previous message of its conversation to be answered
    PROMPTING = "prompting"  # reading the history and building the prompt
    QUEUED = "queued"  # in the engine's queue
    GENERATING = "generating"
    DELIVERING = "delivering"  # the reply is stored; its last edits are going out
    DONE = "done"


BEFORE_STORED = (State.WAITING, State.PROMPTING, State.QUEUED, State.GENERATING)


@dataclass(frozen=True)
class NewMessage:
    """Answer a new message: it and its reply's row are stored on arrival, before the conversation's turn."""

    incoming: Incoming
    text: str  # cleaned, with its attachments
    author_name: str  # as the model reads it


@dataclass(frozen=True)
class Redo:
    """Answer the conversation's last message again (Regenerate), or go on with its reply (Continue)."""

    reply_id: int
    continuing: bool = False


@dataclass(frozen=True)
class ReplyResult:
    status: str  # a bot.store.Status value
    text: str  # what the model wrote
    notes: list[str] = field(default_factory=list)  # what the bot showed below it
    delivered: bool = True  # False when the platform would not show the reply
    reply_id: int | None = None  # the stored reply (what Regenerate and Continue act on)
    can_continue: bool = False
    stored: bool = False  # True only once the reply's final text is in the database
    tool_details: bool = False  # the reply called tools: their arguments and results can be expanded


@dataclass(frozen=True)
class Exchange:
    """The user message a request answers, and the reply row it fills."""

    user_id: int
    text: str
    author_name: str
    reply_id: int
    prefix: str = ""  # Continue: the reply so far, which the model goes on from


@dataclass(eq=False)
class Request:
    """One message being answered. Only the manager changes it; commands and shutdown read it."""

    key: str
    delivery: Delivery
    state: State = State.WAITING
    exchange: Exchange | None = None  # the message it answers and the row of its reply, once known
    generation: Figures | None = None  # either backend's request
    text: str = ""  # the model's reply so far
    reply_id: int | None = None  # its row in the store, once it has one
    skip: int = 0  # characters of the stored reply its messages do not show (a Continue's text so far)
    where: tuple[int, str] | None = None  # its message with the buttons: (index, the target's reference)
    where_saved: str = ""  # the reference last written to its row
    ended: str | None = None  # the note of /stop, /reset or shutdown once one has ended it early
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set when it is ended while waiting its turn
    author_id: str = ""  # who asked (a new message's author; "" for a Regenerate or Continue): tools' grants
    author_roles: frozenset[str] = frozenset()  # their roles in the place (Discord), for tools' grants
    tool_call: asyncio.Task[Any] | None = None  # the tool call running now, cancelled by `end`
    model: str | None = None  # the name of the model answering it, once chosen (stored with the reply)

    def end(self, note: str) -> None:
        """End this request as soon as it can be: at once while it waits, within a decode step while it runs."""
        if self.ended is not None or self.state in (State.DELIVERING, State.DONE):
            return
        self.ended = note
        self.wake.set()
        if self.generation is not None:
            self.generation.cancel()
        if self.tool_call is not None:
            self.tool_call.cancel()


@dataclass(frozen=True)
class ConversationStatus:
    """The engine's figures, plus where one conversation's oldest unanswered message is."""

    engine: EngineStatus
    state: State | None = None
    waiting: int = 0  # messages behind it in the same conversation
    model: str | None = None  # the Model line when the conversation's model is not the default

    @property
    def position(self) -> int | None:
        """0 while generating, n while n-th in the engine's queue, None otherwise."""
        return self.engine.position

    def lines(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a /status answer; each platform adds its own bold."""
        lines = [(label, value) for label, value in self.engine.lines() if label != "This conversation"]
        if self.model is not None:
            lines = [(label, self.model if label == "Model" else value) for label, value in lines]
        place = conversation_place(self.state.value if self.state else None, self.position, self.waiting)
        lines.insert(2, ("This conversation", place))
        return lines
