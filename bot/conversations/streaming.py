"""Consuming the engine's stream: a reply's text as it grows, its statuses, metrics and checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable

from bot.config import ConversationSettings, SamplingSettings
from bot.conversations.requests import Exchange, Request, State
from bot.engine.base import Figures, FinishReason, InferenceEngine, QueuePosition, Retrying, renders_template
from bot.errors import LlamarelayError
from bot.metrics import Metrics, TokenTimer
from bot.prompt import Prompt
from bot.reasoning import OPEN as REASONING_OPEN
from bot.reasoning import ReasoningSplitter
from bot.store import Status, Store
from bot.text import quoted
from bot.types import Phase, ReplyStatus, log_name
from bot.wording import EMPTY_REPLY, LENGTH_NOTE, PLATFORM_REFUSED, STOPPED_NOTE

__all__ = ["CHECKPOINT_SECONDS", "Streaming", "outcome"]

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 3.0  # a streaming reply's text is saved this often, so a crash keeps what was shown


class Streaming:
    """Runs prompts on the engine and streams each reply into its request, its delivery and the store."""

    def __init__(
        self,
        engine: InferenceEngine,
        store: Store,
        metrics: Metrics,
        settings: ConversationSettings,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._engine = engine
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._settings = settings  # its show_reasoning: "quoted" shows the reasoning above the answer
        self._opens_reasoning: tuple[object, bool] = (None, False)  # (chat template, its prompt opens <think>)

    async def run(
        self, request: Request, exchange: Exchange, prompt: Prompt, sampling: SamplingSettings, notes: list[str]
    ) -> tuple[str, list[str]]:
        """Run ``prompt`` and stream the model's reply into ``request.text``: (status, ``notes`` + its own)."""
        generation = request.generation = self._engine.submit(prompt, sampling, session=request.key)
        request.state = State.QUEUED
        quote_reasoning = self._settings.show_reasoning == "quoted"
        reasoning = ReasoningSplitter(inside=not exchange.prefix and self._prompt_opens_reasoning())
        timer = TokenTimer(self._metrics, self._clock)
        saved_at = self._clock()
        async for event in generation:
            if request.delivery.failed:  # nobody can see this reply: free the engine for others
                generation.cancel()
            if isinstance(event, QueuePosition):
                request.state = State.QUEUED if event.position else State.GENERATING
                request.delivery.status(
                    ReplyStatus(Phase.QUEUED, event.position) if event.position else ReplyStatus(Phase.THINKING)
                )
            elif isinstance(event, Retrying):
                request.delivery.status(ReplyStatus(Phase.RETRYING))
            else:
                timer.text_arrived()
                reasoning.feed(event)
                self._show(request, exchange, reasoning, quote_reasoning)
                if self._clock() - saved_at >= CHECKPOINT_SECONDS:
                    saved_at = self._clock()
                    await self._checkpoint(request, exchange)
        self._metrics.tokens_generated.inc(generation.n_generated)
        self._metrics.prompt_tokens.inc(len(prompt.tokens))
        self._metrics.prompt_tokens_reused.inc(generation.n_prompt_reused)
        log.debug(
            "reply in %s: a prompt of %d tokens (%d of them cached), %d generated",
            log_name(request.key),
            len(prompt.tokens),
            generation.n_prompt_reused,
            generation.n_generated,
        )
        reasoning.finish()
        self._show(request, exchange, reasoning, quote_reasoning, final=True)
        status, footer = outcome(request, generation, reasoning.answer)
        return status, notes + footer

    def _show(
        self,
        request: Request,
        exchange: Exchange,
        reasoning: ReasoningSplitter,
        quote_reasoning: bool,
        *,
        final: bool = False,
    ) -> None:
        """Bring the request and its delivery up to date; a Continue shows only what it adds."""
        request.text = exchange.prefix + reasoning.answer
        if reasoning.thinking and not quote_reasoning and not final:
            request.delivery.status(ReplyStatus(Phase.REASONING))
        else:
            request.delivery.update((quoted(reasoning.reasoning) if quote_reasoning else "") + reasoning.answer)

    async def _checkpoint(self, request: Request, exchange: Exchange) -> None:
        try:
            await self._store.checkpoint(exchange.reply_id, request.text)
        except LlamarelayError as exc:  # the final write will try again
            log.warning("could not checkpoint a reply in %s: %s", log_name(request.key), exc)

    def _prompt_opens_reasoning(self) -> bool:
        """True when the chat template's generation prompt opens a ``<think>`` block itself (DeepSeek-R1)."""
        if not renders_template(self._engine):  # a remote server applies its template and sends reasoning apart
            return False
        template = self._engine.chat_template
        if self._opens_reasoning[0] is not template:
            last, _ = template.render_segments([{"role": "user", "content": "?"}])[-1]
            self._opens_reasoning = (template, last.rstrip().endswith(REASONING_OPEN))
        return self._opens_reasoning[1]


def outcome(request: Request, generation: Figures, text: str) -> tuple[str, list[str]]:
    """How a reply that streamed ``text`` ended: (status, notes)."""
    if request.delivery.failed:
        return Status.INTERRUPTED, [PLATFORM_REFUSED]
    if generation.finish_reason is FinishReason.CANCELLED:
        return Status.STOPPED, [request.ended or STOPPED_NOTE]
    if not text.strip():
        return Status.FAILED, [EMPTY_REPLY]
    if generation.finish_reason is FinishReason.LENGTH:
        return Status.COMPLETE, [LENGTH_NOTE]
    return Status.COMPLETE, []
