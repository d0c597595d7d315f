"""What every engine shares, embedded or remote: finish reasons, queue and retry events, status, figures, the
`InferenceEngine` protocol the core speaks to, and the one capability that tells the backends apart.

Nothing here loads llama.cpp: the remote backend imports this module alone.
"""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard

from bot.config import EngineSettings, SamplingSettings
from bot.errors import EngineError

if TYPE_CHECKING:
    from bot.engine.devices import Placement
    from bot.engine.embedded import Engine
    from bot.prompt import Prompt

__all__ = [
    "EngineStatus",
    "Figures",
    "FinishReason",
    "InferenceEngine",
    "PromptTooLong",
    "QueuePosition",
    "Retrying",
    "renders_template",
]


class FinishReason(str, enum.Enum):
    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # max_tokens or the context window was reached
    CANCELLED = "cancelled"  # cancel() was called
    ERROR = "error"  # llama.cpp failed


@dataclass(frozen=True)
class QueuePosition:
    """Event: the request now waits at this 1-based place in the queue; 0 means it has started."""

    position: int


@dataclass(frozen=True)
class Retrying:
    """Event: the model server could not be reached (or failed); the request tries again in ``delay`` seconds."""

    reason: str
    delay: float


class PromptTooLong(EngineError):
    """The model server says the prompt does not fit its context window (``n_ctx`` when it said how large)."""

    def __init__(self, message: str, n_ctx: int | None = None) -> None:
        super().__init__(message)
        self.n_ctx = n_ctx


@dataclass(frozen=True)
class EngineStatus:
    model_name: str
    queue_length: int  # requests waiting for a slot
    running: int  # requests being generated now
    position: int | None  # the asked-about request: None if none, 0 if generating, n if n-th in queue
    tokens_per_second: float | None  # generation speed of the last finished reply
    kv_cells: int | None = None  # KV cells the engine's pool holds now (running and idle); None on a model server
    device: Placement | None = None  # where the embedded model runs (CPU, or how much on which GPU); None on a server

    def lines(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a /status answer; each platform adds its own bold."""
        if self.position is None:
            place = "nothing queued"
        elif self.position == 0:
            place = "generating now"
        else:
            place = f"#{self.position} in the queue"
        speed = f"{self.tokens_per_second:.1f} tokens/s" if self.tokens_per_second else "not measured yet"
        lines = [
            ("Model", self.model_name),
            ("Queue", f"{self.queue_length} waiting, {self.running} generating"),
            ("This conversation", place),
            ("Speed", f"{speed} (last reply)"),
        ]
        return lines + [("Device", str(self.device))] if self.device is not None else lines


END = object()  # the event that ends a request's iteration


class Figures(ABC):
    """What a request reports however it runs, in this process or on a model server, and the stream of its
    events: ``async for event in request`` yields them until `END`, and raises an exception put in the stream."""

    def __init__(self, prompt: list[int], sampling: SamplingSettings) -> None:
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.prompt = prompt
        self.sampling = sampling
        self.finish_reason: FinishReason | None = None
        self.n_generated = 0
        self.n_prompt_reused = 0  # prompt tokens whose KV cache was already there
        self.t_first_token: float | None = None
        self.t_finished: float | None = None
        self._position: int | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            event = await self._events.get()
            if event is END:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    @abstractmethod
    def cancel(self) -> None:
        """Stop this request now (call from the event loop); each backend frees its place its own way."""

    @property
    def position(self) -> int | None:
        """0 while generating, n while n-th in the queue, None once finished."""
        return self._position

    @property
    def tokens_per_second(self) -> float | None:
        if self.t_first_token is None or self.t_finished is None or self.n_generated < 2:
            return None
        elapsed = self.t_finished - self.t_first_token
        return (self.n_generated - 1) / elapsed if elapsed > 0 else None


class InferenceEngine(Protocol):
    """What the core asks of an engine, the embedded `Engine` and the `RemoteEngine` alike."""

    settings: EngineSettings
    n_ctx: int  # context window of one session, in tokens
    model_name: str
    # True: this process renders the model's chat template into tokens (the embedded engine), so the core may
    # read the template (reasoning openers, tool syntax) and submit token prompts. False: the model server
    # applies its own template to chat messages (the remote engine).
    renders_template: bool

    def tokenize(self, text: str, *, special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def submit(self, prompt: Prompt, sampling: SamplingSettings, *, session: str = "") -> Figures: ...

    def status(self, generation: Any = None) -> EngineStatus: ...

    def check_sampling(self, sampling: SamplingSettings) -> None: ...

    async def readiness(self) -> str: ...

    async def aclose(self) -> None: ...


def renders_template(engine: InferenceEngine) -> TypeGuard[Engine]:
    """True for an engine that renders its chat template here (the embedded `Engine`, with its `chat_template`
    and token prompts), asked of its capability: nothing is imported, so llama.cpp stays unloaded."""
    return engine.renders_template
