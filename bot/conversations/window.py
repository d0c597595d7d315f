"""The context window: the history that fits, the prompt built from it, and the retry when a remote server
finds a prompt too long after all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from bot.config import ConversationSettings, ImageSettings, SamplingSettings
from bot.conversations.requests import Exchange
from bot.engine.base import InferenceEngine, PromptTooLong
from bot.errors import LlamarelayError
from bot.images import BLIND, Vision, estimate_tokens, fit_for, stored_images
from bot.prompt import Prompt
from bot.store import Store, StoredMessage
from bot.types import ImagePart, log_name
from bot.wording import SYSTEM_PROMPT_TOO_LONG, TRUNCATED_MARK, cannot_see_images, image_unseen, message_cut

__all__ = ["HISTORY_PAGE", "PROMPT_ATTEMPTS", "WINDOW_REFILL", "Window"]

log = logging.getLogger(__name__)

PROMPT_ATTEMPTS = 3  # a remote server that finds the prompt too long gets it again with fewer turns
WINDOW_REFILL = 0.6  # when a full window must drop turns, it drops down to this share, so its start holds
HISTORY_PAGE = 64  # messages read per step when looking back for the history that fits

T = TypeVar("T")
Turn = dict[str, str]
Pictures = Mapping[int, Sequence[ImagePart | str]]  # a user message's id -> its images (a str: one pruned)


class Window:
    """Builds each conversation's prompts within the engine's context window, and remembers where a full
    window starts (so the next prompt keeps that start, and the engine its cached prefix)."""

    def __init__(
        self, engine: InferenceEngine, store: Store, settings: ConversationSettings, images: ImageSettings
    ) -> None:
        self._engine = engine
        self._store = store
        self._settings = settings  # its max_message_chars: the longest message the model reads
        self._images = images  # the limits an image scaled again for a model's size is read within
        self._starts: dict[str, int] = {}  # per conversation with a full window: its oldest kept message

    async def fit(
        self,
        key: str,
        exchange: Exchange,
        system: str,
        sampling: SamplingSettings,
        *,
        speakers: bool,
        run: Callable[[Prompt, list[str]], Awaitable[T]],
        wrote: Callable[[], bool],
        vision: Vision = BLIND,
    ) -> T:
        """``run`` the prompt that answers ``exchange`` (with the notes about it, e.g. a message cut short).

        The stored images of its user turns go with them to a model that sees (``vision``); one that does not
        reads a line in place of each, and a note under the reply says it could not see the message's images.

        A remote server may count more tokens than our estimate: when ``run`` raises `PromptTooLong` before it
        ``wrote`` anything, it gets the prompt again with fewer turns, up to `PROMPT_ATTEMPTS` times.
        """
        budget = self._engine.n_ctx - sampling.max_tokens
        history = await self.history(key, exchange.user_id, budget)
        pictures = await stored_images(self._store, [m.id for m in history if m.role == "user"] + [exchange.user_id])
        if vision.sees:
            pictures = {
                message_id: await fit_for(images, vision, self._images) for message_id, images in pictures.items()
            }
        for attempt in range(1, PROMPT_ATTEMPTS + 1):
            prompt, notes = await asyncio.to_thread(
                self.build_prompt,
                system,
                history,
                exchange.text,
                sampling.max_tokens,
                speaker=exchange.author_name if speakers else "",
                prefix=exchange.prefix,
                budget=budget,
                keep_from=self._starts.get(key),
                pictures=pictures,
                user_id=exchange.user_id,
                vision=vision,
            )
            if prompt.turns_from is None:
                self._starts.pop(key, None)
            else:
                self._starts[key] = prompt.turns_from
            try:
                return await run(prompt, notes)
            except PromptTooLong as exc:
                if attempt == PROMPT_ATTEMPTS or wrote():
                    raise
                budget = len(prompt.tokens) // 2
                if exc.n_ctx is not None:  # it said how large its window is
                    budget = min(budget, exc.n_ctx - sampling.max_tokens)
                log.info("the model server found a prompt in %s too long; trying %d tokens", log_name(key), budget)
        raise AssertionError("unreachable")

    async def history(self, key: str, before_id: int, budget: int) -> list[StoredMessage]:
        """The newest messages before ``before_id`` whose text could fit ``budget`` tokens; older ones are not read."""
        history: list[StoredMessage] = []
        tokens = 0
        while tokens < budget:
            page = await self._store.messages(
                key, before_id=history[0].id if history else before_id, limit=HISTORY_PAGE
            )
            if not page:
                break
            history[:0] = page
            tokens += await asyncio.to_thread(
                lambda page: sum(len(self._engine.tokenize(m.content)) for m in page), page
            )
        return history

    def build_prompt(
        self,
        system: str,
        history: list[StoredMessage],
        text: str,
        max_tokens: int,
        *,
        speaker: str = "",
        prefix: str = "",
        budget: int | None = None,
        keep_from: int | None = None,
        pictures: Pictures | None = None,
        user_id: int | None = None,
        vision: Vision = BLIND,
    ) -> tuple[Prompt, list[str]]:
        """A prompt that fits ``budget`` (default ``n_ctx - max_tokens``) tokens: the system prompt always,
        then the newest turns that fit.

        Every turn is the stored text as it was written: a reply cut short is fed back as far as it got. In a
        shared conversation (``speaker``: who wrote ``text``) each user turn starts with its author's name, so
        the model can tell people apart; names are message text, never template. ``prefix`` (Continue) is a
        reply so far, which the model goes on from. When turns must be left out, they go in large steps, and
        ``keep_from`` (the oldest message the last prompt kept) is kept again while it fits. ``pictures``: the
        images of user messages by id (``user_id``: the message being answered), sent along when ``vision``
        sees, else named in the text.
        """
        budget = self._engine.n_ctx - max_tokens if budget is None else budget
        pictures = pictures or {}
        turns = [{"role": m.role, "content": _said(m, speaker)} for m in history]  # templates keep roles alternating
        mine = pictures.get(user_id, []) if user_id is not None else []
        images = [pictures.get(m.id, []) for m in history]
        if not vision.sees:
            turns = [{**turn, "content": _unseen(turn["content"], seen)} for turn, seen in zip(turns, images)]
            images = [[] for _ in history]
        render = _Renderer(
            self._engine,
            system,
            f"{speaker}: " if speaker else "",
            prefix,
            costs=[_cost(seen) for seen in images],
            own_cost=_cost(mine) if vision.sees else 0,
        )
        text, notes = self._message_that_fits(render, text, budget)
        if mine and not vision.sees:
            text = _unseen(text, mine)
            notes.append(cannot_see_images(list(vision.seeing)))
        drop = render.turns_to_drop(turns, text, budget)
        if drop:
            # A full window drops turns in large steps: the prompt keeps its start (and the engine its cached
            # prefix) for many turns, rather than changing it, and re-reading everything, on every message.
            kept_before = next((i for i, m in enumerate(history) if keep_from is not None and m.id >= keep_from), -1)
            drop = (
                kept_before
                if kept_before >= drop
                else render.turns_to_drop(turns, text, int(budget * WINDOW_REFILL), drop)
            )
        start = history[drop].id if drop < len(history) else None
        messages = render.conversation(turns[drop:], text)
        sent = {1 + index: seen for index, seen in enumerate(images[drop:]) if seen}  # after the system prompt
        if mine and vision.sees:
            sent[len(messages) - 1] = mine
        return Prompt(
            messages, render(turns[drop:], text), prefix, turns_from=start if drop else None, images=sent
        ), notes

    def _message_that_fits(self, render: _Renderer, text: str, budget: int) -> tuple[str, list[str]]:
        """The user's message, cut (with a mark) to its head when it alone overflows the window; the notes."""
        original_length = len(text)
        text = text[: self._settings.max_message_chars]
        if render.length([], text) > budget:
            overhead = render.length([], "") + len(self._engine.tokenize(TRUNCATED_MARK))
            if overhead >= budget:
                raise LlamarelayError(SYSTEM_PROMPT_TOO_LONG)
            content, keep = self._engine.tokenize(text), budget - overhead
            while keep > 0:  # token counts shift a little where the pieces meet
                text = self._engine.detokenize(content[:keep])
                if render.length([], text + TRUNCATED_MARK) <= budget:
                    break
                keep -= 8
        if len(text) == original_length:
            return text, []
        return text + TRUNCATED_MARK, [message_cut(len(text), original_length)]


def _unseen(text: str, images: Sequence[ImagePart | str]) -> str:
    """A turn as a model without vision reads it: its text, then a line in place of each image."""
    lines = [image if isinstance(image, str) else image_unseen(image.name) for image in images]
    return "\n".join([text, *lines]) if text else "\n".join(lines)


def _cost(images: Sequence[ImagePart | str]) -> int:
    return sum(estimate_tokens(image) for image in images if isinstance(image, ImagePart))


def _said(message: StoredMessage, speaker: str) -> str:
    """A stored turn as the model reads it: in a shared conversation, a user's words after their name."""
    if speaker and message.role == "user" and message.author_name:
        return f"{message.author_name}: {message.content}"
    return message.content


class _Renderer:
    """Token ids of the conversation with some of its turns kept: the system prompt, turns, the user's message
    (after ``head``, its speaker), and ``prefix`` (a reply the model goes on from)."""

    def __init__(
        self,
        engine: InferenceEngine,
        system: str,
        head: str,
        prefix: str,
        *,
        costs: list[int] | None = None,
        own_cost: int = 0,
    ) -> None:
        self._engine = engine
        self._system = system
        self._head = head
        self._tail = engine.tokenize(prefix) if prefix else []
        self._costs = costs or []  # per turn: the tokens its images take beside its text
        self._own_cost = own_cost  # the images of the message being answered

    def conversation(self, kept: list[Turn], user_text: str) -> list[Turn]:
        return [{"role": "system", "content": self._system}, *kept, {"role": "user", "content": self._head + user_text}]

    def __call__(self, kept: list[Turn], user_text: str) -> list[int]:
        return self._engine.chat_tokens(self.conversation(kept, user_text)) + self._tail

    def length(self, kept: list[Turn], user_text: str) -> int:
        """Tokens of the conversation with ``kept`` (the newest turns), its images included."""
        images = sum(self._costs[len(self._costs) - len(kept) :]) if kept else 0
        return len(self(kept, user_text)) + images + self._own_cost

    def turns_to_drop(self, turns: list[Turn], text: str, limit: int, low: int = 0) -> int:
        """How many of the oldest turns to drop to fit ``limit`` (the length is monotone in what is kept)."""
        high = len(turns)
        while low < high:
            middle = (low + high) // 2
            if self.length(turns[middle:], text) <= limit:
                high = middle
            else:
                low = middle + 1
        return low
