"""ConversationManager: the one owner of every message, from arrival to its stored, delivered reply.

Each message is a `Request` with an explicit `State` that /stop, /reset, /status and shutdown all see.
Messages of one conversation are answered in arrival order; the reply text is the model's, whole, and is
what is stored and fed back; notes (stopped, errors) travel beside it; `bot.delivery` shows it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bot.config import SamplingSettings, Settings
from bot.delivery import Delivery, Pacers
from bot.engine import Engine, EngineStatus, FinishReason, Generation, QueuePosition
from bot.errors import LlamarelayError
from bot.prompt import strip_markers
from bot.store import Status, Store, StoredMessage
from bot.types import Incoming, ReplyTarget, SessionKey

__all__ = ["ConversationManager", "ConversationStatus", "ReplyResult", "State", "clean_text", "parse_status_line",
           "queued_line", "storable"]

log = logging.getLogger(__name__)

THINKING = "💭 Thinking…"
WAITING_FOR_PREVIOUS = "⏳ Waiting for the previous reply in this conversation…"
EMPTY_MESSAGE = "⚠️ Your message is empty. Write something and I'll answer."
SHUTTING_DOWN_REASON = "The bot is shutting down; please send your message again in a moment."
SHUTTING_DOWN = f"⚠️ {SHUTTING_DOWN_REASON}"
STOPPED_NOTE = "⏹️ Stopped."
RESET_NOTE = "🧹 The conversation was reset before this message was answered."
TRUNCATED_MARK = "\n[… the rest of this message was cut to fit the context window]"
CHECKPOINT_SECONDS = 3.0  # a streaming reply's text is saved this often, so a crash keeps what was shown
HISTORY_PAGE = 64  # messages read per step when looking back for the history that fits
# Zero-width and bidi-control characters are invisible and only confuse the tokenizer.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


_QUEUED_LINE = re.compile(r"⏳ Queued: #(\d+) in line…")


def queued_line(position: int) -> str:
    return f"⏳ Queued: #{position} in line…"


def parse_status_line(text: str) -> tuple[str, int | None] | None:
    """(kind, queue position) if ``text`` is one of the status lines shown before a reply's text, else None.

    For targets that show status apart from reply text (the web page): kind is thinking, waiting or queued.
    """
    if text == THINKING:
        return "thinking", None
    if text == WAITING_FOR_PREVIOUS:
        return "waiting", None
    if match := _QUEUED_LINE.fullmatch(text):
        return "queued", int(match.group(1))
    return None


def storable(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON and Python, never in UTF-8) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def clean_text(text: str) -> str:
    """Normalize a user message: storable, no control or zero-width characters, Unix newlines, trimmed."""
    text = storable(text)
    text = strip_markers(_INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    return text.strip()


def too_many_waiting(limit: int) -> str:
    return (f"⚠️ {limit} messages are already waiting in this conversation; please wait for their answers "
            "before sending more.")


class State(str, enum.Enum):
    """Where a message is on its way to a reply."""

    WAITING = "waiting"  # for the previous message of its conversation to be answered
    PROMPTING = "prompting"  # reading the history and building the prompt
    QUEUED = "queued"  # in the engine's queue
    GENERATING = "generating"
    DELIVERING = "delivering"  # the reply is stored; its last edits are going out
    DONE = "done"


@dataclass(frozen=True)
class ReplyResult:
    status: str  # a bot.store.Status value
    text: str  # what the model wrote
    notes: list[str] = field(default_factory=list)  # what the bot showed below it
    delivered: bool = True  # False when the platform would not show the reply


@dataclass(eq=False)
class Request:
    """One message being answered. Only the manager changes it; commands and shutdown read it."""

    key: str
    delivery: Delivery
    state: State = State.WAITING
    generation: Generation | None = None
    text: str = ""  # the model's reply so far
    ended: str | None = None  # the note of /stop, /reset or shutdown once one has ended it early
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set when it is ended while waiting its turn

    def end(self, note: str) -> None:
        """End this request as soon as it can be: at once while it waits, within a decode step while it runs."""
        if self.ended is not None or self.state in (State.DELIVERING, State.DONE):
            return
        self.ended = note
        self.wake.set()
        if self.generation is not None:
            self.generation.cancel()


@dataclass(frozen=True)
class ConversationStatus:
    """The engine's figures, plus where one conversation's oldest unanswered message is."""

    engine: EngineStatus
    state: State | None = None
    waiting: int = 0  # messages behind it in the same conversation

    @property
    def position(self) -> int | None:
        """0 while generating, n while n-th in the engine's queue, None otherwise."""
        return self.engine.position

    def lines(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a /status answer; each platform adds its own bold."""
        lines = [(label, value) for label, value in self.engine.lines() if label != "This conversation"]
        if self.state in (State.QUEUED, State.GENERATING) and self.position is not None:
            place = "generating now" if self.position == 0 else f"#{self.position} in the queue"
        elif self.state is State.WAITING:
            place = "waiting for the previous reply"
        elif self.state is State.PROMPTING:
            place = "reading the conversation"
        elif self.state is State.DELIVERING:
            place = "sending the last of a reply"
        else:
            place = "nothing queued"
        if self.waiting:
            place += f", {self.waiting} more message{'s' if self.waiting > 1 else ''} waiting"
        lines.insert(2, ("This conversation", place))
        return lines


class ConversationManager:
    """Shared by every adapter: stores messages, builds prompts within the context window, runs the engine."""

    def __init__(self, engine: Engine, store: Store, settings: Settings, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self._clock, self._sleep = clock, sleep
        self._pacers = Pacers(clock=clock, sleep=sleep)
        self._lines: dict[str, list[Request]] = {}  # per conversation, its unfinished requests in arrival order
        self._turns: dict[str, asyncio.Lock] = {}  # per conversation: whose turn it is to generate
        self._background: set[asyncio.Task[ReplyResult]] = set()  # replies no caller awaits (`respond_soon`)
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True

    # -- answering -------------------------------------------------------------------------------------

    async def respond(self, incoming: Incoming, target: ReplyTarget) -> ReplyResult:
        """Answer ``incoming`` on ``target``: store it, stream the model's reply, store the reply.

        Never raises for a failure of the model, the database or the platform: each ends the reply with a
        clear line (and a stored status). Only cancellation of the caller propagates.
        """
        delivery = Delivery(target, self._pacers.for_target(target), clock=self._clock, sleep=self._sleep)
        text = clean_text(incoming.text)
        key = str(incoming.key)
        line = self._lines.get(key, [])
        refusal = (EMPTY_MESSAGE if not text else SHUTTING_DOWN if not self._accepting
                   else too_many_waiting(len(line) - 1) if len(line) > self.settings.conversation.max_waiting
                   else None)
        if refusal is not None:
            delivered = await delivery.finish(refusal)
            return ReplyResult(Status.FAILED, "", [refusal], delivered)
        request = Request(key, delivery)
        self._lines.setdefault(key, []).append(request)
        self._idle.clear()
        try:
            result = await self._run(request, incoming, text)
            request.state = State.DELIVERING
            delivered = await delivery.finish("\n".join(result.notes))
            return dataclasses.replace(result, delivered=delivered)
        finally:
            delivery.cancel()
            request.state = State.DONE
            self._lines[key].remove(request)
            if not self._lines[key]:
                del self._lines[key]
                self._turns.pop(key, None)
            if not self._lines:
                self._idle.set()

    def respond_soon(self, incoming: Incoming, target: ReplyTarget) -> asyncio.Task[ReplyResult]:
        """`respond` in a task of its own, held here until it ends: for adapters whose request ends before the
        reply does (a browser tab may close mid-stream, the reply still goes on and is stored)."""
        task = asyncio.create_task(self.respond(incoming, target), name=f"reply in {incoming.key.platform}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _run(self, request: Request, incoming: Incoming, text: str) -> ReplyResult:
        """Store the message, wait for the conversation's turn, generate, and store the reply."""
        key, delivery = request.key, request.delivery
        ahead = len(self._lines[key]) > 1
        delivery.status(WAITING_FOR_PREVIOUS if ahead else THINKING)
        delivery.start()
        try:
            # Both rows are written before anything is shown, so neither the message nor its reply's place is lost.
            user_id, reply_id = await self.store.add_exchange(key, text, author_id=incoming.author_id,
                                                              author_name=storable(incoming.author_name))
        except LlamarelayError as exc:
            log.error("could not store a message in %s: %s", key, exc)
            note = "⚠️ I could not save your message (database problem), so I can't answer it; please try again."
            return ReplyResult(Status.FAILED, "", [note])
        turn = self._turns.setdefault(key, asyncio.Lock())
        try:
            if not await self._take_turn(request, turn):
                assert request.ended is not None
                return await self._store_reply(reply_id, "", Status.STOPPED, [request.ended])
            try:
                status, notes = await self._generate(request, text, user_id, reply_id)
            except LlamarelayError as exc:  # the model, the template or the database: the user sees why
                status, notes = Status.FAILED, [f"⚠️ {exc}"]
            except Exception as exc:
                log.exception("answering a message in %s failed", key)
                status, notes = Status.FAILED, [f"⚠️ Something went wrong on my side ({type(exc).__name__}); "
                                                "your message is saved, please try again."]
            finally:
                turn.release()
            return await self._store_reply(reply_id, request.text, status, notes)
        except BaseException:  # cancelled: free the engine, keep what was written
            if request.generation is not None:
                request.generation.cancel()
            await asyncio.shield(self._store_reply(reply_id, request.text, Status.INTERRUPTED, []))
            raise

    async def _take_turn(self, request: Request, turn: asyncio.Lock) -> bool:
        """Wait until earlier messages of the conversation are answered; False if this one was ended first."""
        acquire = asyncio.ensure_future(turn.acquire())
        wake = asyncio.ensure_future(request.wake.wait())
        try:
            await asyncio.wait({acquire, wake}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                turn.release()
            raise
        finally:
            wake.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            if request.ended is None:
                return True
            turn.release()
        return False

    async def _generate(self, request: Request, text: str, user_id: int, reply_id: int) -> tuple[str, list[str]]:
        """Build the prompt and stream the model's reply into ``request.text``: (status, notes)."""
        key, delivery = request.key, request.delivery
        request.state = State.PROMPTING
        sampling = await self.sampling(key)
        system = await self.system_prompt(key)
        history = await self._history_that_fits(key, user_id, self.engine.n_ctx - sampling.max_tokens)
        prompt, notes = await asyncio.to_thread(self.build_prompt, system, history, text, sampling.max_tokens)
        if request.ended is not None:
            return Status.STOPPED, [request.ended]
        generation = request.generation = self.engine.submit(prompt, sampling, session=key)
        request.state = State.QUEUED
        saved_at = self._clock()
        async for event in generation:
            if delivery.failed:  # nobody can see this reply: free the engine for others
                generation.cancel()
            if isinstance(event, QueuePosition):
                request.state = State.QUEUED if event.position else State.GENERATING
                delivery.status(queued_line(event.position) if event.position else THINKING)
                continue
            request.text += event
            delivery.update(request.text)
            if self._clock() - saved_at >= CHECKPOINT_SECONDS:
                saved_at = self._clock()
                try:
                    await self.store.checkpoint(reply_id, request.text)
                except LlamarelayError as exc:  # the final write will try again
                    log.warning("could not checkpoint a reply in %s: %s", key, exc)
        status, footer = self._outcome(request, generation, request.text)
        return status, notes + footer

    def _outcome(self, request: Request, generation: Generation, text: str) -> tuple[str, list[str]]:
        if request.delivery.failed:
            return Status.INTERRUPTED, ["⚠️ The platform would not take this reply."]
        if generation.finish_reason is FinishReason.CANCELLED:
            return Status.STOPPED, [request.ended or STOPPED_NOTE]
        if not text.strip():
            return Status.FAILED, ["⚠️ The model gave an empty reply; try rephrasing."]
        if generation.finish_reason is FinishReason.LENGTH:
            return Status.COMPLETE, ["✂️ (reached the reply length limit)"]
        return Status.COMPLETE, []

    async def _store_reply(self, reply_id: int, text: str, status: str, notes: list[str]) -> ReplyResult:
        try:
            await self.store.finish_message(reply_id, text, status, "\n".join(notes))
        except LlamarelayError as exc:
            log.error("could not store a reply: %s", exc)
            notes = [*notes, "⚠️ This reply could not be saved (database problem), so I won't remember it."]
        return ReplyResult(status, text, notes)

    async def _history_that_fits(self, key: str, before_id: int, budget: int) -> list[StoredMessage]:
        """The newest messages before ``before_id`` whose text could fit ``budget`` tokens; older ones are not read."""
        history: list[StoredMessage] = []
        tokens = 0
        while tokens < budget:
            page = await self.store.messages(key, before_id=history[0].id if history else before_id,
                                             limit=HISTORY_PAGE)
            if not page:
                break
            history[:0] = page
            tokens += await asyncio.to_thread(lambda: sum(len(self.engine.tokenize(m.content)) for m in page))
        return history

    def build_prompt(self, system: str, history: list[StoredMessage], text: str,
                     max_tokens: int) -> tuple[list[int], list[str]]:
        """Prompt tokens that fit ``n_ctx - max_tokens``: system prompt always, then the newest turns that fit.

        Every turn is the stored text as it was written: a reply cut short is fed back as far as it got.
        """
        engine, budget = self.engine, self.engine.n_ctx - max_tokens
        turns = [{"role": m.role, "content": m.content} for m in history]  # the template keeps roles alternating

        def render(kept: list[dict[str, str]], user_text: str) -> list[int]:
            return engine.chat_tokens([{"role": "system", "content": system}, *kept,
                                       {"role": "user", "content": user_text}])

        original_length = len(text)
        text = text[:self.settings.conversation.max_message_chars]
        if len(render([], text)) > budget:  # the message alone overflows the window: keep its head
            overhead = len(render([], "")) + len(engine.tokenize(TRUNCATED_MARK))
            if overhead >= budget:
                raise LlamarelayError("The system prompt is too long for the model's context window; "
                                      "shorten it or raise [engine] n_ctx.")
            content, keep = engine.tokenize(text), budget - overhead
            while keep > 0:  # token counts shift a little where the pieces meet
                text = engine.detokenize(content[:keep])
                if len(render([], text + TRUNCATED_MARK)) <= budget:
                    break
                keep -= 8
        notes = []
        if len(text) < original_length:
            notes.append(f"⚠️ Your message was too long, so only its first {len(text):,} of {original_length:,} "
                         "characters were read.")
            text += TRUNCATED_MARK
        # Drop the oldest turns until the prompt fits (binary search: render is monotone in what is kept).
        low, high = 0, len(turns)
        while low < high:
            middle = (low + high) // 2
            if len(render(turns[middle:], text)) <= budget:
                high = middle
            else:
                low = middle + 1
        return render(turns[low:], text), notes

    # -- session commands ------------------------------------------------------------------------------

    def stop(self, key: SessionKey | str, note: str = STOPPED_NOTE) -> int:
        """End the conversation's running reply and the messages waiting behind it; how many were ended."""
        ended = 0
        for request in list(self._lines.get(str(key), [])):
            if request.ended is None and request.state not in (State.DELIVERING, State.DONE):
                request.end(note)
                ended += 1
        return ended

    async def reset(self, key: SessionKey) -> None:
        """Forget the session's history (its system prompt and sampling stay); messages still waiting are
        cancelled, not answered into a history that no longer exists."""
        pending = [request for request in self._lines.get(str(key), []) if request.state is not State.DONE]
        for request in pending:
            request.end(RESET_NOTE if request.state in (State.WAITING, State.PROMPTING) else STOPPED_NOTE)
        async with asyncio.timeout(10):  # their last rows are written within a decode step
            while any(request.state in (State.WAITING, State.PROMPTING, State.QUEUED, State.GENERATING)
                      for request in pending):
                await asyncio.sleep(0.01)
        await self.store.clear_messages(str(key))

    async def system_prompt(self, key: SessionKey | str) -> str:
        prompt = await self.store.system_prompt(str(key))
        return self.settings.conversation.system_prompt if prompt is None else prompt

    async def set_system_prompt(self, key: SessionKey, prompt: str | None) -> None:
        """Set this session's system prompt; None restores the configured default."""
        await self.store.set_system_prompt(str(key), None if prompt is None else clean_text(prompt))

    async def sampling(self, key: SessionKey | str) -> SamplingSettings:
        overrides = await self.store.sampling(str(key))
        base = self.settings.sampling
        return SamplingSettings.model_validate({**base.model_dump(), **overrides}) if overrides else base

    async def set_sampling(self, key: SessionKey, **overrides: Any) -> None:
        """Override sampling settings for one session (validated like config.toml's [sampling])."""
        current = await self.store.sampling(str(key))
        merged = {**current, **overrides}
        sampling = SamplingSettings.model_validate({**self.settings.sampling.model_dump(), **merged})
        if sampling.max_tokens >= self.engine.n_ctx:
            raise ValueError(f"max_tokens must be below the {self.engine.n_ctx}-token context window")
        await self.store.set_sampling(str(key), merged)

    async def history(self, key: SessionKey) -> list[StoredMessage]:
        return await self.store.messages(str(key))

    async def claim_event(self, event_id: str, ttl_seconds: float = 900.0) -> bool:
        """True the first time a platform event id is seen; False for a redelivery within the TTL."""
        return await self.store.claim_event(event_id, ttl_seconds)

    def status(self, key: SessionKey | str | None = None) -> ConversationStatus:
        """The engine's figures and, for ``key``, where that conversation's oldest unanswered message is."""
        line = [r for r in self._lines.get(str(key), []) if r.state is not State.DONE] if key else []
        first = line[0] if line else None
        engine = self.engine.status(first.generation if first is not None else None)
        return ConversationStatus(engine, first.state if first else None, max(0, len(line) - 1))

    # -- shutdown --------------------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 8.0) -> None:
        """Refuse new messages, end every request whatever its state, and wait (at most ``timeout`` s) until
        each reply is stored and shown; after that, deliveries still going are cancelled."""
        self._accepting = False
        for key in list(self._lines):
            self.stop(key, SHUTTING_DOWN)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d replies were still being delivered at shutdown", sum(map(len, self._lines.values())))
            for line in self._lines.values():
                for request in line:
                    request.delivery.cancel()

    async def wait_idle(self) -> None:
        """Wait until no message is being answered."""
        await self._idle.wait()
