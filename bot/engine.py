"""The one llama.cpp engine: loads the model once, queues every session's requests, decodes off the event loop.

One worker thread owns the llama.cpp context. Each step it puts into one batch the next token of every
generating sequence plus a chunk of prompt tokens for newly admitted ones (continuous batching over
``parallel`` slots), decodes, and samples with per-request sampler chains that run in C. Results travel to
the asyncio side through ``loop.call_soon_threadsafe``; nothing here ever blocks the event loop.
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
from dataclasses import dataclass
from typing import Any

import llama_cpp

from bot.config import EngineSettings, SamplingSettings
from bot.errors import ConfigError, EngineError, ModelLoadError, QueueFull
from bot.prompt import CHATML_TEMPLATE, ChatTemplate

__all__ = ["Engine", "EngineStatus", "FinishReason", "Generation", "QueuePosition", "Tokenizer"]

log = logging.getLogger(__name__)

PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over, as llama.cpp's default
_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a new random seed
# Tokens plain text must never become: chat markers, BOS/EOS, and added tokens such as Qwen's <think>.
_SPECIAL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
_LONGEST_MATCHED_TEXT = 128  # longer token texts are left to the fallback in Tokenizer._plain_run


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

    def lines(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a /status answer; each platform adds its own bold."""
        if self.position is None:
            place = "nothing queued"
        elif self.position == 0:
            place = "generating now"
        else:
            place = f"#{self.position} in the queue"
        speed = f"{self.tokens_per_second:.1f} tokens/s" if self.tokens_per_second else "not measured yet"
        return [("Model", self.model_name), ("Queue", f"{self.queue_length} waiting, {self.running} generating"),
                ("This conversation", place), ("Speed", f"{speed} (last reply)")]


_END = object()


class Generation:
    """One request. ``async for event in generation`` yields `QueuePosition` events and text deltas (str).

    Raises `EngineError` from the iteration if llama.cpp fails. ``cancel()`` may be called at any time.
    """

    def __init__(self, engine: Engine, prompt: list[int], sampling: SamplingSettings, session: str,
                 sampler: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.session = session
        self.finish_reason: FinishReason | None = None
        self.n_generated = 0
        self.n_prompt_reused = 0  # prompt tokens whose KV cache was already there
        self.t_first_token: float | None = None
        self.t_finished: float | None = None
        self._engine = engine
        self._sampler = sampler
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._position: int | None = None
        self._announced_position: int | None = None
        self._cancel_requested = False

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
    """One llama.cpp sequence. Between requests it keeps its KV cache for the next turn of the same session."""

    seq_id: int
    cached: list[int]  # tokens whose KV is in this sequence now
    generation: Generation | None = None
    pending: list[int] | None = None  # prompt tokens still to decode
    next_token: int | None = None  # sampled, not decoded yet
    logits_index: int = -1  # batch index of this slot's logits in the current step
    decoder: Any = None
    last_used: float = 0.0
    session: str = ""


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _StateCache:
    """KV states of conversations whose slot went to another, least recently saved first, within a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.size = 0
        self._states: OrderedDict[str, tuple[list[int], Any]] = OrderedDict()

    def put(self, session: str, tokens: list[int], data: Any) -> None:
        self.pop(session)
        if len(data) > self.budget:
            return
        self._states[session] = (tokens, data)
        self.size += len(data)
        while self.size > self.budget:
            _, (_, evicted) = self._states.popitem(last=False)
            self.size -= len(evicted)

    def pop(self, session: str) -> tuple[list[int], Any] | None:
        state = self._states.pop(session, None)
        if state is not None:
            self.size -= len(state[1])
        return state


_log_callback: Any = None
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
        line = ({3: logging.WARNING, 4: logging.ERROR}.get(level, logging.DEBUG),
                text.decode("utf-8", "replace").rstrip())
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
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise ModelLoadError(f"cannot load model {path}: not a valid GGUF file (run `llamarelay fetch-model` "
                                 "for the default model, or point [engine] model_path at another GGUF)")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx * settings.parallel
        params.n_batch = params.n_ubatch = settings.n_batch
        params.n_seq_max = settings.parallel
        params.n_threads = params.n_threads_batch = settings.n_threads or os.cpu_count() or 1
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"cannot create a llama.cpp context for {path} with n_ctx={settings.n_ctx}")
        self._model, self._ctx = model, ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.settings = settings
        self.n_ctx = llama_cpp.llama_n_ctx_seq(ctx)
        """Context window of one session, in tokens."""
        self.model_size = llama_cpp.llama_model_size(model)
        head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
        self.kv_cache_bytes = (llama_cpp.llama_n_ctx(ctx) * llama_cpp.llama_model_n_layer(model)
                               * 2 * head_dim * llama_cpp.llama_model_n_head_kv(model) * 2)  # K and V, f16
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
        self._slots = [_Slot(seq_id=i, cached=[]) for i in range(settings.parallel)]
        self._saved = _StateCache(settings.state_cache_mb * 1024 * 1024)
        self._waiting: deque[Generation] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._last_rate: float | None = None
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._thread.start()
        log.info("loaded %s (%s, %.0f MB), context %d tokens x %d slots", self.model_name, path.name,
                 self.model_size / 1e6, self.n_ctx, settings.parallel)

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

    def submit(self, prompt: list[int], sampling: SamplingSettings, *, session: str = "") -> Generation:
        """Queue a request; call from the event loop. Raises `QueueFull` at once when the queue is full.

        ``session`` names the conversation, so its next turn can reuse the KV cache of this one.
        """
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
            if len(self._waiting) >= self.settings.max_queue:
                llama_cpp.llama_sampler_free(sampler)
                raise QueueFull(f"Too many requests are waiting ({len(self._waiting)}); please try again shortly.")
            generation = Generation(self, list(prompt), sampling, session, sampler, loop)
            self._waiting.append(generation)
            generation._position = len(self._waiting)
            self._cond.notify()
        return generation

    def status(self, generation: Generation | None = None) -> EngineStatus:
        with self._cond:
            return EngineStatus(
                model_name=self.model_name, queue_length=len(self._waiting),
                running=sum(slot.generation is not None for slot in self._slots),
                position=generation.position if generation else None, tokens_per_second=self._last_rate)

    def close(self) -> None:
        """Stop the worker (cancelling what still runs or waits) and free llama.cpp's memory."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
        self._thread.join()
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
            if generation in self._waiting:
                self._waiting.remove(generation)
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
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._active():
                    self._cond.wait()
                if self._closing:
                    break
                admitted = self._take_admitted()
            try:
                # Outside the lock: KV copies can take a while, and submit/status/cancel must never wait on them.
                self._admit(admitted)
                self._step()
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
            while self._waiting:
                self._end(self._waiting.popleft(), FinishReason.CANCELLED)

    def _active(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.generation is not None]

    def _take_admitted(self) -> list[Generation]:
        """Take as many waiting requests as there are free slots (caller holds the lock)."""
        free = sum(slot.generation is None for slot in self._slots)
        admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        for generation in admitted:
            generation._position = 0
        self._renumber_waiting()
        return admitted

    def _admit(self, admitted: list[Generation]) -> None:
        """Put each admitted request in the free slot that already caches the most of its prompt."""
        free = [slot for slot in self._slots if slot.generation is None]
        for generation in admitted:
            slot = self._pick_slot(free, generation)
            free.remove(slot)
            self._start(slot, generation)

    def _pick_slot(self, free: list[_Slot], generation: Generation) -> _Slot:
        """The free slot that already holds the most of this prompt: its own, a saved state, or a shared prefix."""
        slot = max(free, key=lambda s: (s.session == generation.session and bool(generation.session),
                                        _common_prefix(s.cached, generation.prompt), -s.last_used))
        if slot.session == generation.session or not generation.session:
            return slot
        saved = self._saved.pop(generation.session)
        if saved is None or _common_prefix(saved[0], generation.prompt) <= _common_prefix(slot.cached,
                                                                                           generation.prompt):
            return slot
        slot = min(free, key=lambda s: s.last_used)
        self._save(slot)
        tokens, data = saved
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        restored = llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data), slot.seq_id)
        slot.cached = list(tokens) if restored else []
        slot.session = generation.session
        return slot

    def _save(self, slot: _Slot) -> None:
        """Keep the slot's KV cache in RAM for its conversation's next turn before another takes the slot."""
        if not slot.session or not slot.cached:
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if size > self._saved.budget:
            return
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq_id) == size:
            self._saved.put(slot.session, list(slot.cached), data)

    def _renumber_waiting(self) -> None:
        for place, generation in enumerate(self._waiting, start=1):
            generation._position = place
            generation._announce_position()

    def _start(self, slot: _Slot, generation: Generation) -> None:
        if slot.session != generation.session:
            self._save(slot)
        keep = _common_prefix(slot.cached, generation.prompt)
        keep = min(keep, len(generation.prompt) - 1)  # decode at least one token to get fresh logits
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            keep = 0
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        del slot.cached[keep:]
        slot.generation, slot.session = generation, generation.session
        slot.pending = generation.prompt[keep:]
        slot.next_token = None
        slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        generation.n_prompt_reused = keep
        generation._announce_position()

    def _step(self) -> None:
        """One llama_decode over every active slot: a token each for generating ones, then prompt tokens for
        the rest (at most ``prefill_chunk`` while any slot generates, so a long prompt never stalls it long)."""
        batch, n = self._batch, 0
        capacity = self._n_batch
        slots = []
        for slot in self._active():
            if slot.generation is not None and slot.generation._cancel_requested:
                with self._cond:
                    self._finish(slot, FinishReason.CANCELLED)
            else:
                slots.append(slot)
        # Generating sequences first: each needs only one token, so a long prompt never stalls them.
        for slot in slots:
            slot.logits_index = -1
            if slot.next_token is not None:
                n = self._add(batch, n, slot.next_token, len(slot.cached), slot.seq_id, True)
                slot.cached.append(slot.next_token)
                slot.logits_index = n - 1
        # Chunk prompts only while others are generating: alone, a prompt is read at full batch speed.
        prefill_budget = self.settings.prefill_chunk if n else capacity
        for slot in slots:
            if slot.pending and n < capacity and prefill_budget > 0:
                chunk = slot.pending[:min(capacity - n, prefill_budget)]
                prefill_budget -= len(chunk)
                del slot.pending[:len(chunk)]
                for i, token in enumerate(chunk):
                    last = not slot.pending and i == len(chunk) - 1
                    n = self._add(batch, n, token, len(slot.cached), slot.seq_id, last)
                    slot.cached.append(token)
                if not slot.pending:
                    slot.logits_index = n - 1
        if n == 0:
            return
        batch.n_tokens = n
        result = llama_cpp.llama_decode(self._ctx, batch)
        if result != 0:
            raise EngineError(f"llama_decode returned {result}")
        for slot in slots:
            if slot.logits_index >= 0:
                self._sample(slot)

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
        self._end(generation, reason, error)
        if generation.tokens_per_second:
            self._last_rate = generation.tokens_per_second

    def _forget(self, slot: _Slot) -> None:
        """Drop a slot's KV cache after a failure, so nothing half-written is reused."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached.clear()

    def _end(self, generation: Generation, reason: FinishReason, error: BaseException | None = None) -> None:
        generation.finish_reason = reason
        generation.t_finished = time.monotonic()
        generation._position = None
        llama_cpp.llama_sampler_free(generation._sampler)
        generation._sampler = None
        generation._emit(error if error is not None else _END)
