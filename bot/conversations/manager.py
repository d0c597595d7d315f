"""ConversationManager: the one owner of every message, from arrival to its stored, delivered reply.

Each message is a `Request` with an explicit `State` that /stop, /reset, /status and shutdown all see.
Messages of one conversation are answered in arrival order; the reply text is the model's, whole, and is
what is stored and fed back; notes (stopped, errors) travel beside it; `bot.delivery` shows it. The window,
the stream, settings inheritance, the redo rule and leases each live in a module of this package.

Over 400 lines: this is the one face adapters call (answering, /stop, /reset, /status, settings and /model,
tools and their approvals, the store's answers they need, shutdown), so each of those is a short method here over
the module that does the work; what is its own is the request lifecycle and which model's parts answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Literal

from bot.access import Actor
from bot.config import ConversationSettings, SamplingSettings, Settings
from bot.conversations import redo
from bot.conversations.leases import Leases
from bot.conversations.remote_tools import RemoteToolRounds
from bot.conversations.requests import (
    BEFORE_STORED,
    ConversationStatus,
    Exchange,
    Locator,
    NewMessage,
    Redo,
    ReplyResult,
    Request,
    State,
)
from bot.conversations.settings import SessionSettings
from bot.conversations.streaming import Streaming
from bot.conversations.tools import Toolbox, ToolRounds
from bot.conversations.turns import take_store_turn, take_turn
from bot.conversations.window import Window
from bot.delivery import Delivery, Pacers
from bot.engine.base import InferenceEngine, renders_template
from bot.engine.remote import RemoteEngine
from bot.errors import EngineError, LlamarelayError
from bot.files import with_attachments
from bot.images import ImageIntake, Vision, keep_images
from bot.metrics import Metrics, Platforms
from bot.models import Model, ModelRegistry
from bot.prompt import Prompt
from bot.store import Status, Store, StoredMessage, StoredToolCall
from bot.text import clean_text, speaker_name
from bot.tools.approvals import Approvals
from bot.tools.details import details_text
from bot.tools.registry import ToolSpec
from bot.types import Controls, Incoming, Phase, ReplyStatus, ReplyTarget, SessionKey, log_name
from bot.wording import (
    EMPTY_FILE,
    EMPTY_MESSAGE,
    NO_TOOL_CALLS,
    NOT_SAVED,
    NOT_STORED,
    NOTHING_TO_CONTINUE,
    RESET_NOTE,
    SHUTTING_DOWN,
    STALE_REPLY,
    STOPPED_NOTE,
    answered_by,
    failed,
    model_line,
    something_went_wrong,
    too_many_waiting,
    unknown_model,
)

__all__ = ["ConversationManager"]

log = logging.getLogger(__name__)

RESET_WAIT_SECONDS = 10.0  # /reset waits this long for the replies it ended to be stored

Ask = NewMessage | Redo


@dataclasses.dataclass(frozen=True)
class _Parts:
    """What runs one model's prompts: its window, its stream, and its tool rounds."""

    engine: InferenceEngine
    window: Window
    streaming: Streaming
    tool_rounds: ToolRounds | RemoteToolRounds


class ConversationManager:
    """Shared by every adapter: stores messages, builds prompts within the context window, runs the engine."""

    def __init__(
        self,
        engine: InferenceEngine,
        store: Store,
        settings: Settings,
        *,
        models: ModelRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self._clock, self._sleep = clock, sleep
        self._pacers = Pacers(clock=clock, sleep=sleep)
        self._lines: dict[str, list[Request]] = {}  # per conversation, its unfinished requests in arrival order
        self._turns: dict[str, asyncio.Lock] = {}  # per conversation: whose turn it is to generate
        self._background: set[asyncio.Task[ReplyResult]] = set()  # replies no caller awaits (`in_background`)
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self.metrics = Metrics(engine.status)  # this bot's own registry: several bots may share a process
        self.platforms = Platforms()  # adapters report connected / disconnected here; /readyz reads it
        # Adapters register how to reach their messages again: a process that outlives another rewrites the
        # messages of the replies the dead one left (see `start`).
        self.locators: dict[str, Locator] = {}
        # Every configured model; the default (``engine``) is open, the others load on first use (/model).
        self.models = models or ModelRegistry(settings)
        self.models.adopt(engine)
        self.approvals = Approvals()  # tool calls waiting for Run / Deny; adapters forward presses here
        self._parts: dict[str, _Parts] = {}  # per model name: what runs its prompts, for its engine of now
        self.window = self._parts_for(self.models.default, engine).window  # the default model's
        # Images: stored at the largest size a model reads; each model gets them at its own (bot.images).
        every = [self.models.get(name) for name in self.models.names()]
        seeing = [model for model in every if model.capabilities.vision]
        self.images = ImageIntake(settings.images, max(m.image_size for m in seeing or every[:1]))
        self.sessions = SessionSettings(store, settings, lambda: engine.n_ctx)
        self.tools: Toolbox | None = None  # set by `use_tools` when tool servers are configured
        self._leases = Leases(
            store,
            self.metrics,
            self.locators,
            settings=settings.store,
            ours=lambda: (r.reply_id for line in self._lines.values() for r in line if r.reply_id is not None),
        )

    # -- answering -------------------------------------------------------------------------------------

    async def respond(self, incoming: Incoming, target: ReplyTarget) -> ReplyResult:
        """Answer ``incoming`` on ``target``: store it, stream the model's reply, store the reply.

        Never raises for a failure of the model, the database or the platform: each ends the reply with a
        clear line (and a stored status). Only cancellation of the caller propagates.
        """
        files = tuple(
            dataclasses.replace(a, text=clean_text(a.text) or None, skipped=a.skipped or EMPTY_FILE)
            if a.text is not None
            else a
            for a in incoming.attachments
        )
        text, file_notes = with_attachments(clean_text(incoming.text), files)
        if not text and not incoming.images:
            return await self._refuse(incoming.key, target, file_notes + [EMPTY_MESSAGE])
        ask = NewMessage(incoming, text, speaker_name(incoming.author_name))
        return await self._serve(incoming.key, target, ask, file_notes)

    async def regenerate(self, key: SessionKey, target: ReplyTarget, reply_id: int) -> ReplyResult:
        """Answer the conversation's last message again; the new reply replaces ``reply_id`` in the history."""
        return await self._serve(key, target, Redo(reply_id))

    async def continue_reply(self, key: SessionKey, target: ReplyTarget, reply_id: int) -> ReplyResult:
        """Let the model go on with reply ``reply_id`` (cut by the length limit, or stopped) where it ended."""
        return await self._serve(key, target, Redo(reply_id, continuing=True))

    async def redo_refusal(self, key: SessionKey, reply_id: int, *, continuing: bool) -> redo.RedoRefusal | None:
        """Why reply ``reply_id`` may not be regenerated (or continued) now, or None when it may: what every
        platform's buttons ask before they start a new answer."""
        answering = any(request.state is not State.DONE for request in self._lines.get(str(key), []))
        return redo.refusal(await self.latest_reply(key), reply_id, continuing=continuing, answering=answering)

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

    def _delivery(
        self, key: SessionKey, target: ReplyTarget, on_moved: Callable[[int, str], Awaitable[None]] | None = None
    ) -> Delivery:
        return Delivery(
            target,
            self._pacers.for_target(target),
            clock=self._clock,
            sleep=self._sleep,
            on_failure=lambda exc: self.metrics.platform_failure(key.platform, exc),
            on_moved=on_moved,
        )

    async def _serve(
        self, key: SessionKey, target: ReplyTarget, ask: Ask, notes: list[str] | None = None
    ) -> ReplyResult:
        """One request's whole life: a place in the conversation's line, its turn, the reply, its delivery."""
        line = self._lines.get(str(key), [])
        if not self._accepting:
            return await self._refuse(key, target, [SHUTTING_DOWN])
        if len(line) > self.settings.conversation.max_waiting:
            return await self._refuse(key, target, [too_many_waiting(len(line) - 1)])
        delivery = self._delivery(key, target, on_moved=lambda index, at: self._moved(request, index, at))
        request = Request(
            str(key),
            delivery,
            author_id=ask.incoming.author_id if isinstance(ask, NewMessage) else "",
            author_roles=ask.incoming.author_roles if isinstance(ask, NewMessage) else frozenset(),
        )
        self._lines.setdefault(request.key, []).append(request)
        self._idle.clear()
        try:
            result = await self._run(request, ask, notes or [])
            request.state = State.DELIVERING
            if result.reply_id is not None:
                result = dataclasses.replace(result, tool_details=await self._called_tools(result.reply_id))
                delivery.controls(
                    Controls(
                        reply_id=result.reply_id, can_continue=result.can_continue, tool_details=result.tool_details
                    )
                )
            delivered = await delivery.finish("\n".join(result.notes))
            self.metrics.replies.labels(key.platform, result.status).inc()
            return dataclasses.replace(result, delivered=delivered)
        finally:
            delivery.cancel()
            self._done(request)

    def _done(self, request: Request) -> None:
        request.state = State.DONE
        self._lines[request.key].remove(request)
        if not self._lines[request.key]:
            del self._lines[request.key]
            self._turns.pop(request.key, None)
        if not self._lines:
            self._idle.set()

    async def _run(self, request: Request, ask: Ask, notes: list[str]) -> ReplyResult:
        """Store a new message, wait for the conversation's turn, generate, and store the reply (``notes``
        above its own). Cancelled, it frees the engine and stores the reply as far as it got."""
        first = ReplyStatus(Phase.WAITING) if len(self._lines[request.key]) > 1 else ReplyStatus(Phase.THINKING)
        request.delivery.status(first)
        request.delivery.controls(Controls(stop=True))
        request.delivery.start()
        if isinstance(ask, NewMessage) and not await self._store_message(request, ask):
            return ReplyResult(Status.FAILED, "", [*notes, NOT_SAVED])
        try:
            return await self._answer_in_turn(request, ask, notes)
        except BaseException:
            if request.generation is not None:
                request.generation.cancel()
            if request.exchange is not None:
                await asyncio.shield(
                    self._store_reply(request.exchange, request.text, Status.INTERRUPTED, notes, model=request.model)
                )
            raise

    async def _store_message(self, request: Request, ask: NewMessage) -> bool:
        """Store the message and its reply's row before anything is shown, so neither is lost; False if not."""
        incoming = ask.incoming
        try:
            user_id, reply_id = await self.store.add_exchange(
                request.key,
                ask.text,
                author_id=incoming.author_id,
                author_name=ask.author_name,
                lease_seconds=self._leases.seconds,
            )
            # Before the reply is built: its prompt reads them from the store, like the history's.
            if incoming.images and (
                pruned := await keep_images(self.store, user_id, incoming.images, self.settings.images)
            ):
                log.info("%d stored images lost their data to keep [images] disk_mb", pruned)
            await self._own(request, Exchange(user_id, ask.text, ask.author_name, reply_id))
        except LlamarelayError as exc:
            log.error("could not store a message in %s: %s", log_name(request.key), exc)
            return False
        return True

    async def _answer_in_turn(self, request: Request, ask: Ask, notes: list[str]) -> ReplyResult:
        """Take the conversation's turns (this process's, then the store's), answer, and store the reply."""
        turn = self._turns.setdefault(request.key, asyncio.Lock())
        if not await take_turn(request, turn):
            return await self._end(request, Status.STOPPED, [*notes, request.ended or STOPPED_NOTE])
        try:
            # The store's turn is held until the reply is stored (across processes on PostgreSQL): the next
            # message, wherever it landed, reads this reply as its history.
            async with contextlib.AsyncExitStack() as held:
                status, own_notes = await self._answer(request, ask, held)
                return await self._end(request, status, [*notes, *own_notes])
        finally:
            turn.release()

    async def _answer(self, request: Request, ask: Ask, held: contextlib.AsyncExitStack) -> tuple[str, list[str]]:
        """With the store's turn entered into ``held``, generate the reply: (status, notes). A failure of the
        model, the template or the database ends it with a line that says why."""
        try:
            if not await take_store_turn(request, self.store, held):
                return Status.STOPPED, [request.ended or STOPPED_NOTE]
            if isinstance(ask, Redo):
                await self._own(request, await self._reopen(SessionKey.parse(request.key), ask))
            assert request.exchange is not None
            request.text = request.exchange.prefix
            return await self._generate(request, request.exchange)
        except LlamarelayError as exc:
            return Status.FAILED, [failed(exc)]
        except Exception as exc:
            log.exception("answering a message in %s failed", log_name(request.key))
            return Status.FAILED, [something_went_wrong(exc)]

    async def _reopen(self, key: SessionKey, ask: Redo) -> Exchange:
        """The exchange a Regenerate or Continue answers, its reply row reopened; refused by the redo rule when
        the reply is no longer the latest, or (Continue) was not cut short."""
        newest = await self.store.messages(str(key), limit=2)
        if len(newest) < 2 or newest[1].id != ask.reply_id or newest[0].role != "user":
            raise LlamarelayError(STALE_REPLY)
        user, reply = newest
        if ask.continuing and not redo.can_continue(reply):
            raise LlamarelayError(NOTHING_TO_CONTINUE)
        prefix = reply.content if ask.continuing else ""
        await self.store.reopen_reply(ask.reply_id, prefix, lease_seconds=self._leases.seconds)
        return Exchange(user.id, user.content, user.author_name, ask.reply_id, prefix)

    async def _generate(self, request: Request, exchange: Exchange) -> tuple[str, list[str]]:
        """Build the prompt for the conversation's model and stream its reply into ``request.text``: (status,
        notes). The model is loaded first when it is not; one that cannot answer fails this reply alone, with a
        line that names it."""
        request.state = State.PROMPTING
        model = await self.model(request.key)
        request.model = model.name
        async with self.models.use(model.name) as engine:
            try:
                status, notes = await self._generate_with(request, exchange, model, self._parts_for(model, engine))
            except EngineError as exc:
                if len(self.models.names()) == 1:  # nothing else to pick: the engine's own words, as ever
                    raise
                raise EngineError(self.models.failure_line(model.name, exc)) from exc
        return status, notes + ([answered_by(model.name)] if not model.is_default else [])

    async def _generate_with(
        self, request: Request, exchange: Exchange, model: Model, parts: _Parts
    ) -> tuple[str, list[str]]:
        """Build the prompt that fits ``model``'s window (its template, its images, its tools) and run it."""
        sampling = await self.sampling(request.key)
        if sampling.max_tokens >= parts.engine.n_ctx:  # a smaller window than the default's: leave room to read
            sampling = sampling.model_copy(update={"max_tokens": parts.engine.n_ctx // 4})
        system = plain_system = await self.system_prompt(request.key)
        # Any model may call tools unless its [[models]] entry says tools = false: an embedded one writes them in
        # its template's syntax (read back under a grammar), a server takes OpenAI's tools API.
        tools = (
            self.offered_tools(
                request.key, request.author_id, roles=request.author_roles, can_ask=request.delivery.asks_approval
            )
            if model.declared_tools is not False
            else []
        )
        if tools:
            system = parts.tool_rounds.offer(plain_system, tools)

        async def run(prompt: Prompt, notes: list[str]) -> tuple[str, list[str]]:
            if request.ended is not None:
                return Status.STOPPED, [request.ended]
            if tools:
                assert self.tools is not None
                return await parts.tool_rounds.run(
                    request, exchange, prompt, sampling, notes, box=self.tools, tools=tools, plain_system=plain_system
                )
            return await parts.streaming.run(request, exchange, prompt, sampling, notes)

        return await parts.window.fit(
            request.key,
            exchange,
            system,
            sampling,
            run=run,
            speakers=not SessionKey.parse(request.key).is_private,
            wrote=lambda: request.text != exchange.prefix,
            vision=self._vision_of(model),
        )

    def _parts_for(self, model: Model, engine: InferenceEngine) -> _Parts:
        """What runs ``model``'s prompts on ``engine``, built once per engine (a model loaded again gets new)."""
        parts = self._parts.get(model.name)
        if parts is None or parts.engine is not engine:
            rounds: ToolRounds | RemoteToolRounds
            if renders_template(engine):
                rounds = ToolRounds(engine, self.store, self.metrics, clock=self._clock, approvals=self.approvals)
            else:  # a server reads OpenAI's tools API
                assert isinstance(engine, RemoteEngine)
                rounds = RemoteToolRounds(engine, self.store, self.metrics, clock=self._clock, approvals=self.approvals)
            parts = self._parts[model.name] = _Parts(
                engine,
                Window(engine, self.store, self.settings.conversation, self.settings.images),
                Streaming(engine, self.store, self.metrics, self.settings.conversation, clock=self._clock),
                rounds,
            )
        return parts

    async def vision(self, key: SessionKey | str) -> Vision:
        """What the model answering conversation ``key`` makes of images."""
        return self._vision_of(await self.model(key))

    def _vision_of(self, model: Model) -> Vision:
        """What ``model`` makes of images; ``seeing``: the configured models that read them, for the note."""
        seeing = tuple(name for name in self.models.names() if self.models.get(name).capabilities.vision)
        return Vision(model.capabilities.vision, model.image_size, seeing)

    async def _end(self, request: Request, status: str, notes: list[str]) -> ReplyResult:
        """The reply as it ended, stored in its row (a request that never got one only reports)."""
        if request.exchange is None:
            return ReplyResult(status, "", notes)
        return await self._store_reply(request.exchange, request.text, status, notes, model=request.model)

    async def _store_reply(
        self, exchange: Exchange, text: str, status: str, notes: list[str], *, model: str | None = None
    ) -> ReplyResult:
        try:
            await self.store.finish_message(exchange.reply_id, text, status, "\n".join(notes), model=model)
        except LlamarelayError as exc:  # no controls: Regenerate and Continue act on the stored reply
            log.error("could not store a reply: %s", exc)
            return ReplyResult(status, text, [*notes, NOT_STORED])
        return ReplyResult(
            status,
            text,
            notes,
            reply_id=exchange.reply_id,
            stored=True,
            can_continue=bool(text.strip()) and redo.can_continue_status(status, notes),
        )

    # -- tools ---------------------------------------------------------------------------------------------

    def use_tools(self, toolbox: Toolbox) -> None:
        """Offer the tools of ``toolbox`` where its grants allow."""
        self.tools = toolbox

    async def tool_details(self, key: SessionKey | str, reply_id: int, max_chars: int) -> str:
        """The arguments and results of reply ``reply_id``'s tool calls, for a user who expands them (at most
        ``max_chars``); a line saying there are none when the reply is not in ``key`` or called no tools."""
        try:
            calls = await self.store.tool_calls(reply_id, key=str(key))
        except LlamarelayError as exc:
            return failed(exc)
        return details_text(calls, max_chars) or NO_TOOL_CALLS

    async def tool_calls(self, key: SessionKey | str, reply_id: int) -> list[StoredToolCall]:
        """Reply ``reply_id``'s tool calls, when it is a reply of ``key`` (none otherwise)."""
        return await self.store.tool_calls(reply_id, key=str(key))

    async def with_tool_calls(self, reply_ids: Iterable[int]) -> set[int]:
        """Which of these replies called tools."""
        return await self.store.with_tool_calls(reply_ids)

    async def _called_tools(self, reply_id: int) -> bool:
        """Whether reply ``reply_id`` called tools (its buttons then offer their details)."""
        if self.tools is None:
            return False
        try:
            return bool(await self.store.tool_calls(reply_id))
        except LlamarelayError:
            return False

    def offered_tools(
        self, key: SessionKey | str, user_id: str, *, roles: frozenset[str] = frozenset(), can_ask: bool = False
    ) -> list[ToolSpec]:
        """The tools the model is offered in conversation ``key`` answering ``user_id`` (with ``roles``), as the
        access policy grants them; none without a grant. ``can_ask``: the reply can show Run / Deny, so
        ``confirm = true`` tools are offered too."""
        if self.tools is None:
            return []
        return self.tools.offered(key, Actor(user_id, roles=roles), can_ask=can_ask)

    # -- where a reply's message is, for a survivor's rewrite -------------------------------------------------

    async def _own(self, request: Request, exchange: Exchange) -> None:
        """``request`` now writes ``exchange``'s reply row: note it there if its message is posted already."""
        request.exchange = exchange
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
        while self._clock() < deadline and any(request.state in BEFORE_STORED for request in pending):
            await asyncio.sleep(0.01)
        if newest:  # a message sent while the reset ran is the new conversation's first: it stays
            await self.store.clear_messages(str(key), through_id=newest[0].id)

    def status(self, key: SessionKey | str | None = None, model: Model | None = None) -> ConversationStatus:
        """The engine's figures and, for ``key``, where that conversation's oldest unanswered message is; with
        ``model`` (not the default), that model's figures while it is loaded, and its name."""
        line = [r for r in self._lines.get(str(key), []) if r.state is not State.DONE] if key else []
        first = line[0] if line else None
        backend: InferenceEngine = self.engine  # either kind: the request's generation is that backend's own
        chosen = None if model is None or model.is_default else model
        if chosen is not None and chosen.engine is not None:
            backend = chosen.engine  # the figures of the engine its replies run on
        engine = backend.status(first.generation if first is not None else None)
        return ConversationStatus(
            engine,
            first.state if first else None,
            max(0, len(line) - 1),
            model=None if chosen is None else model_line(chosen.name, chosen.engine is not None),
        )

    async def conversation_status(self, key: SessionKey | str) -> ConversationStatus:
        """`status` of conversation ``key`` with the model that answers it (what /status shows)."""
        try:
            model: Model | None = await self.model(key)
        except LlamarelayError:  # a choice no longer configured: its replies say so; the figures are the default's
            model = None
        return self.status(key, model)

    # -- settings (inherited: `bot.conversations.settings`) and the store's answers ------------------------

    async def system_prompt(self, key: SessionKey | str) -> str:
        return await self.sessions.system_prompt(key)

    async def set_system_prompt(self, key: SessionKey, prompt: str | None) -> None:
        await self.sessions.set_system_prompt(key, prompt)

    async def sampling(self, key: SessionKey | str) -> SamplingSettings:
        return await self.sessions.sampling(key)

    async def model(self, key: SessionKey | str) -> Model:
        """The model that answers conversation ``key``: its own choice, else its channel's, else the default.
        A choice whose model is no longer configured raises `ModelUnavailable` naming it."""
        name = await self.sessions.model(key)
        return self.models.default if name is None else self.models.get(name)

    async def model_name(self, key: SessionKey | str) -> str:
        """The name of the model conversation ``key`` uses, as chosen (even one no longer configured)."""
        return await self.sessions.model(key) or self.models.default.name

    async def set_model(self, key: SessionKey, name: str) -> Model:
        """Make model ``name`` (any case) answer conversation ``key`` from its next message on; the model.
        An unknown name raises `LlamarelayError` with the line that names it and the choices."""
        model = self.models.find(name)
        if model is None:
            raise LlamarelayError(unknown_model(name, self.models.names()))
        await self.sessions.set_model(key, model.name)
        return model

    def model_choices(self) -> list[Model]:
        """Every configured model, the default first (for /model's list and autocomplete)."""
        return [self.models.get(name) for name in self.models.names()]

    async def set_sampling(self, key: SessionKey, **overrides: Any) -> None:
        await self.sessions.set_sampling(key, **overrides)

    async def history(self, key: SessionKey) -> list[StoredMessage]:
        return await self.store.messages(str(key))

    async def image_names(self, message_ids: list[int]) -> dict[int, list[str]]:
        """The names of the images stored with those user messages, by message id (for a history's view)."""
        return {
            message_id: [image.name for image in images]
            for message_id, images in (await self.store.images(message_ids)).items()
        }

    async def latest_reply(self, key: SessionKey) -> StoredMessage | None:
        """The conversation's newest reply: the one Regenerate and Continue may act on."""
        newest = await self.store.messages(str(key), limit=1)
        return newest[0] if newest and newest[0].role == "assistant" else None

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
        return [
            SessionKey.parse(key)
            for key, line in self._lines.items()
            if any(request.state is not State.DONE for request in line)
        ]

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

    async def check_store(self) -> None:
        """Raise StoreError unless the database can take a message now: readiness is a write, not a read."""
        await self.store.probe()

    # -- leases and shutdown ---------------------------------------------------------------------------

    def start(self) -> None:
        """Keep leases from now on (`bot.conversations.leases`): a process that dies leaves no reply
        "generating" for ever; another one takes it over."""
        self._leases.start()

    async def shutdown(self, timeout: float = 8.0) -> None:
        """Refuse new messages, end every request whatever its state, and wait (at most ``timeout`` s) until
        each reply is stored and shown; after that, deliveries still going are cancelled. Then the models loaded
        on use are closed."""
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
                if request.state in BEFORE_STORED and request.reply_id is not None:
                    # Still in the engine (a long decode step): stored as far as it got, never left "generating".
                    try:
                        await self.store.finish_message(
                            request.reply_id, request.text, Status.INTERRUPTED, SHUTTING_DOWN
                        )
                    except LlamarelayError as exc:
                        log.error("could not store a reply at shutdown: %s", exc)
        await self._leases.stop()
        await self.models.aclose()  # the models /model loaded; the default engine is its opener's to close

    async def wait_idle(self) -> None:
        """Wait until no message is being answered."""
        await self._idle.wait()
