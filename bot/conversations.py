"""ConversationManager: one session per key, answered in order, stored in SQLite, streamed to any platform."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import unicodedata
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bot.config import SamplingSettings, Settings
from bot.engine import Engine, EngineStatus, FinishReason, Generation, QueuePosition
from bot.errors import LlamarelayError
from bot.prompt import strip_markers
from bot.store import Status, Store, StoredMessage
from bot.streaming import StreamingReply
from bot.types import Incoming, ReplyTarget, SessionKey

__all__ = ["ConversationManager", "ReplyResult", "clean_text", "parse_status_line", "queued_line", "storable"]

log = logging.getLogger(__name__)

THINKING = "💭 Thinking…"
WAITING_FOR_PREVIOUS = "⏳ Waiting for the previous reply in this conversation…"
EMPTY_MESSAGE = "⚠️ Your message is empty. Write something and I'll answer."
SHUTTING_DOWN_REASON = "The bot is shutting down; please send your message again in a moment."
SHUTTING_DOWN = f"⚠️ {SHUTTING_DOWN_REASON}"
STOPPED_NOTE = "⏹️ Stopped."
CUT_SHORT_MARK = "\n[this reply was cut short]"
TRUNCATED_MARK = "\n[… the rest of this message was cut to fit the context window]"

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


@dataclass(frozen=True)
class ReplyResult:
    status: str  # a bot.store.Status value
    text: str
    notes: list[str] = field(default_factory=list)


class ConversationManager:
    """Shared by every adapter: stores messages, builds prompts within the context window, runs the engine."""

    def __init__(self, engine: Engine, store: Store, settings: Settings, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self._clock, self._sleep = clock, sleep
        # One lock per session, dropped when no one holds or waits for it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._running: dict[str, Generation] = {}
        self._in_line: Counter[str] = Counter()  # messages per session that are answered or waiting their turn
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True

    # -- answering -------------------------------------------------------------------------------------

    async def respond(self, incoming: Incoming, target: ReplyTarget) -> ReplyResult:
        """Answer ``incoming`` on ``target``: store it, stream the model's reply, store the reply.

        Shows a status at once (waiting, queued #n, thinking). Engine failures and a full queue end the reply
        with a clear line instead of raising; messages in one session are answered in arrival order.
        """
        reply = StreamingReply(target, clock=self._clock, sleep=self._sleep)
        text = clean_text(incoming.text)
        if not text:
            await reply.finish(EMPTY_MESSAGE)
            return ReplyResult(Status.FAILED, "", [EMPTY_MESSAGE])
        if not self._accepting:
            await reply.finish(SHUTTING_DOWN)
            return ReplyResult(Status.FAILED, "", [SHUTTING_DOWN])
        key = str(incoming.key)
        # Both rows are written before anything is shown, so neither the message nor its reply's place is lost.
        user_id, reply_id = await self.store.add_exchange(key, text, author_id=incoming.author_id,
                                                          author_name=incoming.author_name)
        self._in_flight += 1
        self._idle.clear()
        try:
            lock = self._locks.setdefault(key, asyncio.Lock())
            ahead = self._in_line[key]
            self._in_line[key] += 1
            # Take a place in the session's line before the first platform call: a slow post must not let a
            # later message of the same session overtake this one.
            turn = asyncio.ensure_future(lock.acquire())
            try:
                await reply.status(WAITING_FOR_PREVIOUS if ahead else THINKING)
                await turn
            except BaseException:  # nothing could be shown; the message stays stored, its reply marked so
                if turn.done() and not turn.cancelled():
                    lock.release()
                turn.cancel()
                await asyncio.shield(self.store.finish_message(reply_id, "", Status.INTERRUPTED))
                raise
            try:
                return await self._answer(key, text, user_id, reply_id, reply)
            finally:
                lock.release()
        finally:
            self._in_line[key] -= 1
            if not self._in_line[key]:
                del self._in_line[key]
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _answer(self, key: str, text: str, user_id: int, reply_id: int, reply: StreamingReply) -> ReplyResult:
        notes: list[str] = []
        generation: Generation | None = None
        error: str | None = None
        try:
            if not self._accepting:
                raise LlamarelayError(SHUTTING_DOWN_REASON)
            sampling = await self.sampling(key)
            history = [m for m in await self.store.messages(key) if m.id < user_id]
            system = await self.system_prompt(key)
            prompt, notes = await asyncio.to_thread(self.build_prompt, system, history, text, sampling.max_tokens)
            generation = self.engine.submit(prompt, sampling, session=key)
            self._running[key] = generation
            async for event in generation:
                if isinstance(event, QueuePosition):
                    await reply.status(queued_line(event.position) if event.position else THINKING)
                else:
                    await reply.append(event)
        except LlamarelayError as exc:
            error = str(exc)
        except BaseException:  # cancelled, or the platform failed: free the engine, keep what was written
            if generation is not None:
                generation.cancel()
            await asyncio.shield(self.store.finish_message(reply_id, reply.text, Status.INTERRUPTED))
            raise
        finally:
            if generation is not None and self._running.get(key) is generation:
                del self._running[key]
        reply_text = reply.text
        status, footer = self._outcome(generation, error, reply_text)
        await self.store.finish_message(reply_id, reply_text, status)
        await reply.finish("\n".join([*notes, *footer]))
        return ReplyResult(status, reply_text, notes + footer)

    def _outcome(self, generation: Generation | None, error: str | None, text: str) -> tuple[str, list[str]]:
        if error is not None:
            return Status.FAILED, [f"⚠️ {error}"]
        assert generation is not None
        if generation.finish_reason is FinishReason.CANCELLED:
            return Status.STOPPED, [SHUTTING_DOWN if not self._accepting else STOPPED_NOTE]
        if not text.strip():
            return Status.FAILED, ["⚠️ The model gave an empty reply; try rephrasing."]
        if generation.finish_reason is FinishReason.LENGTH:
            return Status.COMPLETE, ["✂️ (reached the reply length limit)"]
        return Status.COMPLETE, []

    def build_prompt(self, system: str, history: list[StoredMessage], text: str,
                      max_tokens: int) -> tuple[list[int], list[str]]:
        """Prompt tokens that fit ``n_ctx - max_tokens``: system prompt always, then the newest turns that fit."""
        engine, budget = self.engine, self.engine.n_ctx - max_tokens
        turns = [{"role": m.role, "content": m.content if m.status == Status.COMPLETE else m.content + CUT_SHORT_MARK}
                 for m in history if m.content.strip()]

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
        kept = turns[low:]
        while kept and kept[0]["role"] != "user":  # a conversation should not open with the assistant
            kept = kept[1:]
        return render(kept, text), notes

    # -- session commands ------------------------------------------------------------------------------

    def stop(self, key: SessionKey) -> bool:
        """Cancel the generation running in this session; False if none was running."""
        generation = self._running.get(str(key))
        if generation is None:
            return False
        generation.cancel()
        return True

    async def reset(self, key: SessionKey) -> None:
        """Forget the session's history; its system prompt and sampling stay."""
        self.stop(key)
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

    def status(self, key: SessionKey | None = None) -> EngineStatus:
        return self.engine.status(self._running.get(str(key)) if key else None)

    # -- shutdown --------------------------------------------------------------------------------------

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Refuse new messages, stop running generations, and wait until every reply is stored."""
        self._accepting = False
        for generation in list(self._running.values()):
            generation.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d replies were still being delivered at shutdown", self._in_flight)
