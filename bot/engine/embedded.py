"""The embedded engine: llama.cpp in this process, loaded once, serving every session's requests.

`Engine` composes the parts: `loading` (model and context), `tokenizer`, `sampling` (sampler chains),
`scheduler` (the fair queue and the lock), `kv` (the sequences and their KV cells) and `worker` (the one
thread that decodes). A request is admitted, one session at a time in turn, while fewer than ``parallel``
generate and the KV cache has room: a stream of its own where the memory budget holds a stream per reply
(`KVStreams`), else cells of one pool all share (`KVPool`). Idle conversations' caches are evicted (to RAM,
then disk) least recently used first. A new sequence takes the longest prefix any other holds (the system
prompt), and a conversation that dropped its oldest turns keeps the rest of its cache by shifting it (context
shift). With an ``mmproj``, `vision` (llama.cpp's mtmd) reads a prompt's images into the same sequences, their KV
reused like text. Nothing here ever blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

import llama_cpp

from bot.config import EngineSettings, SamplingSettings
from bot.engine.base import EngineStatus
from bot.engine.generation import Generation
from bot.engine.kv import KVPool, KVStreams
from bot.engine.loading import load, open_state_cache
from bot.engine.sampling import Samplers
from bot.engine.scheduler import Scheduler
from bot.engine.threads import ThreadTuner
from bot.engine.tokenizer import Tokenizer
from bot.engine.vision import PromptImages, Vision
from bot.engine.worker import Worker
from bot.errors import EngineError
from bot.prompt import CHATML_TEMPLATE, ChatTemplate, Prompt

__all__ = ["Engine"]

log = logging.getLogger(__name__)

CLOSE_SAVE_SECONDS = 2.0  # at most this long writing KV states at close (docker stop kills after 10 s)


class Engine:
    """The process-wide llama.cpp engine. Build it once (blocking: loads the model) and share it."""

    renders_template = True  # prompts are rendered here by `chat_template`, into tokens

    def __init__(self, settings: EngineSettings) -> None:
        path = settings.model_path
        loaded = load(settings)
        self.placement = loaded.placement
        """Where the model runs: CPU, or how many of its layers on which GPUs."""
        self._model, self._ctx = loaded.model, loaded.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.settings = settings
        self.n_ctx = settings.n_ctx
        """Context window of one session, in tokens."""
        self.parallel = loaded.parallel
        """Most requests generated together (``[engine] parallel``, or derived from the pool when 0)."""
        self.model_size = llama_cpp.llama_model_size(self._model)
        self.tokenizer = Tokenizer(self._vocab)
        self._bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        metadata = loaded.metadata
        self.model_name = metadata.get("general.name") or path.stem
        self.chat_template = ChatTemplate(
            metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE,
            bos_token=self._special_text(self._bos),
            eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)),
        )
        self.samplers = Samplers(self._vocab)
        try:
            self.vision = self._load_vision(settings, loaded.threads.candidates[0])
        except BaseException:
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            raise
        """The model's multimodal projector (``mmproj``) when it reads images; None when it reads text only."""
        self.projector_size = settings.mmproj.stat().st_size if self.vision is not None and settings.mmproj else 0
        """Bytes of the projector's weights (beside `model_size`), for the model pool's memory budget."""
        layout = KVStreams if loaded.layout == "streams" else KVPool
        self.kv = layout(self._ctx, self._model, settings.n_ctx, open_state_cache(settings, loaded))
        self.kv_cache_bytes = self.kv.pool_tokens * loaded.kv_bytes_per_token
        self.scheduler = Scheduler()
        self.worker = Worker(
            self._ctx,
            settings,
            self.kv,
            self.scheduler,
            self.samplers,
            self.tokenizer,
            loaded.threads,
            loaded.parallel,
            vision=self.vision,
            image_prompt=self._image_prompt,
        )
        self.worker.start()
        log.info(
            "loaded %s (%s, %.0f MB), context %d tokens, KV %s of %d tokens (%.0f MB), up to %d at once, %s threads",
            self.model_name,
            path.name,
            self.model_size / 1e6,
            self.n_ctx,
            f"{len(self.kv.slots)} streams" if self.kv.layout == "streams" else "pool",
            self.pool_tokens,
            self.kv_cache_bytes / 1e6,
            self.parallel,
            settings.n_threads
            if settings.n_threads
            else f"{' or '.join(map(str, self.threads.candidates))} (timed, the fastest kept)",
        )
        why = "" if self.placement.gpu_layers else " ([engine] n_gpu_layers = 0)" if loaded.found else " (no GPU found)"
        log.info("%s runs on %s%s", self.model_name, self.placement, why)

    def _load_vision(self, settings: EngineSettings, n_threads: int) -> Vision | None:
        """The projector of ``mmproj``, on the model's device; a missing or foreign file fails the load (a
        `ModelLoadError` naming it), a model whose images need M-RoPE positions reads text only."""
        if settings.mmproj is None:
            return None
        vision = Vision(settings.mmproj, self._model, use_gpu=bool(self.placement.gpu_layers), n_threads=n_threads)
        if vision.mrope:
            log.warning(
                "%s: its images need M-RoPE positions (Qwen2-VL and kin), which the embedded engine does not "
                "give yet: it reads text only (serve it with llama-server as a url model to send it images)",
                settings.mmproj.name,
            )
            vision.close()
            return None
        log.info("%s reads images through %s", self.model_name, settings.mmproj.name)
        return vision

    @property
    def sees_images(self) -> bool:
        """Whether prompts' images reach the model (an ``mmproj`` it can use was loaded)."""
        return self.vision is not None

    @property
    def pool_tokens(self) -> int:
        """KV cells of the whole cache, every stream or the one pool (llama.cpp rounds up to a multiple of 256)."""
        return self.kv.pool_tokens

    @property
    def threads(self) -> ThreadTuner:
        """Chooses each step's thread count by timing them (``[engine] n_threads`` fixes it; see `threads`)."""
        return self.worker.threads

    @property
    def step_seconds(self) -> deque[float]:
        """How long recent llama_decode steps took (for benchmarks and metrics)."""
        return self.worker.step_seconds

    @property
    def step_cells(self) -> deque[int]:
        """KV cells the pool held during each of those steps: each step's attention walked at least these."""
        return self.worker.step_cells

    # -- tokens ----------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``; with ``special=False`` text like ``<|im_start|>`` or ``<think>`` stays plain."""
        return self.tokenizer.tokenize(text, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt for ``messages`` by the model's chat template; message text never becomes special tokens."""
        tokens = self.chat_template.tokenize(messages, lambda text, special: self.tokenize(text, special=special))
        if self._add_bos and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
        return tokens

    def _image_prompt(self, prompt: Prompt) -> tuple[list[int], PromptImages]:
        """`chat_tokens` of a prompt with images, each image as its stand-in ids (see `bot.engine.vision`), and
        the images to decode; the worker calls it when the request starts (reading images takes a while)."""
        assert self.vision is not None
        tokens, images = self.vision.prompt(
            self.chat_template,
            prompt.messages,
            prompt.images,
            lambda text, special: self.tokenize(text, special=special),
        )
        if self._add_bos and tokens[:1] != [self._bos]:
            tokens.insert(0, self._bos)
            for span in images.spans:
                span.start += 1
        if prompt.prefix:
            tokens += self.tokenize(prompt.prefix)
        return tokens, images

    def is_special(self, token: int) -> bool:
        """True for control and user-defined tokens (chat markers, BOS/EOS, <think>): plain text never gives one."""
        return self.tokenizer.is_special(token)

    def _special_text(self, token: int) -> str:
        return self.tokenizer.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    # -- requests --------------------------------------------------------------------------------------

    def submit(self, prompt: list[int] | Prompt, sampling: SamplingSettings, *, session: str = "") -> Generation:
        """Queue a request; call from the event loop. Raises `QueueFull` at once when the queue is full.

        ``session`` names the conversation, so its next turn can reuse the KV cache of this one; waiting
        requests start one per session in turn, so no session's pile delays another's by more than a round.
        A grammar llama.cpp cannot parse fails the request (`EngineError` from its iteration; at once here
        when the same grammar was refused before): it is compiled on the worker thread, not here. So are a
        `Prompt`'s images, on a model that reads them (see `bot.engine.vision`): the window then counts their
        positions too, and a prompt they push past it fails from the iteration.
        """
        with_images = None
        if isinstance(prompt, Prompt):
            if prompt.images and self.vision is not None:
                with_images = prompt  # its tokens are text only: the worker reads them with the images
            prompt = prompt.tokens
        if not prompt:
            raise EngineError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise EngineError(f"prompt of {len(prompt)} tokens does not fit the {self.n_ctx}-token context")
        self.samplers.refuse(sampling)
        generation = Generation(list(prompt), sampling, session, asyncio.get_running_loop(), self.scheduler.cancel)
        generation._image_prompt = with_images
        with self.scheduler.cond:
            if self.scheduler.closing or not self.worker.is_alive():
                raise EngineError("the engine is not running")
            self.scheduler.enqueue(generation, self.settings.max_queue)
        return generation

    def status(self, generation: Generation | None = None) -> EngineStatus:
        with self.scheduler.cond:
            return EngineStatus(
                model_name=self.model_name,
                queue_length=self.scheduler.n_waiting,
                running=len(self.kv.active()),
                position=generation.position if generation else None,
                tokens_per_second=self.worker.last_rate,
                kv_cells=self.kv.cells_in_use,
                device=self.placement,
            )

    async def readiness(self) -> str:
        """ "ok": the model is loaded before anything listens (for /readyz)."""
        return "ok"

    async def aclose(self) -> None:
        """`close` off the event loop (it waits for a decode step)."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the worker (cancelling what still runs or waits) and free llama.cpp's memory."""
        if not self.scheduler.close():
            return
        self.worker.join()
        self.kv.saved.close()
        deadline = time.monotonic() + CLOSE_SAVE_SECONDS
        self.kv.persist(stop=lambda: time.monotonic() > deadline)
        self.worker.free()
        if self.vision is not None:
            self.vision.close()
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    def check_sampling(self, sampling: SamplingSettings) -> None:
        """Compile ``sampling.grammar`` once, so that at start-up a grammar llama.cpp cannot parse is a
        `ConfigError` naming the key rather than a failure of every reply."""
        self.samplers.check(sampling)
