"""One request to the embedded engine: the events it yields to the event loop, and its figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bot.config import SamplingSettings
from bot.engine.base import END, Figures, FinishReason, QueuePosition

if TYPE_CHECKING:
    from bot.engine.sampling import Chain
    from bot.engine.vision import PromptImages
    from bot.prompt import Prompt

__all__ = ["Generation", "hand_over"]


class Generation(Figures):
    """One request. ``async for event in generation`` yields `QueuePosition` events and text deltas (str).

    Raises `EngineError` from the iteration if llama.cpp fails. ``cancel()`` may be called at any time.
    """

    def __init__(
        self,
        prompt: list[int],
        sampling: SamplingSettings,
        session: str,
        loop: asyncio.AbstractEventLoop,
        cancel: Callable[[Generation], None],
    ) -> None:
        super().__init__(prompt, sampling)
        self.session = session
        self._request_cancel = cancel
        self._sampler: Chain | None = None  # llama.cpp's samplers, built by the worker when the request starts
        self._loop = loop
        self._announced_position: int | None = None
        self._cancel_requested = False
        self._image_prompt: Prompt | None = None  # a prompt with images, read by the worker when it starts
        self._images: PromptImages | None = None  # its images still to decode (worker side)
        self._unsent = ""  # text decoded since the last hand-over to the event loop (worker side)
        self._spoke = False  # some text was handed over already

    def cancel(self) -> None:
        """Stop this request now; its slot or queue place is freed within one decode step."""
        self._request_cancel(self)

    # -- worker side ---------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        """Text decoded this step: handed to the event loop with the other requests' (`hand_over`), or before
        this request's next event."""
        self._unsent += text

    def _emit(self, event: Any) -> None:
        if self._unsent:  # the text written before the event goes first
            text, self._unsent = self._unsent, ""
            self._post(text)
        self._post(event)

    def _post(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancel_requested = True

    def _announce_position(self) -> None:
        if self._position is not None and self._position != self._announced_position:
            self._announced_position = self._position
            self._emit(QueuePosition(self._position))

    def _end(self, reason: FinishReason, error: BaseException | None = None) -> None:
        """Record how the request ended and tell the iteration (its sampler already freed)."""
        self.finish_reason = reason
        self.t_finished = time.monotonic()
        self._position = None
        self._emit(error if error is not None else END)


def hand_over(generations: list[Generation]) -> None:
    """Hand the requests' unsent text to the event loop in one call (per loop): it wakes once per hand-over, not
    once per token and request, and each request's text since the last hand-over arrives as one piece."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, str]]] = {}
    for generation in generations:
        if generation._unsent:
            by_loop.setdefault(generation._loop, []).append((generation, generation._unsent))
            generation._unsent, generation._spoke = "", True
    for loop, texts in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_texts, texts)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            for generation, _ in texts:
                generation._cancel_requested = True


def _put_texts(texts: list[tuple[Generation, str]]) -> None:
    for generation, text in texts:
        generation._events.put_nowait(text)
