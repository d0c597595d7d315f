"""The worker thread: the one thread that touches the llama.cpp context, decoding every running request.

Each step puts into one batch the next token of every generating sequence plus prompt tokens for newly admitted
ones, as many as a step-time budget allows (continuous batching), decodes, and samples with per-request sampler
chains that run in C (plain greedy sampling: the arg-max of the logits). A prompt's image is decoded on its own
right after the step that read the text before it (its embeddings, not tokens, at that sequence's next
positions). Results travel to the asyncio side through ``loop.call_soon_threadsafe``, the text of all requests
in one call every few steps (`generation.hand_over`).

Over 400 lines: one step's whole policy (admission and bursts, the prompt budget beside streams, sampling, the
hand-over, images between text) reads in one place, on the state only this thread touches.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import llama_cpp

from bot.config import EngineSettings
from bot.engine.base import FinishReason
from bot.engine.generation import Generation, hand_over
from bot.engine.kv import KVCache, Slot
from bot.engine.sampling import Samplers
from bot.engine.scheduler import Scheduler
from bot.engine.threads import ThreadTuner
from bot.engine.tokenizer import Tokenizer
from bot.errors import EngineError

if TYPE_CHECKING:
    from bot.engine.vision import PromptImages, Vision
    from bot.prompt import Prompt

__all__ = ["Worker"]

log = logging.getLogger(__name__)

LONG_PROMPT_TOKENS = 128  # a prompt this long waits for idle caches to leave the pool before it is read
BARE_STEP_EVERY = 32  # while prompts are read, every this many steps one is left without, to time it anew
IDLE_SAVE_SECONDS = 30.0  # with nothing to do that long, the worker writes the KV states to disk
TILE_ROWS = 64  # rows of one sequence from which llama.cpp's CPU flash attention takes its tiled path
LONG_STEP_SECONDS = 2.0  # beside streams, a long prompt's chunk is sized to a step this long (two edits' pace)
LONG_REST = 0.5  # after such a step, the streams and short prompts step alone for this share of its time
HAND_OVER_SECONDS = 0.02  # decoded text goes to the event loop at most this often (a request's first at once)
BURST_GAP_SECONDS = 0.005  # an idle engine's first request waits this long for others of the same burst...
BURST_MAX_SECONDS = 0.03  # ... as long as they keep coming, at most this long: they start in one step


def _resized(size: float, ratio: float, least: float, most: float, grow: float = 2.0) -> float:
    """``size`` times ``ratio``, by at most ``grow`` up and half down at once, kept within ``least``-``most``."""
    return min(float(most), max(float(least), size * min(grow, max(0.5, ratio))))


class Worker:
    """Runs the decode loop on its own thread: admits waiting requests, steps, samples, ends requests."""

    def __init__(
        self,
        ctx: Any,
        settings: EngineSettings,
        kv: KVCache,
        scheduler: Scheduler,
        samplers: Samplers,
        tokenizer: Tokenizer,
        threads: ThreadTuner,
        parallel: int,
        *,
        vision: Vision | None = None,
        image_prompt: Callable[[Prompt], tuple[list[int], PromptImages]] | None = None,
    ) -> None:
        self._ctx = ctx
        self.vision, self._image_prompt = vision, image_prompt
        self._with_images: list[Generation] = []  # running requests with images still to decode
        self.settings = settings
        self.n_ctx = settings.n_ctx
        self.parallel = parallel
        self.kv, self.scheduler, self.samplers, self.tokenizer = kv, scheduler, samplers, tokenizer
        self.threads = threads
        self._n_threads = threads.candidates[0]  # as the context was created
        # llama.cpp aborts on a batch above its own n_batch, which can be below ours: it caps n_batch at the
        # context it was given, then rounds each sequence's context up to a multiple of 256.
        self._n_batch = llama_cpp.llama_n_batch(ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self.step_seconds: deque[float] = deque(maxlen=10_000)
        """How long recent llama_decode steps took (for benchmarks and metrics)."""
        self.step_cells: deque[int] = deque(maxlen=10_000)
        """KV cells the pool held during each of those steps: each step's attention walked at least these."""
        self._chunk = 4.0 * settings.prefill_chunk  # prompt tokens per step beside generating streams, adapted
        self._long_chunk = 4.0 * (TILE_ROWS + 1)  # long prompts' tokens in their steps beside streams, adapted
        self._long_due = 0.0  # when long prompts beside streams may read again (monotonic clock)
        self._long_tokens = 0  # long prompts' tokens in this step
        self._gen_step: float | None = None  # seconds a step without prompt tokens takes, smoothed
        self._since_bare = 0  # steps since the last one without prompt tokens
        self.last_rate: float | None = None  # generation speed of the last finished reply
        self._handed_at = 0.0  # when decoded text last went to the event loop
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def free(self) -> None:
        """Free the batch (after `join`)."""
        llama_cpp.llama_batch_free(self._batch)

    def _run(self) -> None:
        kv, scheduler, cond = self.kv, self.scheduler, self.scheduler.cond
        save_when_idle = kv.saved.disk is not None
        while True:
            with cond:
                while not scheduler.closing and not scheduler.has_waiting and not kv.active():
                    if not cond.wait(IDLE_SAVE_SECONDS if save_when_idle else None):
                        break  # idle that long: save the conversations' KV states to disk
                if scheduler.closing:
                    break
                if scheduler.has_waiting and not kv.active():
                    self._gather_burst()
                idle = not scheduler.has_waiting and not kv.active()
                admitted = scheduler.take_admitted(len(kv.active()), self.parallel, kv.room, kv.final_size)
            if idle:  # outside the lock; a request that comes meanwhile stops the save between two files
                kv.persist(stop=lambda: scheduler.has_waiting or scheduler.closing)
                save_when_idle = False  # until there was work again
                continue
            save_when_idle = kv.saved.disk is not None
            try:
                # Outside the lock: KV copies can take a while, and submit/status/cancel must never wait on them.
                self._admit(admitted)
                if kv.trim_due and any(len(slot.pending or ()) >= LONG_PROMPT_TOKENS for slot in kv.active()):
                    kv.trim_idle()  # reading a long prompt beside the idle cells would cost more than the copies
                self._step()
                if kv.trim_due:  # after the step: a short request's first token does not wait for the copies
                    kv.trim_idle()
            except Exception as exc:  # llama.cpp failed: fail what was running, keep serving the rest
                log.exception("decode step failed")
                with cond:
                    for slot in kv.active():
                        self._finish(slot, FinishReason.ERROR, EngineError(f"the model failed: {exc}"))
                        kv.forget(slot)
                    for generation in admitted:
                        if generation.finish_reason is None:
                            self._end(generation, FinishReason.ERROR, EngineError(f"the model failed: {exc}"))
        with cond:
            for slot in kv.active():
                self._finish(slot, FinishReason.CANCELLED)
            scheduler.drain()

    def _gather_burst(self) -> None:
        """Wait (holding the lock, which the wait gives up) while more requests arrive a few ms apart, as a burst
        does (eight HTTP requests sent at once reach the queue over 10-20 ms here): read together in one step, the
        first tokens of all come sooner than when the first starts alone and the rest are read beside it."""
        scheduler = self.scheduler
        until = time.monotonic() + BURST_MAX_SECONDS
        while scheduler.n_waiting < self.parallel and not scheduler.closing and time.monotonic() < until:
            waiting = scheduler.n_waiting
            scheduler.cond.wait(BURST_GAP_SECONDS)
            if scheduler.n_waiting <= waiting:
                return  # nobody came within the gap: the burst is over (or was one request)

    def _admit(self, admitted: list[Generation]) -> None:
        for generation in admitted:
            try:  # here, not at submit: compiling a grammar takes a while, and the event loop must not wait
                generation._sampler = self.samplers.build(generation.sampling)
                if generation._image_prompt is not None:  # so does reading images
                    self._read_images(generation)
            except EngineError as exc:  # not valid GBNF: the caller learns why from the iteration
                with self.scheduler.cond:
                    self._end(generation, FinishReason.ERROR, exc)
                continue
            self._start(self.kv.pick_slot(generation), generation)
        if admitted:
            self.kv.settle()

    def _read_images(self, generation: Generation) -> None:
        """Replace the request's text-only prompt by the one with its images (their stand-in ids, see
        `bot.engine.vision`); `EngineError` when it does not fit the context or cannot be read."""
        assert self._image_prompt is not None and self.vision is not None and generation._image_prompt is not None
        prompt, images = self._image_prompt(generation._image_prompt)
        generation._image_prompt = None
        last = images.spans[-1] if images.spans else None
        problem = None
        if len(prompt) >= self.n_ctx:
            problem = f"prompt of {len(prompt)} tokens with its images does not fit the {self.n_ctx}-token context"
        elif last is not None and last.start + last.n_tokens >= len(prompt):
            problem = "a prompt cannot end with an image (no text after it to give the first token)"
        if problem is not None or last is None:
            self.vision.free(images)
        if problem is not None:
            raise EngineError(problem)
        generation.prompt = prompt
        generation._images = images if last is not None else None

    def _start(self, slot: Slot, generation: Generation) -> None:
        """Start the request with as much of its prompt already in the pool as can be had; only the rest is read."""
        self.kv.place(slot, generation)
        if generation._images is not None:
            self._skip_cached_images(slot, generation._images)
            if generation._images.spans:
                self._with_images.append(generation)
            else:
                generation._images = None
        slot.pending = generation.prompt[len(slot.cached) :]
        slot.next_token = None
        slot.long_read_at = time.monotonic()
        slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        generation.n_prompt_reused = len(slot.cached)
        generation._announce_position()

    def _skip_cached_images(self, slot: Slot, images: PromptImages) -> None:
        """Drop the images whose KV the sequence already holds; a cache that ends inside an image is cut back to
        its start (an image is decoded whole)."""
        assert self.vision is not None
        cached = len(slot.cached)
        while images.spans and images.spans[0].start < cached:
            span = images.spans[0]
            if span.start + span.n_tokens > cached:
                self.kv.truncate(slot, span.start)
                break
            images.spans.pop(0)
        if not images.spans:
            self.vision.free(images)

    def _step(self) -> None:
        """One llama_decode over every active sequence: a token each for the generating ones, then prompt tokens,
        shortest remaining prompt first (so a short prompt never waits behind a long one) yet a share for each
        (so a long one always advances), as many as keep the step within the latency budget."""
        kv = self.kv
        slots = []
        for slot in kv.active():
            if slot.generation is not None and slot.generation._cancel_requested:
                with self.scheduler.cond:
                    self._finish(slot, FinishReason.CANCELLED)
            else:
                slots.append(slot)
        generating = [slot for slot in slots if slot.next_token is not None]
        prompting = sorted((slot for slot in slots if slot.pending), key=lambda s: len(s.pending or ()))
        capacity = self._n_batch - len(generating)
        waiting_tokens = sum(len(slot.pending or ()) for slot in prompting)
        # Alone, a prompt is read at full batch speed; beside streams or other prompts, in timed chunks.
        timed = bool(generating) or len(prompting) > 1
        budget = min(capacity, self._prefill_tokens()) if timed else capacity
        if prompting and not generating:
            # Shortest first in equal shares, the shortest prompt is read once every prompt got as many tokens as it
            # has, however finely that is cut into steps: so no finer (steps only add time), and prompts up to
            # twice its length (or twice the least chunk) finish in the same step: a burst is read in one.
            shortest = max(self.settings.prefill_chunk, len(prompting[0].pending or ()))
            wanted = sum(min(len(slot.pending or ()), 2 * shortest) for slot in prompting)
            budget = min(capacity, max(budget, wanted))
        if generating and (self._gen_step is None or self._since_bare >= BARE_STEP_EVERY):
            budget = 0  # a step of generating tokens only, to time it as the machine is now
        limited = timed and 0 < budget < waiting_tokens  # more prompt than this step takes: a measure of it
        chunks = self._plan_chunks(prompting, min(budget, waiting_tokens), capacity, bool(generating))
        n_prompt = sum(chunks.values())
        if not kv.make_room(len(generating) + n_prompt):
            room = max(0, kv.free_cells - len(generating))
            chunks = self._plan_chunks(prompting, room, room, False)
            n_prompt = sum(chunks.values())
            while generating and kv.free_cells < len(generating):
                longest = max(generating, key=lambda s: len(s.cells))  # cannot happen with admission by room
                generating.remove(longest)
                with self.scheduler.cond:
                    self._finish(longest, FinishReason.LENGTH)
        batch, n = self._batch, 0
        # In sequence order: with a KV stream per sequence, llama.cpp splits a batch into a ubatch per run of
        # consecutive sequence ids (see `KVStreams.trim_idle`), taken in the order the batch names them.
        for slot in sorted(slots, key=lambda s: s.seq_id):
            slot.logits_index = -1
            if slot in generating:
                assert slot.next_token is not None
                n = self._add(batch, n, slot.next_token, len(slot.cached), slot.seq_id, True)
                kv.append(slot, slot.next_token)
                slot.logits_index = n - 1
            elif size := chunks.get(slot.seq_id):
                assert slot.pending is not None
                chunk = slot.pending[:size]
                del slot.pending[:size]
                for i, token in enumerate(chunk):
                    n = self._add(batch, n, token, len(slot.cached), slot.seq_id, not slot.pending and i == size - 1)
                    kv.append(slot, token)
                if not slot.pending:
                    slot.logits_index = n - 1
        if n:
            if n_prompt:  # a step with prompt tokens can take a while: the text so far goes out before it
                self._hand_over(slots, now=True)
            reach = max((len(slot.cached) for slot in slots if chunks.get(slot.seq_id)), default=0)
            self._decode(batch, n, slots, n_prompt, limited, bool(generating), reach)
            self._hand_over(slots)
        if self._with_images:  # after the sampling: an image's decode overwrites the step's logits
            self._decode_images(slots)

    def _plan_chunks(self, prompting: list[Slot], budget: int, room: int, beside_streams: bool) -> dict[int, int]:
        """How many prompt tokens each sequence reads this step, by sequence id (``room``: at most in all).

        Max-min fair: shortest first, each taking at most an equal share of what is left of ``budget``, so short
        prompts finish at once while a long one still advances every step (never starved by a stream of short ones).
        Beside streams, a prompt longer than `TILE_ROWS` whose fair share is under it (a slow machine or a deep
        conversation) reads apart from that budget: in steps of about `LONG_STEP_SECONDS`, each followed by half
        as long of the streams' and short prompts' own steps. So it reads two thirds of the time, in whole tiles of
        llama.cpp's CPU flash attention (fewer than 64 rows of one sequence are up to 1.6x slower a token), and a
        stream's text waits at most about two of the platforms' once-a-second edits. Long prompts take turns, the
        one read longest ago first; their last 64 tokens go in shares. Figures: README, "Continuous batching".
        """
        self._long_tokens = 0
        if budget <= 0:
            return {}
        fair = budget // len(prompting)
        long = [
            slot
            for slot in prompting
            if beside_streams and fair <= TILE_ROWS < len(slot.pending or ()) and self._up_to_image(slot) is None
        ]
        chunks: dict[int, int] = {}
        others = [slot for slot in prompting if slot not in long]
        for place, slot in enumerate(others):
            if budget <= 0:
                break
            share = min(max(1, budget // (len(others) - place)), len(slot.pending or ()))
            if (image_at := self._up_to_image(slot)) is not None:
                share = min(share, image_at)
            chunks[slot.seq_id] = share
            budget -= chunks[slot.seq_id]
        room -= sum(chunks.values())
        if long and time.monotonic() >= self._long_due and room > TILE_ROWS:
            # Whole tiles (and a row beside the streams): rows past the last full 64 take the untiled path (at
            # 3,700 cells beside 7 streams, chunks of 101 tokens read at 94 tokens/s, of 153 at 113).
            share = max(1, int(self._long_chunk) // len(long) // TILE_ROWS) * TILE_ROWS + 1
            for slot in sorted(long, key=lambda s: s.long_read_at):
                if room <= TILE_ROWS:
                    break
                chunks[slot.seq_id] = min(share, room, len(slot.pending or ()))
                room -= chunks[slot.seq_id]
                self._long_tokens += chunks[slot.seq_id]
                slot.long_read_at = time.monotonic()
        return chunks

    def _up_to_image(self, slot: Slot) -> int | None:
        """Prompt tokens before the slot's next image (an image is decoded on its own), None without one."""
        generation = slot.generation
        if not self._with_images or generation is None or generation._images is None:
            return None
        return generation._images.spans[0].start - len(slot.cached)

    def _decode(
        self, batch: Any, n: int, slots: list[Slot], n_prompt: int, limited: bool, generating: bool, reach: int
    ) -> None:
        """Decode the step's batch of ``n`` tokens, time it, and sample the sequences it gave logits for."""
        batch.n_tokens = n
        threads = self.threads.choose(n, reach)
        if threads != self._n_threads:
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
            self._n_threads = threads
        started = time.perf_counter()
        result = llama_cpp.llama_decode(self._ctx, batch)
        if result != 0:
            raise EngineError(f"llama_decode returned {result}")
        seconds = time.perf_counter() - started
        usual = threads == self.threads.best(n, reach)  # not a try of another count
        self.threads.record(n, threads, seconds, reach)
        self.step_seconds.append(seconds)
        self.step_cells.append(self.kv.cells_in_use)
        if generating or limited:
            self._measure(seconds, n_prompt, limited, usual)
        for slot in slots:
            if slot.logits_index >= 0:
                self._sample(slot)

    def _hand_over(self, slots: list[Slot], now: bool = False) -> None:
        """Send the text decoded so far to the event loop: every `HAND_OVER_SECONDS` (a few tokens at once; 50
        updates a second read as smoothly as 110, and the event loop, which shares the cores with llama.cpp's
        threads, wakes less), at once for a request's first words or when ``now``."""
        writing = [slot.generation for slot in slots if slot.generation is not None and slot.generation._unsent]
        clock = time.monotonic()
        if writing and (now or clock - self._handed_at >= HAND_OVER_SECONDS or not all(g._spoke for g in writing)):
            hand_over(writing)
            self._handed_at = clock

    def _decode_images(self, slots: list[Slot]) -> None:
        """Decode the image each prompting sequence has reached (the text before it read), one per sequence."""
        assert self.vision is not None
        kv = self.kv
        for slot in slots:
            generation = slot.generation
            images = generation._images if generation is not None else None
            if generation is None or images is None or not slot.pending or images.spans[0].start != len(slot.cached):
                continue
            span = images.spans.pop(0)
            try:
                if not kv.make_room(span.n_tokens):
                    raise EngineError("the KV cache has no room for the image")
                self.vision.decode(self._ctx, span, slot.seq_id, len(slot.cached), self._n_batch)
            except EngineError as exc:
                log.warning("decoding an image failed: %s", exc)
                kv.forget(slot)  # nothing half-written is reused
                with self.scheduler.cond:
                    self._finish(slot, FinishReason.ERROR, exc)
                continue
            for token in slot.pending[: span.n_tokens]:
                kv.append(slot, token)
            del slot.pending[: span.n_tokens]
            if not images.spans:
                self.vision.free(images)
                generation._images = None
                self._with_images.remove(generation)

    def _prefill_tokens(self) -> int:
        """Prompt tokens a step may add to the generating streams' tokens (see `_measure`)."""
        return max(self.settings.prefill_chunk, int(self._chunk))

    def _measure(self, seconds: float, n_prompt: int, limited: bool, usual: bool) -> None:
        """Size the next steps' prompt chunk by this step's time: a step with prompt tokens should take
        ``step_budget_ms``, or twice a step without them when that alone takes longer (a slow model or a busy
        machine), so streams keep flowing while prompts are read as fast as that allows. A long prompt's step
        beside streams (see `_plan_chunks`) sizes its own chunk to `LONG_STEP_SECONDS` (from steps at the
        ``usual`` thread count, not a try of another) and sets when the next may come."""
        if self._long_tokens:
            self._long_due = time.monotonic() + LONG_REST * seconds
            if usual:  # up by at most 1.5x: the next long prompt may read deeper
                ratio = LONG_STEP_SECONDS / max(seconds, 1e-6)
                self._long_chunk = _resized(self._long_chunk, ratio, TILE_ROWS + 1, self._n_batch, grow=1.5)
        self._since_bare = self._since_bare + 1 if n_prompt else 0
        if not n_prompt:
            self._gen_step = seconds if self._gen_step is None else 0.8 * self._gen_step + 0.2 * seconds
            return
        if not limited:  # the prompts ran out before the chunk did: the step says nothing about its size
            return
        # What a step of the usual chunk would have taken (a step with a long prompt's chunk reads more).
        gen = self._gen_step or 0.0
        seconds = gen + (seconds - gen) * self._prefill_tokens() / n_prompt
        target = max(self.settings.step_budget_ms / 1000, 2 * gen)
        self._chunk = _resized(self._chunk, target / max(seconds, 1e-6), self.settings.prefill_chunk, self._n_batch)

    @staticmethod
    def _add(batch: Any, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _sample(self, slot: Slot) -> None:
        generation = slot.generation
        assert generation is not None
        token = self.samplers.sample(generation._sampler, self._ctx, slot.logits_index, generation.sampling.ignore_eos)
        if generation.t_first_token is None:
            generation.t_first_token = time.monotonic()
        if token in self.samplers.ends:
            with self.scheduler.cond:
                self._finish(slot, FinishReason.STOP)
            return
        generation.n_generated += 1
        text = slot.decoder.decode(self.tokenizer.piece(token))
        if text:
            generation._write(text)
        if generation.n_generated >= generation.sampling.max_tokens or len(slot.cached) + 1 >= self.n_ctx:
            with self.scheduler.cond:
                self._finish(slot, FinishReason.LENGTH)
        else:
            slot.next_token = token

    def _finish(self, slot: Slot, reason: FinishReason, error: BaseException | None = None) -> None:
        """End the slot's request (caller holds the lock); the slot keeps its KV cache for the next turn."""
        generation = slot.generation
        assert generation is not None
        # Bytes still held by the decoder are a character the model did not finish: dropped, never shown as "�".
        slot.generation, slot.pending, slot.next_token = None, None, None
        slot.last_used = time.monotonic()
        self.kv.trim_due = True
        self._end(generation, reason, error)
        if generation.tokens_per_second:
            self.last_rate = generation.tokens_per_second

    def _end(self, generation: Generation, reason: FinishReason, error: BaseException | None = None) -> None:
        self.samplers.free(generation._sampler)
        generation._sampler = None
        if generation._images is not None:
            assert self.vision is not None
            self.vision.free(generation._images)
            generation._images = None
            if generation in self._with_images:  # not yet when its start failed
                self._with_images.remove(generation)
        generation._end(reason, error)
