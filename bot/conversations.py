"""ConversationManager: the one owner of every message, from arrival to its stored, delivered reply.

Each message is a `Request` with an explicit `State` that /stop, /reset, /status and shutdown all see.
Messages of one conversation are answered in arrival order; the reply text is the model's, whole, and is
what is stored and fed back; notes (stopped, errors) travel beside it; `bot.delivery` shows it.

Over 500 lines, knowingly for now: wording, text cleaning, request types, window fitting, streaming, settings
inheritance and reply leases all live here; issue 21 splits them into a `bot/conversations/` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from bot.config import ConversationSettings, SamplingSettings, Settings
from bot.delivery import Delivery, Pacers, display_text
from bot.engine import EngineStatus, FinishReason, Generation, QueuePosition
from bot.errors import LlamarelayError
from bot.files import with_attachments
from bot.metrics import Metrics, Platforms
from bot.prompt import Prompt, strip_markers
from bot.reasoning import OPEN as REASONING_OPEN
from bot.reasoning import ReasoningSplitter
from bot.engine.remote import PromptTooLong, RemoteEngine, RemoteGeneration, Retrying
from bot.replies import split_reply
from bot.store import LapsedReply, Status, Store, StoredMessage
from bot.types import Controls, Incoming, ReplyTarget, SessionKey, log_name

if TYPE_CHECKING:
    from bot.engine.embedded import Engine

__all__ = ["ConversationManager", "ConversationStatus", "Exchange", "Locator", "ReplyResult", "State",
           "can_continue", "clean_text", "parse_status_line", "queued_line", "speaker_name", "storable"]

log = logging.getLogger(__name__)

THINKING = "💭 Thinking…"
REASONING = "🤔 Thinking it through…"
WAITING_FOR_PREVIOUS = "⏳ Waiting for the previous reply in this conversation…"
EMPTY_MESSAGE = "⚠️ Your message is empty. Write something and I'll answer."
SHUTTING_DOWN_REASON = "The bot is shutting down; please send your message again in a moment."
SHUTTING_DOWN = f"⚠️ {SHUTTING_DOWN_REASON}"
STOPPED_NOTE = "⏹️ Stopped."
LENGTH_NOTE = "✂️ (reached the reply length limit)"
STALE_REPLY = "That is no longer the latest answer in this conversation."
NOTHING_TO_CONTINUE = "That answer was not cut short, so there is nothing to continue."
NOT_SAVED = "⚠️ I could not save your message (database problem), so I can't answer it; please try again."
NOT_STORED = "⚠️ This reply could not be saved (database problem), so I won't remember it."
RESET_NOTE = "🧹 The conversation was reset before this message was answered."
TAKEN_OVER_NOTE = "⚠️ The bot process writing this reply stopped; this is as far as it got."
TRUNCATED_MARK = "\n[… the rest of this message was cut to fit the context window]"
RESET_WAIT_SECONDS = 10.0  # /reset waits this long for the replies it ended to be stored
CHECKPOINT_SECONDS = 3.0  # a streaming reply's text is saved this often, so a crash keeps what was shown
SERVER_RETRYING = "⚠️ The model server is unreachable; retrying…"
PROMPT_ATTEMPTS = 3  # a remote server that finds the prompt too long gets it again with fewer turns
WINDOW_REFILL = 0.6  # when a full window must drop turns, it drops down to this share, so its start holds
HISTORY_PAGE = 64  # messages read per step when looking back for the history that fits
# Per platform: the target and handle that edit the message at an adapter's reference (`ReplyTarget.reference`).
Locator = Callable[[SessionKey, str], tuple[ReplyTarget, Any]]
# Zero-width and bidi-control characters are invisible and only confuse the tokenizer.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


_QUEUED_LINE = re.compile(r"⏳ Queued: #(\d+) in line…")


def queued_line(position: int) -> str:
    return f"⏳ Queued: #{position} in line…"


def parse_status_line(text: str) -> tuple[str, int | None] | None:
    """(kind, queue position) if ``text`` is one of the status lines shown before a reply's text, else None.

    For targets that show status apart from reply text (the web page): kind is thinking, reasoning, waiting or
    queued.
    """
    if text == THINKING:
        return "thinking", None
    if text == REASONING:
        return "reasoning", None
    if text == WAITING_FOR_PREVIOUS:
        return "waiting", None
    if match := _QUEUED_LINE.fullmatch(text):
        return "queued", int(match.group(1))
    return None


def storable(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON and Python, never in UTF-8) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


def speaker_name(name: str) -> str:
    """A display name as the model reads it before a user's words: one short plain line."""
    return " ".join(clean_text(name).split())[:64]


def can_continue_status(status: str, notes: list[str] | str) -> bool:
    """Whether a reply that ended so can be continued: cut by the length limit, stopped or interrupted."""
    lines = notes.splitlines() if isinstance(notes, str) else notes
    return status in (Status.STOPPED, Status.INTERRUPTED) or (status == Status.COMPLETE and LENGTH_NOTE in lines)


def can_continue(reply: StoredMessage) -> bool:
    return reply.role == "assistant" and bool(reply.content.strip()) and can_continue_status(reply.status,
                                                                                              reply.notes)


def _quoted(text: str) -> str:
    """Reasoning shown as a quote above the answer (``show_reasoning = "quoted"``)."""
    text = text.strip()
    return "".join(f"> {line}\n" for line in text.splitlines()) + "\n" if text else ""


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


_BEFORE_STORED = (State.WAITING, State.PROMPTING, State.QUEUED, State.GENERATING)


@dataclass(frozen=True)
class ReplyResult:
    status: str  # a bot.store.Status value
    text: str  # what the model wrote
    notes: list[str] = field(default_factory=list)  # what the bot showed below it
    delivered: bool = True  # False when the platform would not show the reply
    reply_id: int | None = None  # the stored reply (what Regenerate and Continue act on)
    can_continue: bool = False
    stored: bool = False  # True only once the reply's final text is in the database


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
    generation: Generation | RemoteGeneration | None = None
    text: str = ""  # the model's reply so far
    reply_id: int | None = None  # its row in the store, once it has one
    skip: int = 0  # characters of the stored reply its messages do not show (a Continue's text so far)
    where: tuple[int, str] | None = None  # its message with the buttons: (index, the target's reference)
    where_saved: str = ""  # the reference last written to its row
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

    def __init__(self, engine: Engine | RemoteEngine, store: Store, settings: Settings, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self._clock, self._sleep = clock, sleep
        self._pacers = Pacers(clock=clock, sleep=sleep)
        self._lines: dict[str, list[Request]] = {}  # per conversation, its unfinished requests in arrival order
        self._turns: dict[str, asyncio.Lock] = {}  # per conversation: whose turn it is to generate
        self._window_starts: dict[str, int] = {}  # per conversation with a full window: its oldest kept message
        self._background: set[asyncio.Task[ReplyResult]] = set()  # replies no caller awaits (`in_background`)
        self._opens_reasoning: tuple[object, bool] = (None, False)  # (chat template, its prompt opens <think>)
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self.metrics = Metrics(engine.status)  # this bot's own registry: several bots may share a process
        self.platforms = Platforms()  # adapters report connected / disconnected here; /readyz reads it
        # Adapters register how to reach their messages again: a process that outlives another rewrites the
        # messages of the replies the dead one left (see `start`).
        self.locators: dict[str, Locator] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # -- answering -------------------------------------------------------------------------------------

    async def respond(self, incoming: Incoming, target: ReplyTarget) -> ReplyResult:
        """Answer ``incoming`` on ``target``: store it, stream the model's reply, store the reply.

        Never raises for a failure of the model, the database or the platform: each ends the reply with a
        clear line (and a stored status). Only cancellation of the caller propagates.
        """
        files = tuple(dataclasses.replace(a, text=clean_text(a.text) or None, skipped=a.skipped or "it is empty")
                      if a.text is not None else a for a in incoming.attachments)
        text, file_notes = with_attachments(clean_text(incoming.text), files)
        if not text:
            return await self._refuse(incoming.key, target, file_notes + [EMPTY_MESSAGE])
        name = speaker_name(incoming.author_name)

        async def store_message() -> Exchange:
            # Both rows are written before anything is shown, so neither the message nor its reply's place is lost.
            user_id, reply_id = await self.store.add_exchange(str(incoming.key), text, author_id=incoming.author_id,
                                                              author_name=name, lease_seconds=self._lease())
            return Exchange(user_id, text, name, reply_id)

        return await self._serve(incoming.key, target, before_turn=store_message, notes=file_notes)

    async def regenerate(self, key: SessionKey, target: ReplyTarget, reply_id: int) -> ReplyResult:
        """Answer the conversation's last message again; the new reply replaces ``reply_id`` in the history."""

        async def at_turn() -> Exchange:
            exchange = await self._latest_exchange(key, reply_id)
            await self.store.reopen_reply(reply_id, "", lease_seconds=self._lease())
            return exchange

        return await self._serve(key, target, at_turn=at_turn)

    async def continue_reply(self, key: SessionKey, target: ReplyTarget, reply_id: int) -> ReplyResult:
        """Let the model go on with reply ``reply_id`` (cut by the length limit, or stopped) where it ended."""

        async def at_turn() -> Exchange:
            exchange = await self._latest_exchange(key, reply_id)
            reply = await self.store.message(reply_id)
            if reply is None or not can_continue(reply):
                raise LlamarelayError(NOTHING_TO_CONTINUE)
            await self.store.reopen_reply(reply_id, reply.content, lease_seconds=self._lease())
            return dataclasses.replace(exchange, prefix=reply.content)

        return await self._serve(key, target, at_turn=at_turn)

    async def check_store(self) -> None:
        """Raise StoreError unless the database can take a message now: readiness is a write, not a read."""
        await self.store.probe()

    async def latest_reply(self, key: SessionKey) -> StoredMessage | None:
        """The conversation's newest reply: the one Regenerate and Continue may act on."""
        newest = await self.store.messages(str(key), limit=1)
        return newest[0] if newest and newest[0].role == "assistant" else None

    def in_background(self, reply: Coroutine[Any, Any, ReplyResult]) -> asyncio.Task[ReplyResult]:
        """Run ``reply`` (`respond`, `regenerate`, `continue_reply`) in a task held here until it ends: for
        adapters whose request ends before the reply does (a closed browser tab must not cut a reply short)."""
        task = asyncio.create_task(reply, name="reply")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _refuse(self, key: SessionKey, target: ReplyTarget, notes: list[str]) -> ReplyResult:
        delivered = await self._delivery(key, target).finish("\n".join(notes))
        self.metrics.replies.labels(key.platform, Status.FAILED).inc()
        return ReplyResult(Status.FAILED, "", notes, delivered)

    def _delivery(self, key: SessionKey, target: ReplyTarget,
                  on_moved: Callable[[int, str], Awaitable[None]] | None = None) -> Delivery:
        return Delivery(target, self._pacers.for_target(target), clock=self._clock, sleep=self._sleep,
                        on_failure=lambda exc: self.metrics.platform_failure(key.platform, exc), on_moved=on_moved)

    async def _serve(self, key: SessionKey, target: ReplyTarget, *,
                     before_turn: Callable[[], Awaitable[Exchange]] | None = None,
                     at_turn: Callable[[], Awaitable[Exchange]] | None = None,
                     notes: list[str] | None = None) -> ReplyResult:
        """One request's whole life: a place in the conversation's line, its turn, the reply, its delivery."""
        line = self._lines.get(str(key), [])
        if not self._accepting:
            return await self._refuse(key, target, [SHUTTING_DOWN])
        if len(line) > self.settings.conversation.max_waiting:
            return await self._refuse(key, target, [too_many_waiting(len(line) - 1)])
        delivery = self._delivery(key, target, on_moved=lambda index, at: self._moved(request, index, at))
        request = Request(str(key), delivery)
        self._lines.setdefault(request.key, []).append(request)
        self._idle.clear()
        try:
            result = await self._run(request, before_turn, at_turn, notes or [])
            request.state = State.DELIVERING
            if result.reply_id is not None:
                delivery.controls(Controls(reply_id=result.reply_id, can_continue=result.can_continue))
            delivered = await delivery.finish("\n".join(result.notes))
            self.metrics.replies.labels(key.platform, result.status).inc()
            return dataclasses.replace(result, delivered=delivered)
        finally:
            delivery.cancel()
            request.state = State.DONE
            self._lines[request.key].remove(request)
            if not self._lines[request.key]:
                del self._lines[request.key]
                self._turns.pop(request.key, None)
            if not self._lines:
                self._idle.set()

    async def _run(self, request: Request, before_turn: Callable[[], Awaitable[Exchange]] | None,
                   at_turn: Callable[[], Awaitable[Exchange]] | None, first_notes: list[str]) -> ReplyResult:
        """Wait for the conversation's turn, generate, and store the reply (``first_notes`` above its own)."""
        key, delivery = request.key, request.delivery
        delivery.status(WAITING_FOR_PREVIOUS if len(self._lines[key]) > 1 else THINKING)
        delivery.controls(Controls(stop=True))
        delivery.start()
        exchange: Exchange | None = None
        if before_turn is not None:
            try:
                exchange = await before_turn()
                await self._own(request, exchange)
            except LlamarelayError as exc:
                log.error("could not store a message in %s: %s", log_name(key), exc)
                return ReplyResult(Status.FAILED, "", [*first_notes, NOT_SAVED])
        turn = self._turns.setdefault(key, asyncio.Lock())
        try:
            if not await self._take_turn(request, turn):
                assert request.ended is not None
                if exchange is None:
                    return ReplyResult(Status.STOPPED, "", [*first_notes, request.ended])
                return await self._store_reply(exchange, "", Status.STOPPED, [*first_notes, request.ended])
            try:
                # The store's turn too (across processes on PostgreSQL), held until the reply is stored: the
                # next message, wherever it landed, reads this reply as its history.
                async with contextlib.AsyncExitStack() as held:
                    try:
                        if not await self._take_store_turn(request, held):
                            assert request.ended is not None
                            status, notes = Status.STOPPED, [request.ended]
                        else:
                            if at_turn is not None:
                                exchange = await at_turn()
                                await self._own(request, exchange)
                            assert exchange is not None
                            request.text = exchange.prefix
                            status, notes = await self._generate(request, exchange)
                    except LlamarelayError as exc:  # the model, the template or the database: the user sees why
                        status, notes = Status.FAILED, [f"⚠️ {exc}"]
                    except Exception as exc:
                        log.exception("answering a message in %s failed", log_name(key))
                        status, notes = Status.FAILED, [f"⚠️ Something went wrong on my side "
                                                        f"({type(exc).__name__}); your message is saved, "
                                                        "please try again."]
                    if exchange is None:
                        return ReplyResult(status, "", [*first_notes, *notes])
                    return await self._store_reply(exchange, request.text, status, [*first_notes, *notes])
            finally:
                turn.release()
        except BaseException:  # cancelled: free the engine, keep what was written
            if request.generation is not None:
                request.generation.cancel()
            if exchange is not None:
                await asyncio.shield(self._store_reply(exchange, request.text, Status.INTERRUPTED, first_notes))
            raise

    async def _own(self, request: Request, exchange: Exchange) -> None:
        """``request`` now writes ``exchange``'s reply row: note it there if its message is posted already."""
        request.reply_id, request.skip = exchange.reply_id, len(exchange.prefix)
        await self._save_where(request)

    async def _moved(self, request: Request, index: int, at: str) -> None:
        request.where = (index, at)
        await self._save_where(request)

    async def _save_where(self, request: Request) -> None:
        """Store where the reply's message with the buttons is, so a survivor can rewrite it if we die."""
        if request.reply_id is None or request.where is None:
            return
        ref = json.dumps({"message": request.where[0], "skip": request.skip, "at": request.where[1]})
        if ref != request.where_saved:
            request.where_saved = ref
            try:
                await self.store.set_message_ref(request.reply_id, ref)
            except LlamarelayError as exc:  # only a survivor's rewrite of the message depends on it
                log.warning("could not note where a reply in %s is: %s", log_name(request.key), exc)

    async def _latest_exchange(self, key: SessionKey, reply_id: int) -> Exchange:
        """The conversation's last message and its reply, if ``reply_id`` is still that reply."""
        newest = await self.store.messages(str(key), limit=2)
        if len(newest) < 2 or newest[1].id != reply_id or newest[0].role != "user":
            raise LlamarelayError(STALE_REPLY)
        user = newest[0]
        return Exchange(user.id, user.content, user.author_name, reply_id)

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

    async def _take_store_turn(self, request: Request, held: contextlib.AsyncExitStack) -> bool:
        """Enter the store's turn of the conversation into ``held`` (on PostgreSQL it spans every process, so a
        message that landed on another process goes first); False if the request was ended while waiting."""
        if request.ended is not None:
            return False
        enter = asyncio.ensure_future(held.enter_async_context(self.store.turn(request.key)))
        wake = asyncio.ensure_future(request.wake.wait())
        try:
            await asyncio.wait({enter, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            if not enter.done():
                enter.cancel()
                await asyncio.wait({enter})  # it lets go of what it took before we go on
        if enter.cancelled():
            return False
        enter.result()  # a StoreError: the reply fails with its line
        return request.ended is None

    async def _generate(self, request: Request, exchange: Exchange) -> tuple[str, list[str]]:
        """Build the prompt and stream the model's reply into ``request.text``: (status, notes)."""
        key = request.key
        request.state = State.PROMPTING
        sampling = await self.sampling(key)
        system = await self.system_prompt(key)
        budget = self.engine.n_ctx - sampling.max_tokens
        history = await self._history_that_fits(key, exchange.user_id, budget)
        speakers = not SessionKey.parse(key).is_private
        for attempt in range(PROMPT_ATTEMPTS):
            prompt, notes = await asyncio.to_thread(
                self.build_prompt, system, history, exchange.text, sampling.max_tokens,
                speaker=exchange.author_name if speakers else "", prefix=exchange.prefix, budget=budget,
                keep_from=self._window_starts.get(key))
            if prompt.turns_from is None:
                self._window_starts.pop(key, None)
            else:
                self._window_starts[key] = prompt.turns_from
            if request.ended is not None:
                return Status.STOPPED, [request.ended]
            try:
                return await self._stream(request, exchange, prompt, sampling, notes)
            except PromptTooLong as exc:  # a remote server counts more tokens than our estimate: fewer turns
                if attempt == PROMPT_ATTEMPTS - 1 or request.text != exchange.prefix:
                    raise
                budget = len(prompt.tokens) // 2
                if exc.n_ctx is not None:  # it said how large its window is
                    budget = min(budget, exc.n_ctx - sampling.max_tokens)
                log.info("the model server found a prompt in %s too long; trying %d tokens", log_name(key), budget)
        raise AssertionError("unreachable")

    async def _stream(self, request: Request, exchange: Exchange, prompt: Prompt, sampling: SamplingSettings,
                      notes: list[str]) -> tuple[str, list[str]]:
        """Run ``prompt`` on the engine and stream the model's reply into ``request.text``: (status, notes)."""
        key, delivery = request.key, request.delivery
        generation = request.generation = self.engine.submit(prompt, sampling, session=key)
        request.state = State.QUEUED
        metrics, timer = self.metrics, self.metrics.timer(self._clock)
        reasoning = ReasoningSplitter(inside=not exchange.prefix and self._prompt_opens_reasoning())
        quote_reasoning = self.settings.conversation.show_reasoning == "quoted"

        def shown() -> str:  # what the platform shows: a Continue only what it adds; quoted reasoning if asked
            return (_quoted(reasoning.reasoning) if quote_reasoning else "") + reasoning.answer

        saved_at = self._clock()
        async for event in generation:
            if delivery.failed:  # nobody can see this reply: free the engine for others
                generation.cancel()
            if isinstance(event, QueuePosition):
                request.state = State.QUEUED if event.position else State.GENERATING
                delivery.status(queued_line(event.position) if event.position else THINKING)
                continue
            if isinstance(event, Retrying):
                delivery.status(SERVER_RETRYING)
                continue
            timer.text()  # a text delta
            reasoning.feed(event)
            request.text = exchange.prefix + reasoning.answer
            if reasoning.thinking and not quote_reasoning:
                delivery.status(REASONING)
            else:
                delivery.update(shown())
            if self._clock() - saved_at >= CHECKPOINT_SECONDS:
                saved_at = self._clock()
                try:
                    await self.store.checkpoint(exchange.reply_id, request.text)
                except LlamarelayError as exc:  # the final write will try again
                    log.warning("could not checkpoint a reply in %s: %s", log_name(key), exc)
        metrics.tokens_generated.inc(generation.n_generated)
        metrics.prompt_tokens.inc(len(prompt.tokens))
        metrics.prompt_tokens_reused.inc(generation.n_prompt_reused)
        reasoning.finish()
        request.text = exchange.prefix + reasoning.answer
        delivery.update(shown())
        status, footer = self._outcome(request, generation, reasoning.answer)
        return status, notes + footer

    def _prompt_opens_reasoning(self) -> bool:
        """True when the chat template's generation prompt opens a ``<think>`` block itself (DeepSeek-R1)."""
        template = self.engine.chat_template
        if template is None:  # a remote server applies its template and sends reasoning apart
            return False
        if self._opens_reasoning[0] is not template:
            last, _ = template.render_segments([{"role": "user", "content": "?"}])[-1]
            self._opens_reasoning = (template, last.rstrip().endswith(REASONING_OPEN))
        return self._opens_reasoning[1]

    def _outcome(self, request: Request, generation: Generation | RemoteGeneration, text: str) -> tuple[str, list[str]]:
        if request.delivery.failed:
            return Status.INTERRUPTED, ["⚠️ The platform would not take this reply."]
        if generation.finish_reason is FinishReason.CANCELLED:
            return Status.STOPPED, [request.ended or STOPPED_NOTE]
        if not text.strip():
            return Status.FAILED, ["⚠️ The model gave an empty reply; try rephrasing."]
        if generation.finish_reason is FinishReason.LENGTH:
            return Status.COMPLETE, [LENGTH_NOTE]
        return Status.COMPLETE, []

    async def _store_reply(self, exchange: Exchange, text: str, status: str, notes: list[str]) -> ReplyResult:
        try:
            await self.store.finish_message(exchange.reply_id, text, status, "\n".join(notes))
        except LlamarelayError as exc:  # no controls: Regenerate and Continue act on the stored reply
            log.error("could not store a reply: %s", exc)
            return ReplyResult(status, text, [*notes, NOT_STORED])
        return ReplyResult(status, text, notes, reply_id=exchange.reply_id, stored=True,
                           can_continue=bool(text.strip()) and can_continue_status(status, notes))

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

    def build_prompt(self, system: str, history: list[StoredMessage], text: str, max_tokens: int, *,
                     speaker: str = "", prefix: str = "", budget: int | None = None,
                     keep_from: int | None = None) -> tuple[Prompt, list[str]]:
        """A prompt that fits ``budget`` (default ``n_ctx - max_tokens``) tokens: the system prompt always,
        then the newest turns that fit.

        Every turn is the stored text as it was written: a reply cut short is fed back as far as it got. In a
        shared conversation (``speaker``: who wrote ``text``) each user turn starts with its author's name, so
        the model can tell people apart; names are message text, never template. ``prefix`` (Continue) is a
        reply so far, which the model goes on from. When turns must be left out, they go in large steps, and
        ``keep_from`` (the oldest message the last prompt kept) is kept again while it fits.
        """
        engine = self.engine
        budget = self.engine.n_ctx - max_tokens if budget is None else budget

        def said(m: StoredMessage) -> str:
            return f"{m.author_name}: {m.content}" if speaker and m.role == "user" and m.author_name else m.content

        turns = [{"role": m.role, "content": said(m)} for m in history]  # the template keeps roles alternating
        head = f"{speaker}: " if speaker else ""
        tail = engine.tokenize(prefix) if prefix else []

        def conversation(kept: list[dict[str, str]], user_text: str) -> list[dict[str, str]]:
            return [{"role": "system", "content": system}, *kept, {"role": "user", "content": head + user_text}]

        def render(kept: list[dict[str, str]], user_text: str) -> list[int]:
            return engine.chat_tokens(conversation(kept, user_text)) + tail

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
        def first_fitting(limit: int, low: int = 0) -> int:
            """How many of the oldest turns to drop to fit ``limit`` (render is monotone in what is kept)."""
            high = len(turns)
            while low < high:
                middle = (low + high) // 2
                if len(render(turns[middle:], text)) <= limit:
                    high = middle
                else:
                    low = middle + 1
            return low

        drop = first_fitting(budget)
        if drop:
            # A full window drops turns in large steps: the prompt keeps its start (and the engine its cached
            # prefix) for many turns, rather than changing it, and re-reading everything, on every message.
            kept_before = next((i for i, m in enumerate(history) if keep_from is not None and m.id >= keep_from),
                               -1)
            drop = kept_before if kept_before >= drop else first_fitting(int(budget * WINDOW_REFILL), drop)
        start = history[drop].id if drop < len(history) else None
        return Prompt(conversation(turns[drop:], text), render(turns[drop:], text), prefix,
                      turns_from=start if drop else None), notes

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
        newest = await self.store.messages(str(key), limit=1)
        pending = [request for request in self._lines.get(str(key), []) if request.state is not State.DONE]
        for request in pending:
            request.end(RESET_NOTE if request.state in (State.WAITING, State.PROMPTING) else STOPPED_NOTE)
        deadline = self._clock() + RESET_WAIT_SECONDS  # their last rows are written within a decode step
        while self._clock() < deadline and any(request.state in _BEFORE_STORED for request in pending):
            await asyncio.sleep(0.01)
        if newest:  # a message sent while the reset ran is the new conversation's first: it stays
            await self.store.clear_messages(str(key), through_id=newest[0].id)

    async def system_prompt(self, key: SessionKey | str) -> str:
        """The conversation's own system prompt, else its channel's (a thread inherits), else the default."""
        key = SessionKey.parse(key) if isinstance(key, str) else key
        for owner in (key, key.parent):
            if owner is not None and (prompt := await self.store.system_prompt(str(owner))) is not None:
                return prompt
        return self.settings.conversation.system_prompt

    async def set_system_prompt(self, key: SessionKey, prompt: str | None) -> None:
        """Set this session's system prompt; None restores the configured default."""
        await self.store.set_system_prompt(str(key), None if prompt is None else clean_text(prompt))

    async def sampling(self, key: SessionKey | str) -> SamplingSettings:
        """The configured sampling with the channel's overrides, then the conversation's own (a thread inherits)."""
        key = SessionKey.parse(key) if isinstance(key, str) else key
        overrides = {**(await self.store.sampling(str(key.parent)) if key.parent else {}),
                     **await self.store.sampling(str(key))}
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

    async def set_feedback(self, key: SessionKey, reply_id: int, feedback: Literal["good", "bad"]) -> bool:
        """Store a user's 👍/👎 with reply ``reply_id``; False when it is not a reply of this conversation."""
        return await self.store.set_feedback(str(key), reply_id, feedback)

    async def is_known(self, key: SessionKey) -> bool:
        """True once the conversation has a message: a thread the bot answered in is one it follows."""
        return bool(await self.store.messages(str(key), limit=1))

    async def conversations(self, prefix: str, limit: int) -> list[tuple[str, str, int]]:
        """(key, first user message, message count) of the newest ``limit`` conversations under ``prefix``."""
        return await self.store.session_summaries(prefix, limit)

    async def exists(self, key: SessionKey) -> bool:
        """True once the conversation was created (a message, or settings of its own)."""
        return str(key) in await self.store.session_keys(str(key))

    def running(self) -> list[SessionKey]:
        """Conversations with a message not yet answered: waiting, queued, generating or being delivered."""
        return [SessionKey.parse(key) for key, line in self._lines.items()
                if any(request.state is not State.DONE for request in line)]

    @property
    def limits(self) -> ConversationSettings:
        """The [conversation] settings adapters apply at their edge (file sizes, how much a summary reads)."""
        return self.settings.conversation

    @property
    def context_window(self) -> int:
        """Tokens in one conversation's window (a reply's max_tokens must stay below it)."""
        return self.engine.n_ctx

    async def claim_event(self, event_id: str, ttl_seconds: float = 900.0) -> bool:
        """True the first time a platform event id is seen; False for a redelivery within the TTL."""
        return await self.store.claim_event(event_id, ttl_seconds)

    def status(self, key: SessionKey | str | None = None) -> ConversationStatus:
        """The engine's figures and, for ``key``, where that conversation's oldest unanswered message is."""
        line = [r for r in self._lines.get(str(key), []) if r.state is not State.DONE] if key else []
        first = line[0] if line else None
        engine = self.engine.status(first.generation if first is not None else None)
        return ConversationStatus(engine, first.state if first else None, max(0, len(line) - 1))

    # -- leases: replies of processes that died ---------------------------------------------------------

    def start(self) -> None:
        """Keep leases from now on: every reply in progress here is leased and renewed, and every process on
        the database takes over the replies whose process died (a lease no one renews), marking them
        interrupted as far as they were saved and rewriting their messages without a Stop button."""
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep_leases(), name="reply leases")

    def _lease(self) -> float | None:
        return self.settings.store.reply_lease if self._keeper is not None else None

    async def _keep_leases(self) -> None:
        """Three times a lease: renew this process's replies, then take over those whose lease ran out."""
        lease = self.settings.store.reply_lease
        while True:
            try:
                ours = [r.reply_id for line in self._lines.values() for r in line if r.reply_id is not None]
                if ours:
                    await self.store.renew_leases(ours, lease)
                for lapsed in await self.store.expire_leases(TAKEN_OVER_NOTE):
                    log.warning("reply %d in %s was left generating by a process that stopped; marked interrupted",
                                lapsed.id, log_name(lapsed.session_key))
                    task = asyncio.create_task(self._retire(lapsed), name="retire a reply")
                    self._retiring.add(task)
                    task.add_done_callback(self._retiring.discard)
            except LlamarelayError as exc:  # the database is away: try again next time
                log.warning("could not renew or check reply leases: %s", exc)
            except Exception:  # never stop renewing: other processes would take over our live replies
                log.exception("keeping reply leases failed")
            await asyncio.sleep(lease / 3)

    async def _retire(self, lapsed: LapsedReply) -> None:
        """Show a reply taken over from a dead process as it was saved, with the note and without Stop."""
        key = SessionKey.parse(lapsed.session_key)
        locate = self.locators.get(key.platform)
        if locate is None or not lapsed.message_ref:
            return
        try:
            where = json.loads(lapsed.message_ref)
            target, handle = locate(key, where["at"])
            measure: Callable[[str], int] = getattr(target, "measure", len)
            pieces = split_reply(lapsed.content[where["skip"]:], target.max_length, measure)
            piece = pieces[where["message"]].text if where["message"] < len(pieces) else ""
            while piece and (over := measure(display_text(piece, TAKEN_OVER_NOTE)) - target.max_length) > 0:
                piece = piece[:-over]
            await target.edit(handle, display_text(piece, TAKEN_OVER_NOTE),
                              Controls(reply_id=lapsed.id, can_continue=bool(lapsed.content.strip())))
        except Exception as exc:  # the message may be gone; the stored reply is what matters
            self.metrics.platform_failure(key.platform, exc)
            log.warning("could not rewrite the message of reply %d in %s: %s", lapsed.id, log_name(key), exc)

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
            late = [request for line in self._lines.values() for request in line]
            log.warning("%d replies were not finished at the shutdown deadline", len(late))
            for request in late:
                request.delivery.cancel()
                if request.state in _BEFORE_STORED and request.reply_id is not None:
                    # Still in the engine (a long decode step): stored as far as it got, never left "generating".
                    try:
                        await self.store.finish_message(request.reply_id, request.text, Status.INTERRUPTED,
                                                        SHUTTING_DOWN)
                    except LlamarelayError as exc:
                        log.error("could not store a reply at shutdown: %s", exc)
        leases = [task for task in (self._keeper, *self._retiring) if task is not None]
        for task in leases:
            task.cancel()
        await asyncio.gather(*leases, return_exceptions=True)
        self._keeper = None

    async def wait_idle(self) -> None:
        """Wait until no message is being answered."""
        await self._idle.wait()
