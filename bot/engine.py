"""The one llama.cpp engine: loads the model once, queues every session's requests, decodes off the event loop.

One worker thread owns the llama.cpp context. Each step it puts into one batch the next token of every
generating sequence plus prompt tokens for newly admitted ones, as many as a step-time budget allows
(continuous batching), decodes, and samples with per-request sampler chains that run in C. Every sequence
draws its KV cells from one unified pool: a request is admitted, one session at a time in turn, while fewer
than ``parallel`` generate and the pool has room, idle conversations' caches being evicted (to RAM) least
recently used first, and, while others run, kept to a small share of the pool (idle cells slow every step).
A new sequence shares the longest prefix any other holds (the system prompt), and a
conversation that dropped its oldest turns keeps the rest of its cache by shifting it (context shift).
Results travel to the asyncio side through ``loop.call_soon_threadsafe``; nothing here ever blocks the event loop.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import enum
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from bot.config import EngineSettings, SamplingSettings
from bot.cpu import ThreadTuner, physical_cores, thread_candidates
from bot.errors import ConfigError, EngineError, ModelLoadError, QueueFull
from bot.gpu import Placement, gpus, model_params, placement
from bot.kvstates import StateCache, StateFiles, model_identity, unwritable
from bot.prompt import CHATML_TEMPLATE, ChatTemplate, Prompt

__all__ = ["Engine", "EngineStatus", "Figures", "FinishReason", "Generation", "QueuePosition", "Tokenizer"]

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over, as llama.cpp's default
_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a new random seed
# Tokens plain text must never become: chat markers, BOS/EOS, and added tokens such as Qwen's <think>.
_SPECIAL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
_LONGEST_MATCHED_TEXT = 128  # longer token texts are left to the fallback in Tokenizer._plain_run
KV_POOL_WINDOWS = 4  # the automatic KV pool holds this many full context windows
AUTO_PARALLEL_MAX = 16  # the automatic [engine] parallel: this many, if the pool and the batch allow
IDLE_SEQUENCES = 32  # llama.cpp sequences at least: idle ones keep their conversation's KV (and shared prefixes)
LLAMA_MAX_SEQ = 256  # llama.cpp's own limit on sequence ids
SHIFT_MIN_TOKENS = 32  # a context shift must keep at least this many tokens to be worth it
COPY_MIN_TOKENS = 8  # shorter shared prefixes are read again rather than copied
IDLE_WINDOW_SHARE = 4  # while requests run, idle caches keep n_ctx / this many KV cells in the pool (shared prefixes)
LONG_PROMPT_TOKENS = 128  # a prompt this long waits for idle caches to leave the pool before it is read
BARE_STEP_EVERY = 32  # while prompts are read, every this many steps one is left without, to time it anew
IDLE_SAVE_SECONDS = 30.0  # with nothing to do that long, the worker writes the KV states to disk
CLOSE_SAVE_SECONDS = 2.0  # at most this long writing KV states at close (docker stop kills after 10 s)


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
        lines = [("Model", self.model_name), ("Queue", f"{self.queue_length} waiting, {self.running} generating"),
                 ("This conversation", place), ("Speed", f"{speed} (last reply)")]
        return lines + [("Device", str(self.device))] if self.device is not None else lines


_END = object()


class Figures:
    """What a request reports however it runs, in this process or on a model server."""

    def __init__(self, prompt: list[int], sampling: SamplingSettings) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.finish_reason: FinishReason | None = None
        self.n_generated = 0
        self.n_prompt_reused = 0  # prompt tokens whose KV cache was already there
        self.t_first_token: float | None = None
        self.t_finished: float | None = None
        self._position: int | None = None

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


class Generation(Figures):
    """One request. ``async for event in generation`` yields `QueuePosition` events and text deltas (str).

    Raises `EngineError` from the iteration if llama.cpp fails. ``cancel()`` may be called at any time.
    """

    def __init__(self, engine: Engine, prompt: list[int], sampling: SamplingSettings, session: str,
                 sampler: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(prompt, sampling)
        self.session = session
        self._engine = engine
        self._sampler = sampler
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._announced_position: int | None = None
        self._cancel_requested = False

    def cancel(self) -> None:
        """Stop this request now; its slot or queue place is freed within one decode step."""
        self._engine._cancel(self)

    async def __aiter__(self) -> AsyncIterator[QueuePosition | str]:
        while True:
            event = await self._events.get()
            if event is _END:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    # -- worker side ---------------------------------------------------------------------------------

    def _emit(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancel_requested = True

    def _announce_position(self) -> None:
        if self._position is not None and self._position != self._announced_position:
            self._announced_position = self._position
            self._emit(QueuePosition(self._position))


@dataclass
class _Slot:
    """One llama.cpp sequence in the shared KV pool. Between requests it keeps its KV cache for the session's
    next turn, and as a prefix new sequences may copy, until the pool needs the room."""

    seq_id: int
    cached: list[int]  # tokens whose KV is in this sequence now, at positions 0, 1, ...
    cells: list[int] = field(default_factory=list)  # a name for each of those KV cells: copies share names
    generation: Generation | None = None
    pending: list[int] | None = None  # prompt tokens still to decode
    next_token: int | None = None  # sampled, not decoded yet
    logits_index: int = -1  # batch index of this slot's logits in the current step
    decoder: Any = None
    last_used: float = 0.0
    session: str = ""


def _queue_key(generation: Generation) -> str:
    """The waiting line a request joins: its session's, or one of its own when it names none."""
    return f"s:{generation.session}" if generation.session else f"r:{id(generation)}"


def _kv_bytes_per_token(model: Any) -> int:
    """Bytes of f16 K and V one token takes in every layer."""
    head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    return llama_cpp.llama_model_n_layer(model) * 2 * head_dim * llama_cpp.llama_model_n_head_kv(model) * 2


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


_log_callback: Any = None
# llama.cpp's warning when the context (here: the KV pool every sequence shares) exceeds the training context.
_POOL_BEYOND_TRAINING = "possible training context overflow"
_held_logs: list[tuple[int, str]] | None = None  # llama.cpp log lines kept back while stderr is captured
_llama_log = logging.getLogger("llama_cpp")


def _route_llama_logs() -> None:
    """Send llama.cpp's own log lines to Python logging (debug level) instead of raw stderr."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: Any) -> None:
        # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
        message = text.decode("utf-8", "replace").rstrip()
        if _POOL_BEYOND_TRAINING in message:  # it measures the shared pool; the Engine checks each window itself
            level = 1
        line = ({3: logging.WARNING, 4: logging.ERROR}.get(level, logging.DEBUG), message)
        if _held_logs is not None:  # logging would write into the capture of _init_grammar
            _held_logs.append(line)
        else:
            _llama_log.log(line[0], "%s", line[1])

    _log_callback = callback  # keep a reference: llama.cpp holds only a C pointer to it
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _init_grammar(vocab: Any, grammar: str) -> tuple[Any, str]:
    """llama.cpp's grammar sampler for ``grammar``, or (None, why not).

    llama.cpp's GBNF parser prints its errors straight to stderr, past the log callback: they are captured
    here (fd 2 goes to a file meanwhile) and logged like every other llama.cpp line.
    """
    global _held_logs
    sys.stderr.flush()
    _held_logs = held = []
    saved = os.dup(2)
    try:
        # A file, not a pipe: a long grammar echoed back would fill a pipe and block the writer for ever.
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
            finally:
                os.dup2(saved, 2)
            capture.seek(0)
            printed = capture.read().decode("utf-8", "replace").strip()
    finally:
        os.close(saved)
        _held_logs = None
    if printed:  # "parse: error parsing grammar: <why>", a blank line, then the whole grammar again
        _llama_log.error("%s", printed.splitlines()[0])
        _llama_log.debug("%s", printed)
    for level, line in held:
        _llama_log.log(level, "%s", line)
    if sampler:
        return sampler, ""
    reasons = [line for level, line in held if level >= logging.ERROR and line != "failed to parse grammar"]
    if printed:  # the parser's "expecting ')' at <the rest of the grammar>": nothing left means the end
        why = printed.splitlines()[0].removeprefix("parse: error parsing grammar: ").strip()
        reasons.insert(0, re.sub(r" at$", " at the end", why))
    return None, (reasons[0] if reasons else "llama.cpp refused it")[:200]


class Tokenizer:
    """llama.cpp's tokenizer for one vocabulary, made safe for text people wrote.

    llama.cpp matches USER_DEFINED tokens (``<think>`` or ``<tool_call>`` in Qwen vocabularies) even with
    special parsing off, so a user could type the model's own markers. Here each such text is cut out and
    spelt with ordinary one-character (or one-byte) tokens: plain text never yields a CONTROL or
    USER_DEFINED token, while template text (``special=True``) still does.
    """

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        attributes = [llama_cpp.llama_vocab_get_attr(vocab, t) for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]
        self.special_ids = frozenset(t for t, attr in enumerate(attributes) if attr & _SPECIAL_ATTRS)
        """Ids of CONTROL and USER_DEFINED tokens."""
        matched = {self._text(t) for t, attr in enumerate(attributes)
                   if attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED}
        self._matched = _literal_pattern(t for t in matched if 0 < len(t) <= _LONGEST_MATCHED_TEXT)
        # Built at load (off the event loop) when the vocabulary has USER_DEFINED tokens, else on first need.
        self._spellings = self._ordinary_short_pieces() if self._matched else None

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``; with ``special=False`` no special token comes out, whatever the text says."""
        tokens = self._tokenize(text, special)
        if special or self.special_ids.isdisjoint(tokens):
            return tokens
        plain: list[int] = []
        position = 0
        for match in self._matched.finditer(text) if self._matched else ():
            plain += self._plain_run(text[position:match.start()])
            plain += self._spell(match.group())
            position = match.end()
        return plain + self._plain_run(text[position:])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "ignore")

    def is_special(self, token: int) -> bool:
        return token in self.special_ids

    def piece(self, token: int, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:n]

    def _tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8", "replace")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, special)
        if n < 0:
            raise EngineError(f"cannot tokenize a text of {len(data)} bytes")
        return list(buffer[:n])

    def _text(self, token: int) -> str:
        """The token's text as llama.cpp matches it in input (not its display piece)."""
        return (llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def _plain_run(self, text: str) -> list[int]:
        """Tokens of text holding no USER_DEFINED token's text; spelt out should a merge still reach a special id."""
        tokens = self._tokenize(text, False) if text else []
        return tokens if self.special_ids.isdisjoint(tokens) else self._spell(text)

    def _spell(self, text: str) -> list[int]:
        """``text`` as ordinary tokens of one character each, or of one byte where no such token exists."""
        if self._spellings is None:
            self._spellings = self._ordinary_short_pieces()
        tokens: list[int] = []
        for char in text:
            data = char.encode("utf-8", "replace")
            if data in self._spellings:
                tokens.append(self._spellings[data])
            elif all(bytes([b]) in self._spellings for b in data):
                tokens += [self._spellings[bytes([b])] for b in data]
            else:  # a vocabulary without byte tokens: its own reading of this one character, minus specials
                tokens += [t for t in self._tokenize(char, False) if t not in self.special_ids]
        return tokens

    def _ordinary_short_pieces(self) -> dict[bytes, int]:
        """Ordinary tokens whose piece is one byte or one whole character, by that piece."""
        spellings: dict[bytes, int] = {}
        ordinary = llama_cpp.LLAMA_TOKEN_ATTR_NORMAL | llama_cpp.LLAMA_TOKEN_ATTR_BYTE
        for token in range(llama_cpp.llama_vocab_n_tokens(self._vocab)):
            if token in self.special_ids or not llama_cpp.llama_vocab_get_attr(self._vocab, token) & ordinary:
                continue
            piece = self.piece(token)
            if len(piece) == 1 or _one_character(piece):
                spellings.setdefault(piece, token)
        return spellings


def _one_character(data: bytes) -> bool:
    try:
        return len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def _literal_pattern(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of ``texts``, the longest at each place; built as a trie, so thousands of texts
    (Gemma's vocabulary has that many) cost hardly more per character than a few."""
    end = ""
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[end] = {}

    def build(node: dict[str, Any]) -> str:
        branches = []
        for char, child in sorted(node.items()):
            if char == end:
                continue
            literal = re.escape(char)
            while len(child) == 1 and end not in child:  # a chain without branches is one literal
                [(char, child)] = child.items()
                literal += re.escape(char)
            branches.append(literal + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end in node else body

    return re.compile(build(trie)) if trie else None


class Engine:
    """The process-wide llama.cpp engine. Build it once (blocking: loads the model) and share it."""

    def __init__(self, settings: EngineSettings) -> None:
        path = settings.model_path
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path} (run `llamarelay fetch-model` to download the "
                                 "default model, or set [engine] model_path in config.toml)")
        _route_llama_logs()
        llama_cpp.llama_backend_init()
        found = gpus()
        offload = bool(found) and settings.n_gpu_layers != 0
        model = llama_cpp.llama_model_load_from_file(
            str(path).encode(), model_params(settings.n_gpu_layers, settings.main_gpu, found))
        if not model and offload:
            raise ModelLoadError(f"cannot load model {path}: not a valid GGUF file, or too big for the GPU's memory "
                                 "(lower [engine] n_gpu_layers: the other layers stay on the CPU)")
        if not model:
            raise ModelLoadError(f"cannot load model {path}: not a valid GGUF file (run `llamarelay fetch-model` "
                                 "for the default model, or point [engine] model_path at another GGUF)")
        self.placement = placement(settings.n_gpu_layers, llama_cpp.llama_model_n_layer(model), found,
                                   settings.main_gpu)
        """Where the model runs: CPU, or how many of its layers on which GPUs."""
        trained = llama_cpp.llama_model_n_ctx_train(model)
        if settings.n_ctx > trained > 0:
            log.warning("[engine] n_ctx (%d) is beyond the %d tokens %s was trained on: replies in long "
                        "conversations may turn to nonsense; set n_ctx to %d or less", settings.n_ctx, trained,
                        path.name, trained)
        per_token = _kv_bytes_per_token(model)
        pool = settings.kv_pool_mb * 2**20 // per_token if settings.kv_pool_mb else KV_POOL_WINDOWS * settings.n_ctx
        pool = max(pool, settings.n_ctx)  # one conversation may always fill its whole window
        parallel = settings.parallel or min(AUTO_PARALLEL_MAX, settings.n_batch, max(1, pool // 512))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = pool
        params.kv_unified = True  # one pool of KV cells for every sequence: no per-slot share to tune
        params.n_batch = params.n_ubatch = settings.n_batch
        # llama.cpp reserves one output per sequence and aborts when that exceeds the batch.
        params.n_seq_max = min(LLAMA_MAX_SEQ, settings.n_batch, pool, max(2 * parallel, IDLE_SEQUENCES))
        self.threads = ThreadTuner([settings.n_threads] if settings.n_threads
                                   else thread_candidates(physical_cores()))
        """Chooses each step's thread count by timing them (``[engine] n_threads`` fixes it; see `bot.cpu`)."""
        self._n_threads = params.n_threads = params.n_threads_batch = self.threads.candidates[0]
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"cannot create a llama.cpp context for {path} with a KV pool of {pool} tokens"
                                 + (" (on the GPU: lower [engine] kv_pool_mb or n_gpu_layers)" if offload else ""))
        self._model, self._ctx = model, ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.settings = settings
        self.n_ctx = settings.n_ctx
        """Context window of one session, in tokens."""
        self.parallel = parallel
        """Most requests generated together (``[engine] parallel``, or derived from the pool when 0)."""
        self.pool_tokens = llama_cpp.llama_n_ctx(ctx)
        """KV cells shared by every sequence (llama.cpp rounds the pool up to a multiple of 256)."""
        self.model_size = llama_cpp.llama_model_size(model)
        self.kv_cache_bytes = self.pool_tokens * per_token
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._eog_tokens = [t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        self.tokenizer = Tokenizer(self._vocab)
        self._bos = llama_cpp.llama_vocab_bos(self._vocab)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        metadata = self._metadata()
        self.model_name = metadata.get("general.name") or path.stem
        self.chat_template = ChatTemplate(metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE,
                                          bos_token=self._special_text(self._bos),
                                          eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)))
        # llama.cpp aborts on a batch above its own n_batch, which can be below ours: it caps n_batch at the
        # context it was given, then rounds each sequence's context up to a multiple of 256.
        self._n_batch = llama_cpp.llama_n_batch(ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i, cached=[]) for i in range(llama_cpp.llama_n_seq_max(ctx))]
        self._refs: dict[int, int] = {}  # KV cell name -> sequences holding it; len() = cells in use
        self._next_cell = 0
        # A recurrent state is one whole: neither a prefix of it can be shared nor its positions shifted.
        self._can_copy = not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self._can_shift = self._can_copy and bool(llama_cpp.llama_memory_can_shift(self._memory))
        self.step_seconds: deque[float] = deque(maxlen=10_000)
        """How long recent llama_decode steps took (for benchmarks and metrics)."""
        self.step_cells: deque[int] = deque(maxlen=10_000)
        """KV cells the pool held during each of those steps: each step's attention walked at least these."""
        self._chunk = 4.0 * settings.prefill_chunk  # prompt tokens per step beside generating streams, adapted
        self._gen_step: float | None = None  # seconds a step without prompt tokens takes, smoothed
        self._since_bare = 0  # steps since the last one without prompt tokens
        disk: StateFiles | None = None
        if settings.state_dir is not None and settings.state_disk_mb:
            if (why := unwritable(settings.state_dir)) is None:
                disk = StateFiles(settings.state_dir, settings.state_disk_mb * 1024 * 1024,
                                  # what shapes a sequence's saved state: its context, llama.cpp's KV streams, types
                                  model_identity(path, metadata, settings.n_ctx,
                                                 1 if params.kv_unified else params.n_seq_max,
                                                 params.type_k, params.type_v, params.flash_attn_type))
            else:  # the bot still works, only without the disk: a warning, not a refusal to start
                log.warning("[engine] state_dir = '%s' is not writable (%s): running without the disk cache of KV "
                            "states, so none outlive a restart", settings.state_dir, why)
        self._saved = StateCache(settings.state_cache_mb * 1024 * 1024, disk)
        self._trim_due = False  # a request ended: its cache may be more than the pool should keep idle
        self._queues: OrderedDict[str, deque[Generation]] = OrderedDict()  # by session, served in turn
        self._n_waiting = 0
        self._cond = threading.Condition()
        self._closing = False
        self._last_rate: float | None = None
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()
        log.info("loaded %s (%s, %.0f MB), context %d tokens, KV pool %d tokens (%.0f MB), up to %d at once, "
                 "%s threads", self.model_name, path.name, self.model_size / 1e6, self.n_ctx, self.pool_tokens,
                 self.kv_cache_bytes / 1e6, parallel,
                 settings.n_threads if settings.n_threads else
                 f"{' or '.join(map(str, self.threads.candidates))} (timed, the fastest kept)")
        why = "" if self.placement.gpu_layers else " ([engine] n_gpu_layers = 0)" if found else " (no GPU found)"
        log.info("%s runs on %s%s", self.model_name, self.placement, why)

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

    def is_special(self, token: int) -> bool:
        """True for control and user-defined tokens (chat markers, BOS/EOS, <think>): plain text never gives one."""
        return self.tokenizer.is_special(token)

    def _piece(self, token: int, special: bool = False) -> bytes:
        return self.tokenizer.piece(token, special)

    def _special_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def _metadata(self) -> dict[str, str]:
        metadata: dict[str, str] = {}
        buffer = ctypes.create_string_buffer(1 << 16)
        for i in range(llama_cpp.llama_model_meta_count(self._model)):
            llama_cpp.llama_model_meta_key_by_index(self._model, i, buffer, len(buffer))
            key = buffer.value.decode("utf-8", "replace")
            n = llama_cpp.llama_model_meta_val_str_by_index(self._model, i, buffer, len(buffer))
            if n >= len(buffer):  # a value longer than the buffer (a big chat template): read it whole
                buffer = ctypes.create_string_buffer(n + 1)
                llama_cpp.llama_model_meta_val_str_by_index(self._model, i, buffer, len(buffer))
            metadata[key] = buffer.value.decode("utf-8", "replace")
        return metadata

    # -- requests --------------------------------------------------------------------------------------

    def submit(self, prompt: list[int] | Prompt, sampling: SamplingSettings, *, session: str = "") -> Generation:
        """Queue a request; call from the event loop. Raises `QueueFull` at once when the queue is full.

        ``session`` names the conversation, so its next turn can reuse the KV cache of this one; waiting
        requests start one per session in turn, so no session's pile delays another's by more than a round.
        """
        if isinstance(prompt, Prompt):
            prompt = prompt.tokens
        if not prompt:
            raise EngineError("empty prompt")
        if len(prompt) >= self.n_ctx:
            raise EngineError(f"prompt of {len(prompt)} tokens does not fit the {self.n_ctx}-token context")
        loop = asyncio.get_running_loop()
        sampler = self._make_sampler(sampling)
        with self._cond:
            if self._closing or not self._thread.is_alive():
                llama_cpp.llama_sampler_free(sampler)
                raise EngineError("the engine is not running")
            if self._n_waiting >= self.settings.max_queue:
                llama_cpp.llama_sampler_free(sampler)
                raise QueueFull(f"Too many requests are waiting ({self._n_waiting}); please try again shortly.")
            generation = Generation(self, list(prompt), sampling, session, sampler, loop)
            self._queues.setdefault(_queue_key(generation), deque()).append(generation)
            self._n_waiting += 1
            for place, waiting in enumerate(self._waiting_in_order(), start=1):
                waiting._position = place  # announced by the worker, which wakes up now
            self._cond.notify()
        return generation

    def status(self, generation: Generation | None = None) -> EngineStatus:
        with self._cond:
            return EngineStatus(
                model_name=self.model_name, queue_length=self._n_waiting,
                running=sum(slot.generation is not None for slot in self._slots),
                position=generation.position if generation else None, tokens_per_second=self._last_rate,
                kv_cells=len(self._refs), device=self.placement)

    async def readiness(self) -> str:
        """"ok": the model is loaded before anything listens (for /readyz)."""
        return "ok"

    async def aclose(self) -> None:
        """`close` off the event loop (it waits for a decode step)."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the worker (cancelling what still runs or waits) and free llama.cpp's memory."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._saved.close()
        deadline = time.monotonic() + CLOSE_SAVE_SECONDS
        self._saved.persist(self._ctx, self._slots, stop=lambda: time.monotonic() > deadline)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    def check_sampling(self, sampling: SamplingSettings) -> None:
        """Compile ``sampling.grammar`` once, so that at start-up a grammar llama.cpp cannot parse is a
        `ConfigError` naming the key rather than a failure of every reply."""
        if sampling.grammar:
            grammar, why = _init_grammar(self._vocab, sampling.grammar)
            if not grammar:
                raise ConfigError(f"sampling.grammar is not valid GBNF: {why}")
            llama_cpp.llama_sampler_free(grammar)

    def _cancel(self, generation: Generation) -> None:
        with self._cond:
            generation._cancel_requested = True
            queue = self._queues.get(_queue_key(generation))
            if queue is not None and generation in queue:
                queue.remove(generation)
                if not queue:
                    del self._queues[_queue_key(generation)]
                self._n_waiting -= 1
                self._end(generation, FinishReason.CANCELLED)
                self._renumber_waiting()
            self._cond.notify()

    def _make_sampler(self, sampling: SamplingSettings) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        samplers = []
        if sampling.grammar:
            grammar, why = _init_grammar(self._vocab, sampling.grammar)
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise EngineError(f"the sampling grammar is not valid GBNF: {why}")
            samplers.append(grammar)
        if sampling.ignore_eos:  # as llama-server does: the end-of-generation tokens can never be sampled
            biases = (llama_cpp.llama_logit_bias * len(self._eog_tokens))(
                *[llama_cpp.llama_logit_bias(token, float("-inf")) for token in self._eog_tokens])
            samplers.append(llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(biases), biases))
        if (sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty) != (1.0, 0.0, 0.0):
            samplers.append(llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, PENALTY_LAST_N, sampling.repeat_penalty, sampling.frequency_penalty,
                sampling.presence_penalty))
        if sampling.temperature <= 0.0:
            samplers.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if sampling.top_k > 0:
                samplers.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            samplers.append(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            samplers.append(llama_cpp.llama_sampler_init_temp(sampling.temperature))
            samplers.append(llama_cpp.llama_sampler_init_dist(sampling.seed if sampling.seed >= 0 else _DEFAULT_SEED))
        for sampler in samplers:
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    # -- worker thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        save_when_idle = self._saved.disk is not None
        while True:
            with self._cond:
                while not self._closing and not self._queues and not self._active():
                    if not self._cond.wait(IDLE_SAVE_SECONDS if save_when_idle else None):
                        break  # idle that long: save the conversations' KV states to disk
                if self._closing:
                    break
                idle = not self._queues and not self._active()
                admitted = self._take_admitted()
            if idle:  # outside the lock; a request that comes meanwhile stops the save between two files
                self._saved.persist(self._ctx, self._slots, stop=lambda: bool(self._queues) or self._closing)
                save_when_idle = False  # until there was work again
                continue
            save_when_idle = self._saved.disk is not None
            try:
                # Outside the lock: KV copies can take a while, and submit/status/cancel must never wait on them.
                self._admit(admitted)
                if self._trim_due and any(len(slot.pending or ()) >= LONG_PROMPT_TOKENS for slot in self._active()):
                    self._trim_idle()  # reading a long prompt beside the idle cells would cost more than the copies
                self._step()
                if self._trim_due:  # after the step: a short request's first token does not wait for the copies
                    self._trim_idle()
            except Exception as exc:  # llama.cpp failed: fail what was running, keep serving the rest
                log.exception("decode step failed")
                with self._cond:
                    for slot in self._active():
                        self._finish(slot, FinishReason.ERROR, EngineError(f"the model failed: {exc}"))
                        self._forget(slot)
                    for generation in admitted:
                        if generation.finish_reason is None:
                            self._end(generation, FinishReason.ERROR, EngineError(f"the model failed: {exc}"))
        with self._cond:
            for slot in self._active():
                self._finish(slot, FinishReason.CANCELLED)
            for generation in self._waiting_in_order():
                self._end(generation, FinishReason.CANCELLED)
            self._queues.clear()
            self._n_waiting = 0

    def _active(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.generation is not None]

    def _waiting_in_order(self) -> list[Generation]:
        """The waiting requests in the order they will start: the first of each session's line in turn, then
        the second of each, and so on."""
        lines = [list(queue) for queue in self._queues.values()]
        return [line[r] for r in range(max(map(len, lines), default=0)) for line in lines if r < len(line)]

    def _renumber_waiting(self) -> None:
        for place, generation in enumerate(self._waiting_in_order(), start=1):
            generation._position = place
            generation._announce_position()

    def _take_admitted(self) -> list[Generation]:
        """Take waiting requests, one session at a time in turn, while fewer than ``parallel`` generate and the
        KV pool has room for all that each may grow to (caller holds the lock)."""
        active = self._active()
        admitted: list[Generation] = []
        room: int | None = None
        while self._queues and len(active) + len(admitted) < self.parallel:
            key, queue = next(iter(self._queues.items()))
            generation = queue[0]
            need = self._final_size(generation)
            if room is None:
                room = self.pool_tokens - self._committed(active)
            if need > room and (active or admitted):
                break  # the lines behind wait too, so a long prompt is not passed over for ever
            room -= need
            queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # this session's next request waits for the others' turn
            else:
                del self._queues[key]
            self._n_waiting -= 1
            generation._position = 0
            admitted.append(generation)
        self._renumber_waiting()
        return admitted

    def _final_size(self, generation: Generation) -> int:
        """KV cells the request's sequence may hold at its end."""
        return min(self.n_ctx, len(generation.prompt) + generation.sampling.max_tokens)

    def _committed(self, active: list[_Slot]) -> int:
        """KV cells that running requests hold or may still grow into (idle sequences' cells can be evicted)."""
        pinned = len(set().union(*(slot.cells for slot in active)))
        return pinned + sum(max(0, self._final_size(slot.generation) - len(slot.cached))
                            for slot in active if slot.generation is not None)

    def _admit(self, admitted: list[Generation]) -> None:
        for generation in admitted:
            self._start(self._pick_slot(generation), generation)

    def _pick_slot(self, generation: Generation) -> _Slot:
        """The session's own idle sequence, else an empty one, else the least recently used idle one."""
        idle = [slot for slot in self._slots if slot.generation is None]
        own = [slot for slot in idle if generation.session and slot.session == generation.session]
        if own:
            return own[0]
        slot = min(idle, key=lambda s: (bool(s.cells), s.last_used))
        self._evict(slot)
        return slot

    def _start(self, slot: _Slot, generation: Generation) -> None:
        """Start the request with as much of its prompt already in the pool as can be had: the sequence's own
        cache (shifted past dropped turns where the model allows), the session's saved state, or a prefix
        another sequence holds (copied, sharing its cells); only the rest is read."""
        prompt = generation.prompt
        slot.generation = generation  # from here the sequence is busy: never evicted, never a copy's source
        own_reuse = self._reusable(slot, prompt)
        saved = self._saved.pop(generation.session) if generation.session and slot.session != generation.session \
            else None
        saved_reuse = self._reusable(_Slot(seq_id=-1, cached=saved[0]), prompt) if saved else 0
        donors = [s for s in self._slots if s is not slot and s.cells] if self._can_copy else []
        donor = max(donors, key=lambda s: _common_prefix(s.cached, prompt), default=None)
        copy_reuse = _common_prefix(donor.cached, prompt) if donor else 0
        limit = len(prompt) - 1  # decode at least one token, for fresh logits
        if saved and saved_reuse > max(own_reuse, copy_reuse):
            self._restore(slot, *saved)
        elif donor and copy_reuse > own_reuse and copy_reuse >= COPY_MIN_TOKENS:
            self._copy(donor, slot, min(copy_reuse, limit))
        own = _common_prefix(slot.cached, prompt)
        if shift := self._shift_plan(slot, prompt, own):  # the session's own cache, restored or not
            self._shift(slot, own, *shift)
        keep = min(_common_prefix(slot.cached, prompt), limit)
        self._truncate(slot, keep)
        slot.session = generation.session
        slot.pending = prompt[len(slot.cached):]
        slot.next_token = None
        slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        generation.n_prompt_reused = len(slot.cached)
        generation._announce_position()

    def _reusable(self, slot: _Slot, prompt: list[int]) -> int:
        """Tokens of the prompt the slot's cache gives: its common prefix, plus what a context shift keeps."""
        own = _common_prefix(slot.cached, prompt)
        shift = self._shift_plan(slot, prompt, own)
        return own + (shift[1] if shift else 0)

    def _shift_plan(self, slot: _Slot, prompt: list[int], start: int) -> tuple[int, int] | None:
        """(drop, keep) when the cache is P + D + R... and the prompt P + R...: the conversation dropped its
        oldest turns D, and R can be kept by shifting it left past them (llama.cpp's context shift)."""
        cached, rest = slot.cached, prompt[start:len(prompt) - 1]
        if not self._can_shift or len(rest) < SHIFT_MIN_TOKENS or len(cached) - start < 2 * SHIFT_MIN_TOKENS:
            return None
        needle = rest[:SHIFT_MIN_TOKENS]
        best: tuple[int, int] | None = None
        for at in range(start + 1, len(cached) - SHIFT_MIN_TOKENS + 1):
            if cached[at] == needle[0] and cached[at:at + SHIFT_MIN_TOKENS] == needle:
                keep = _common_prefix(cached[at:], rest)
                if best is None or keep > best[1]:
                    best = (at - start, keep)
        if best is None:
            return None
        drop, keep = best
        # A cell another sequence shares would move for it too: those prefixes are left as they are.
        if any(self._refs[cell] > 1 for cell in slot.cells[start + drop:start + drop + keep]):
            return None
        return best

    def _shift(self, slot: _Slot, start: int, drop: int, keep: int) -> None:
        """Remove the cache's tokens [start, start + drop) and move the ``keep`` after them left into their place."""
        self._truncate(slot, start + drop + keep)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, start, start + drop)
        llama_cpp.llama_memory_seq_add(self._memory, slot.seq_id, start + drop, -1, -drop)
        self._release(slot.cells[start:start + drop])
        del slot.cells[start:start + drop], slot.cached[start:start + drop]

    def _copy(self, source: _Slot, slot: _Slot, n: int) -> None:
        """Share the first ``n`` cells of ``source`` with ``slot``: in a unified pool nothing is copied."""
        self._truncate(slot, 0)
        llama_cpp.llama_memory_seq_cp(self._memory, source.seq_id, slot.seq_id, 0, n)
        slot.cached, slot.cells = source.cached[:n], source.cells[:n]
        for cell in slot.cells:
            self._refs[cell] += 1

    def _restore(self, slot: _Slot, tokens: list[int], data: Any) -> None:
        self._truncate(slot, 0)
        if self._make_room(len(tokens)) and llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data),
                                                                                  slot.seq_id):
            slot.cached = list(tokens)
            slot.cells = self._new_cells(len(tokens))
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)

    def _save(self, slot: _Slot) -> bool:
        """Keep the slot's KV cache in RAM for its conversation's next turn before another takes the slot;
        False when it is not kept (no conversation, or more than the RAM budget)."""
        if not slot.session or not slot.cached:
            return False
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if size > self._saved.budget:
            return False
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq_id) != size:
            return False
        self._saved.put(slot.session, list(slot.cached), data)
        return True

    def _evict(self, slot: _Slot) -> None:
        """Free an idle sequence's cells, its conversation's state kept in RAM (or on disk) for its next turn."""
        if slot.cells:
            self._save(slot)
            self._truncate(slot, 0)
        slot.session = ""

    def _trim_idle(self) -> None:
        """Keep idle caches from slowing the running requests. llama.cpp's attention walks every KV cell up to
        the highest in use, masking out other sequences' cells one by one: with the pool full of idle caches a
        step took 1.9x as long. So idle sequences keep a quarter window of cells in all (room for the shared
        system prompt), the most recently used first; the rest goes to the state cache (RAM, then disk), whence
        the conversation's next turn copies it back (milliseconds, where re-reading its history takes seconds).
        A cache too large for the RAM budget stays in the pool."""
        active = self._active()
        if not active:
            return  # nothing runs that idle cells could slow: a lone conversation keeps its cache where it is
        self._trim_due = False
        allowance = self.n_ctx // IDLE_WINDOW_SHARE
        plan = []
        for slot in sorted(self._slots, key=lambda s: s.last_used, reverse=True):
            if slot.generation is None and slot.cells:
                if len(slot.cells) > allowance:
                    plan.append((slot, allowance))
                allowance = max(0, allowance - len(slot.cells))
        for slot, keep in reversed(plan):  # oldest first: when the RAM cache overflows, it keeps the newest
            if self._save(slot) or not slot.session:
                self._truncate(slot, keep if keep >= COPY_MIN_TOKENS else 0)
                slot.session = ""  # its whole cache is in the state cache now; what stays is a prefix to share

    def _make_room(self, n: int) -> bool:
        """Evict idle sequences, least recently used first, until ``n`` more cells fit in the pool."""
        while self.pool_tokens - len(self._refs) < n:
            idle = [slot for slot in self._slots if slot.generation is None and slot.cells]
            if not idle:
                return False
            self._evict(min(idle, key=lambda s: s.last_used))
        return True

    def _truncate(self, slot: _Slot, keep: int) -> None:
        """Drop the sequence's cache from token ``keep`` on."""
        if keep >= len(slot.cached):
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)  # a recurrent state: all or nothing
            keep = 0
        self._release(slot.cells[keep:])
        del slot.cells[keep:], slot.cached[keep:]

    def _new_cells(self, n: int) -> list[int]:
        cells = list(range(self._next_cell, self._next_cell + n))
        self._next_cell += n
        self._refs.update(dict.fromkeys(cells, 1))
        return cells

    def _release(self, cells: Iterable[int]) -> None:
        for cell in cells:
            if self._refs[cell] == 1:
                del self._refs[cell]
            else:
                self._refs[cell] -= 1

    def _step(self) -> None:
        """One llama_decode over every active sequence: a token each for the generating ones, then prompt tokens,
        shortest remaining prompt first (so a short prompt never waits behind a long one) yet a share for each
        (so a long one always advances), as many as keep the step within the latency budget."""
        slots = []
        for slot in self._active():
            if slot.generation is not None and slot.generation._cancel_requested:
                with self._cond:
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
        if generating and (self._gen_step is None or self._since_bare >= BARE_STEP_EVERY):
            budget = 0  # a step of generating tokens only, to time it as the machine is now
        limited = timed and 0 < budget < waiting_tokens  # more prompt than this step takes: a measure of it
        budget = min(budget, waiting_tokens)
        if not self._make_room(len(generating) + budget):
            budget = max(0, self.pool_tokens - len(self._refs) - len(generating))
            while generating and self.pool_tokens - len(self._refs) < len(generating):
                longest = max(generating, key=lambda s: len(s.cells))  # cannot happen with admission by room
                generating.remove(longest)
                with self._cond:
                    self._finish(longest, FinishReason.LENGTH)
        batch, n = self._batch, 0
        n_prompt = budget
        for slot in slots:
            slot.logits_index = -1
        for slot in generating:
            assert slot.next_token is not None
            n = self._add(batch, n, slot.next_token, len(slot.cached), slot.seq_id, True)
            self._append(slot, slot.next_token)
            slot.logits_index = n - 1
        for place, slot in enumerate(prompting):
            if budget <= 0:
                break
            assert slot.pending is not None
            # Max-min fair: shortest first, each taking at most an equal share of what is left, so short prompts
            # finish at once while a long one still advances every step (never starved by a stream of short ones).
            chunk = slot.pending[:max(1, budget // (len(prompting) - place))]
            budget -= len(chunk)
            del slot.pending[:len(chunk)]
            for i, token in enumerate(chunk):
                n = self._add(batch, n, token, len(slot.cached), slot.seq_id, not slot.pending and i == len(chunk) - 1)
                self._append(slot, token)
            if not slot.pending:
                slot.logits_index = n - 1
        if n == 0:
            return
        batch.n_tokens = n
        threads = self.threads.choose(n)
        if threads != self._n_threads:
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
            self._n_threads = threads
        started = time.perf_counter()
        result = llama_cpp.llama_decode(self._ctx, batch)
        if result != 0:
            raise EngineError(f"llama_decode returned {result}")
        seconds = time.perf_counter() - started
        self.threads.record(n, threads, seconds)
        self.step_seconds.append(seconds)
        self.step_cells.append(len(self._refs))
        if generating or limited:
            self._measure(seconds, n_prompt, limited)
        for slot in slots:
            if slot.logits_index >= 0:
                self._sample(slot)

    def _prefill_tokens(self) -> int:
        """Prompt tokens a step may add to the generating streams' tokens (see `_measure`)."""
        return max(self.settings.prefill_chunk, int(self._chunk))

    def _measure(self, seconds: float, n_prompt: int, limited: bool) -> None:
        """Size the next steps' prompt chunk by this step's time: a step with prompt tokens should take
        ``step_budget_ms``, or twice a step without them when that alone takes longer (a slow model or a busy
        machine), so streams keep flowing while prompts are read as fast as that allows."""
        self._since_bare = self._since_bare + 1 if n_prompt else 0
        if not n_prompt:
            self._gen_step = seconds if self._gen_step is None else 0.8 * self._gen_step + 0.2 * seconds
            return
        if not limited:  # the prompts ran out before the chunk did: the step says nothing about its size
            return
        target = max(self.settings.step_budget_ms / 1000, 2 * (self._gen_step or 0.0))
        ratio = min(2.0, max(0.5, target / max(seconds, 1e-6)))
        self._chunk = min(float(self._n_batch), max(float(self.settings.prefill_chunk), self._chunk * ratio))

    def _append(self, slot: _Slot, token: int) -> None:
        slot.cached.append(token)
        slot.cells += self._new_cells(1)

    @staticmethod
    def _add(batch: Any, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _sample(self, slot: _Slot) -> None:
        generation = slot.generation
        assert generation is not None
        token = llama_cpp.llama_sampler_sample(generation._sampler, self._ctx, slot.logits_index)
        if generation.t_first_token is None:
            generation.t_first_token = time.monotonic()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            with self._cond:
                self._finish(slot, FinishReason.STOP)
            return
        generation.n_generated += 1
        text = slot.decoder.decode(self._piece(token))
        if text:
            generation._emit(text)
        if generation.n_generated >= generation.sampling.max_tokens or len(slot.cached) + 1 >= self.n_ctx:
            with self._cond:
                self._finish(slot, FinishReason.LENGTH)
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, reason: FinishReason, error: BaseException | None = None) -> None:
        """End the slot's request (caller holds the lock); the slot keeps its KV cache for the next turn."""
        generation = slot.generation
        assert generation is not None
        # Bytes still held by the decoder are a character the model did not finish: dropped, never shown as "�".
        slot.generation, slot.pending, slot.next_token = None, None, None
        slot.last_used = time.monotonic()
        self._trim_due = True
        self._end(generation, reason, error)
        if generation.tokens_per_second:
            self._last_rate = generation.tokens_per_second

    def _forget(self, slot: _Slot) -> None:
        """Drop a slot's KV cache after a failure, so nothing half-written is reused."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        self._release(slot.cells)
        slot.cached.clear()
        slot.cells.clear()

    def _end(self, generation: Generation, reason: FinishReason, error: BaseException | None = None) -> None:
        generation.finish_reason = reason
        generation.t_finished = time.monotonic()
        generation._position = None
        llama_cpp.llama_sampler_free(generation._sampler)
        generation._sampler = None
        generation._emit(error if error is not None else _END)
