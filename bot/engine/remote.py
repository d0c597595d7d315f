"""A remote engine: any OpenAI-compatible server that streams chat completions (llama-server, vLLM, Ollama,
LM Studio, llama-cpp-python's ``llama_cpp.server``), behind the interface the core uses for the embedded one.
A user turn's images (`Prompt.images`) go as OpenAI ``image_url`` parts, inline as data URLs. Tools go as OpenAI
``tools``; the calls the server streams back (``delta.tool_calls``) are gathered in `RemoteGeneration.tool_calls`.

It sends the conversation as chat messages; the server applies the model's template. Prompt sizes are a
conservative estimate (the server's tokenizer is not ours), and a prompt the server finds too long raises
`PromptTooLong`, so the manager retries with fewer turns: a prompt never overflows silently. At most
``max_requests`` requests are in flight; the rest wait in line and learn their place. An unreachable server
or a 5xx is retried with backoff until ``retry_seconds`` have passed, each attempt announced (`Retrying`).

Over 400 lines: the whole OpenAI-compatible client (pooling, retries, streaming, images), which a reader
follows top to bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.config import EngineSettings, SamplingSettings
from bot.engine.base import END, EngineStatus, Figures, FinishReason, PromptTooLong, QueuePosition, Retrying
from bot.errors import EngineError, QueueFull
from bot.prompt import Prompt
from bot.types import ImagePart

__all__ = ["PromptTooLong", "RemoteCall", "RemoteEngine", "RemoteGeneration", "Retrying", "estimate_tokens"]

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 3  # fewer than any common tokenizer averages on prose or code: the estimate runs high
TOKENS_PER_MESSAGE = 8  # a chat template's markers around each message
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 15.0)  # then 15 s between attempts
# An idle pooled connection is closed before the server's keep-alive (llama-server's: 5 s) can close it under us.
KEEPALIVE_SECONDS = 2.0
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
# "maximum context length is 2048 tokens" (OpenAI, vLLM, llama_cpp.server), '"n_ctx": 2048' (llama-server)
_WINDOW = re.compile(r'context length is (\d+)|"n_ctx"\s*:\s*(\d+)')


@dataclass
class RemoteCall:
    """One tool call the server streamed: its id, the function's name and its arguments (JSON text, gathered
    from the pieces the stream sent)."""

    id: str = ""
    name: str = ""
    arguments: str = ""


def estimate_tokens(text: str) -> list[int]:
    """Pseudo-tokens of ``text``: one per ``BYTES_PER_TOKEN`` UTF-8 bytes, each holding its bytes, so a count
    is an upper estimate and `detokenize` gives the text back (a cut may fall inside a character)."""
    data = text.encode("utf-8", "replace")
    return [
        int.from_bytes(b"\x01" + data[i : i + BYTES_PER_TOKEN], "big") for i in range(0, len(data), BYTES_PER_TOKEN)
    ]


class RemoteGeneration(Figures):
    """One request to the server; iterate it like the embedded `Generation` (positions, text, `Retrying`).
    ``n_prompt_reused`` is the server's cache hits, when it reports them."""

    def __init__(
        self,
        engine: RemoteEngine,
        prompt: Prompt,
        sampling: SamplingSettings,
        tools: Sequence[dict[str, Any]] = (),
        tool_choice: str = "auto",
    ) -> None:
        super().__init__(prompt.tokens, sampling)
        self._engine = engine
        self._body = engine._body(prompt, sampling)
        if tools:
            self._body.update(tools=list(tools), tool_choice=tool_choice)
        self.tool_calls: list[RemoteCall] = []  # complete once the generation has ended
        self._task = asyncio.create_task(self._run(), name="remote-generation")

    def cancel(self) -> None:
        """Stop now: the HTTP stream is closed, which tells the server to stop generating."""
        self._task.cancel()

    async def _run(self) -> None:
        engine = self._engine
        outcome: BaseException | None = None
        try:
            async with engine._slot(self):
                self._set_position(0)
                self.finish_reason = await self._stream_with_retries()
        except asyncio.CancelledError:
            self.finish_reason = FinishReason.CANCELLED
        except EngineError as exc:
            self.finish_reason, outcome = FinishReason.ERROR, exc
        except Exception as exc:  # never leave the caller waiting
            log.exception("a request to the model server failed")
            self.finish_reason, outcome = FinishReason.ERROR, EngineError(f"the model server request failed: {exc}")
        self.t_finished = time.monotonic()
        self._position = None
        if rate := self.tokens_per_second:
            engine.last_rate = rate
        self._events.put_nowait(END if outcome is None else outcome)

    def _set_position(self, position: int) -> None:
        if position != self._position:
            self._position = position
            self._events.put_nowait(QueuePosition(position))

    async def _stream_with_retries(self) -> FinishReason:
        """Stream the reply; while nothing was shown yet, an unreachable or failing server is tried again."""
        deadline = time.monotonic() + self._engine.settings.retry_seconds
        stale_retried = False
        for attempt in itertools.count():
            try:
                return await self._stream()
            except _Unavailable as exc:
                if exc.stale and not stale_retried:  # a pooled connection the server had closed: no outage
                    stale_retried = True
                    continue
                if self.n_generated:
                    raise EngineError(f"The model server stopped in the middle of this reply ({exc}).") from None
                engine = self._engine
                engine.reachable = False
                delay = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)] * random.uniform(0.8, 1.2)
                if time.monotonic() + delay > deadline:
                    raise EngineError(
                        f"The model server is unreachable ({exc}); your message is saved, please try again later."
                    ) from None
                log.warning(
                    "the model server at %s is unavailable (%s); retrying in %.1f s",
                    engine.settings.base_url,
                    exc,
                    delay,
                )
                self._events.put_nowait(Retrying(str(exc), delay))
                await asyncio.sleep(delay)
        raise AssertionError("itertools.count() never ends")

    async def _stream(self) -> FinishReason:
        engine = self._engine
        answered = False
        try:
            async with engine._session().post(engine._url("chat/completions"), json=self._body) as response:
                answered = True
                if response.status != 200:
                    await _raise_for(response)
                engine.reachable = True
                self.tool_calls = []
                reason: FinishReason | None = None
                reasoning = False
                async for line in response.content:
                    data = line.decode("utf-8", "replace").strip()
                    if not data.startswith("data:"):
                        continue
                    data = data.removeprefix("data:").strip()
                    if data == "[DONE]":
                        reason = reason or FinishReason.STOP
                        break
                    chunk = json.loads(data)
                    if error := chunk.get("error"):  # some servers report a failure inside the stream
                        raise EngineError(f"the model server failed: {_message(error)}")
                    usage = chunk.get("usage") or {}
                    if cached := (usage.get("prompt_tokens_details") or {}).get("cached_tokens"):
                        self.n_prompt_reused = int(cached)
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta") or {}
                        text = ""
                        if thought := delta.get("reasoning_content") or delta.get("reasoning"):
                            text += ("" if reasoning else _THINK_OPEN) + thought
                            reasoning = True
                        if content := delta.get("content"):
                            text += (_THINK_CLOSE if reasoning else "") + content
                            reasoning = False
                        if text:
                            self._text(text)
                        for piece in delta.get("tool_calls") or ():
                            self._tool_call_piece(piece)
                        if finish := choice.get("finish_reason"):
                            reason = FinishReason.LENGTH if finish == "length" else FinishReason.STOP
                if reasoning:
                    self._text(_THINK_CLOSE)
                if reason is None:  # the server failed inside the stream (llama_cpp.server does on a long prompt)
                    if self.n_generated:
                        raise EngineError("The model server stopped in the middle of this reply.")
                    raise PromptTooLong(
                        "The model server gave up on this prompt before answering; it may not fit "
                        "the server's context window (set [engine] n_ctx to the server's)."
                    )
                return reason
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            # Dropped before any answer on a connection that was open: the server closed it while it sat idle.
            stale = (
                not answered
                and isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
                and not isinstance(exc, aiohttp.ClientConnectorError)
            )
            raise _Unavailable(_describe(exc), stale=stale) from None
        except (json.JSONDecodeError, AttributeError) as exc:
            raise EngineError(f"the model server sent something that is not a chat completion stream: {exc}") from None

    def _tool_call_piece(self, piece: dict[str, Any]) -> None:
        """Add one streamed piece of a tool call: the first names it, the rest extend its arguments."""
        index = piece.get("index", len(self.tool_calls))
        index = index if isinstance(index, int) and 0 <= index < 128 else len(self.tool_calls)
        while len(self.tool_calls) <= index:
            self.tool_calls.append(RemoteCall())
        call = self.tool_calls[index]
        function = piece.get("function") or {}
        call.id = str(piece.get("id") or call.id)
        call.name += str(function.get("name") or "")
        call.arguments += str(function.get("arguments") or "")
        if self.t_first_token is None:
            self.t_first_token = time.monotonic()
        self.n_generated += 1

    def _text(self, text: str) -> None:
        if self.t_first_token is None:
            self.t_first_token = time.monotonic()
        self.n_generated += 1  # one streamed chunk is one token on llama.cpp, vLLM and Ollama
        self._events.put_nowait(text)


class _Unavailable(Exception):
    """The server cannot be reached, dropped the connection, timed out, or answered 5xx: worth another try.
    ``stale``: the connection was dropped before any answer, as a server does with an idle keep-alive one."""

    def __init__(self, reason: str, *, stale: bool = False) -> None:
        super().__init__(reason)
        self.stale = stale


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    text = await response.text(errors="replace")
    try:
        error = json.loads(text)
    except json.JSONDecodeError:
        error = text
    message = _message(error.get("error", error.get("detail", error)) if isinstance(error, dict) else error)
    if response.status >= 500 or response.status == 429:
        raise _Unavailable(f"HTTP {response.status}: {message}")
    if response.status == 400 and _too_long(error, message):
        said = _WINDOW.search(message) or _WINDOW.search(text)
        raise PromptTooLong(message, int(said.group(1) or said.group(2)) if said else None)
    if response.status in (401, 403):
        raise EngineError("The model server refused the API key (set LLAMARELAY_ENGINE_API_KEY).")
    raise EngineError(f"The model server refused this request (HTTP {response.status}): {message}")


def _with_images(message: dict[str, str], images: Sequence[ImagePart | str]) -> dict[str, Any]:
    """A chat message with its images as OpenAI content parts: the text, then each image as a data URL
    (one no longer stored as its note, in text)."""
    if not images:
        return message
    parts: list[dict[str, Any]] = [{"type": "text", "text": message["content"]}] if message["content"] else []
    for image in images:
        if isinstance(image, str):
            parts.append({"type": "text", "text": image})
        else:
            parts.append({"type": "image_url", "image_url": {"url": image.data_url()}})
    return {**message, "content": parts}


def _too_long(error: Any, message: str) -> bool:
    details = error.get("error") if isinstance(error, dict) else None
    code = str(details.get("code") or details.get("type") or "") if isinstance(details, dict) else ""
    return code in ("context_length_exceeded", "exceed_context_size_error") or any(
        phrase in message.lower() for phrase in ("context length", "context window", "context size", "too long")
    )


def _message(error: Any) -> str:
    text = error.get("message", error) if isinstance(error, dict) else error
    return " ".join(str(text).split())[:300]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "cannot connect"
    return " ".join(str(exc).split())[:200] or type(exc).__name__


class RemoteEngine:
    """The engine interface over an OpenAI-compatible chat completions server."""

    renders_template = False  # the server applies the model's template to the chat messages

    def __init__(self, settings: EngineSettings, api_key: str | None = None) -> None:
        if not settings.base_url:
            raise EngineError('[engine] backend = "openai" needs base_url (e.g. http://127.0.0.1:8080/v1)')
        self.settings = settings
        self.n_ctx = settings.n_ctx
        self.model_name = settings.model or "(asking the server)"
        self.reachable = False
        self.last_rate: float | None = None
        self._api_key = api_key
        self._http: aiohttp.ClientSession | None = None
        self._running = 0
        self._waiting: deque[tuple[RemoteGeneration, asyncio.Future[None]]] = deque()

    async def start(self) -> None:
        """Ask the server for its model; an unreachable server is only logged (requests retry, /readyz tells)."""
        await self.probe()
        if not self.reachable:
            log.warning("the model server at %s is not answering yet; replies will wait for it", self.settings.base_url)

    async def probe(self) -> bool:
        """Whether the server answers ``GET /models`` now; learns the model's name on the way."""
        try:
            async with self._session().get(
                self._url("models"), timeout=aiohttp.ClientTimeout(total=self.settings.connect_timeout)
            ) as r:
                models = (await r.json()).get("data") or [] if r.status == 200 else []
                self.reachable = r.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.reachable = False
            return False
        if not self.settings.model and models:
            self.model_name = str(models[0].get("id", self.model_name))
        return self.reachable

    async def readiness(self) -> str:
        """ "ok" when the server answers now, else why not (for /readyz)."""
        return "ok" if await self.probe() else f"model server {self.settings.base_url} is not answering"

    # -- token counts: an estimate ---------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return estimate_tokens(text)

    def detokenize(self, tokens: Sequence[int]) -> str:
        data = b"".join(t.to_bytes((t.bit_length() + 7) // 8, "big")[1:] for t in tokens)
        return data.decode("utf-8", "ignore")

    def chat_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """An upper estimate of the prompt the server will build from ``messages``."""
        tokens: list[int] = []
        for message in messages:
            extra = json.dumps(message["tool_calls"]) if message.get("tool_calls") else ""
            tokens += estimate_tokens((message.get("content") or "") + extra) + [0] * TOKENS_PER_MESSAGE
        return tokens + [0] * TOKENS_PER_MESSAGE  # the generation prompt

    # -- requests --------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        sampling: SamplingSettings,
        *,
        session: str = "",
        tools: Sequence[dict[str, Any]] = (),
        tool_choice: str = "auto",
    ) -> RemoteGeneration:
        """Send ``prompt.messages`` (call from the event loop), offering ``tools`` (OpenAI's shape) when given;
        raises `QueueFull` when the line is full."""
        if len(self._waiting) >= self.settings.max_queue:
            raise QueueFull(f"Too many requests are waiting ({len(self._waiting)}); please try again shortly.")
        return RemoteGeneration(self, prompt, sampling, tools, tool_choice)

    def status(self, generation: RemoteGeneration | None = None) -> EngineStatus:
        return EngineStatus(
            model_name=self.model_name,
            queue_length=len(self._waiting),
            running=self._running,
            position=generation.position if generation else None,
            tokens_per_second=self.last_rate,
        )

    def check_sampling(self, sampling: SamplingSettings) -> None:
        """The server checks grammars itself (llama-server and llama_cpp.server take GBNF)."""

    async def aclose(self) -> None:
        for generation, _ in list(self._waiting):
            generation.cancel()
        if self._http is not None:
            await self._http.close()

    @contextlib.asynccontextmanager
    async def _slot(self, generation: RemoteGeneration) -> AsyncIterator[None]:
        """One of ``max_requests`` places at the server; while waiting, the generation learns its place."""
        if self._running >= self.settings.max_requests or self._waiting:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((generation, turn))
            self._renumber()
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._release()  # our turn came as we were cancelled: hand it on
                else:
                    self._waiting.remove((generation, turn))
                    self._renumber()
                raise
        else:
            self._running += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if self._waiting:
            _, turn = self._waiting.popleft()
            turn.set_result(None)  # the place passes straight on: _running stays
            self._renumber()
        else:
            self._running -= 1

    def _renumber(self) -> None:
        for place, (generation, _) in enumerate(self._waiting, start=1):
            generation._set_position(place)

    def _body(self, prompt: Prompt, sampling: SamplingSettings) -> dict[str, Any]:
        messages: list[dict[str, Any]] = [
            _with_images(message, prompt.images.get(index, ())) for index, message in enumerate(prompt.messages)
        ]
        if prompt.prefix:  # Continue: servers that support it go on from this reply; others answer after it
            messages.append({"role": "assistant", "content": prompt.prefix})
        body: dict[str, Any] = {
            "model": self.settings.model or self.model_name,
            "messages": messages,
            "stream": True,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if sampling.seed >= 0:
            body["seed"] = sampling.seed
        if sampling.repeat_penalty != 1.0:
            body["repeat_penalty"] = sampling.repeat_penalty
        if sampling.grammar:
            body["grammar"] = sampling.grammar
        return body

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
            )
            self._http = aiohttp.ClientSession(
                headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_SECONDS)
            )
        return self._http

    def _url(self, path: str) -> str:
        return f"{str(self.settings.base_url).rstrip('/')}/{path}"
