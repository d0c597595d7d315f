"""The aiohttp application: POST /v1/chat/completions (streamed as Server-Sent Events, or whole; with
``tools`` an embedded model returns ``tool_calls``, see `adapters.openai_api.tool_calls`) and GET /v1/models, on
the bot's engines and their queues: a request's ``model`` picks one of the configured models (loaded on first
use, as /model's are); none picks the default.

In front of every request: the Bearer token is checked when one is set (a listener off loopback needs one),
the Host must be a loopback name when the server listens on loopback (a DNS rebinding page cannot reach it),
and a POST must be JSON (a foreign page cannot send that without CORS, which this server never grants).
Errors are always OpenAI-style JSON, never an HTML page or a stack trace.

Over 400 lines: every /v1 handler, plain and tool-calling, whole and streamed; they share its errors, metrics
and SSE framing, which a split would have to pass between files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets as secrets_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from adapters.http import (
    FOREIGN_HOST,
    Handler,
    HttpError,
    Listener,
    bearer_guard,
    check_token_needed,
    host_guard,
    json_errors,
)
from adapters.openai_api.schema import ApiError, ChatRequest, StopCutter, parse_chat_request
from adapters.openai_api.tool_calls import NONE, ToolTurn, call_json, model_format, prompt_messages
from bot.config import ApiSettings, SamplingSettings, Secrets
from bot.engine import FinishReason, QueuePosition
from bot.engine.base import Figures, InferenceEngine, Retrying, renders_template
from bot.errors import EngineError, PromptError, QueueFull
from bot.metrics import Metrics, TokenTimer
from bot.models import ModelRegistry, ModelUnavailable
from bot.prompt import Prompt
from bot.store import Status

if TYPE_CHECKING:
    from bot.engine.embedded import Engine

__all__ = ["OpenAIServer", "check_access", "create_app"]

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_SECONDS = 2.0
OWNER = "llamarelay"
PLATFORM = "api"  # the replies metric's label for this adapter's requests
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop"}


@dataclass(frozen=True)
class ApiState:
    engine: Engine
    sampling: SamplingSettings  # the config's defaults for what a request leaves out
    model_id: str
    created: int
    metrics: Metrics | None  # the bot's Prometheus figures, which then count the API's requests too
    models: ModelRegistry | None = None  # every configured model; None: ``engine`` alone, as ``model_id``

    def model_ids(self) -> list[str]:
        return self.models.names() if self.models is not None else [self.model_id]

    @contextlib.asynccontextmanager
    async def engine_for(self, requested: str) -> AsyncIterator[tuple[str, InferenceEngine]]:
        """The model ``requested`` by name (any case; "" the default) and its engine, lent while the context
        lasts: loaded first when it is not. 404 for a name that is not configured, 503 when it cannot load."""
        if self.models is None:
            if requested and requested.lower() != self.model_id.lower():
                raise _no_such_model(requested, self.model_ids())
            yield self.model_id, self.engine
            return
        model = self.models.find(requested) if requested else self.models.default
        if model is None:
            raise _no_such_model(requested, self.model_ids())
        try:
            async with self.models.use(model.name) as engine:
                yield model.name, engine
        except ModelUnavailable as exc:  # only `use` raises it: it failed to load, or does not fit
            raise ApiError(503, str(exc), type="server_error", code="model_unavailable") from None


STATE = web.AppKey("state", ApiState)


def check_access(settings: ApiSettings, secrets: Secrets) -> None:
    """Refuse to serve other machines without a token."""
    check_token_needed(
        settings.host, secrets.api_token, section="api", env="LLAMARELAY_API_TOKEN", exposes="use the model"
    )


def error_response(error: HttpError) -> web.Response:
    return web.json_response(ApiError.of(error).body(), status=error.status)


# -- middleware ----------------------------------------------------------------------------------------


def _foreign_host() -> ApiError:
    return ApiError(403, FOREIGN_HOST, type="permission_error", code="foreign_host")


def _no_such_model(name: str, names: list[str]) -> ApiError:
    return ApiError(
        404,
        f"The model '{name}' does not exist; the models here are: {', '.join(names)}.",
        param="model",
        code="model_not_found",
    )


def _wrong_token() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided: send 'Authorization: Bearer' with the value of LLAMARELAY_API_TOKEN.",
        code="invalid_api_key",
    )


@web.middleware
async def _json_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A POST must be JSON: a foreign page cannot send that without CORS, which this server never grants."""
    if request.method == "POST" and request.content_type != "application/json":
        raise ApiError(
            415, "The request body must be JSON (Content-Type: application/json).", code="unsupported_media_type"
        )
    return await handler(request)


# -- handlers ------------------------------------------------------------------------------------------


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": state.created, "owned_by": OWNER}
                for name in state.model_ids()
            ],
        }
    )


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise ApiError(400, "The request body is not valid JSON.") from None
    chat = parse_chat_request(body, state.sampling)
    async with state.engine_for(chat.model) as (model_id, engine):
        return await _complete(request, state, chat, model_id, engine)


async def _complete(
    request: web.Request, state: ApiState, chat: ChatRequest, model_id: str, engine: InferenceEngine
) -> web.StreamResponse:
    """Answer ``chat`` with ``engine`` (model ``model_id``), whole or streamed."""
    calls_tools = bool(chat.tools) and chat.tool_choice != NONE
    fmt = model_format(engine) if renders_template(engine) else None
    if calls_tools and fmt is None:
        raise ApiError(
            400,
            f"The model {model_id} is another server's: 'tools' are offered by embedded models only.",
            param="tools",
        )
    try:
        # Rendering and tokenizing a long conversation takes a while: not on the event loop.
        messages = prompt_messages(chat, fmt) if fmt is not None else chat.messages
        prompt = await asyncio.to_thread(engine.chat_tokens, messages)
    except PromptError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    _check_length(engine.n_ctx, len(prompt), chat)
    if calls_tools and fmt is not None and renders_template(engine):
        return await _tool_chat(
            request, state, chat, ToolTurn(engine, chat, fmt, _session(request, chat.user)), prompt, model_id
        )
    with _submitting():
        # Both backends take a Prompt: a server model reads its messages, an embedded one its tokens.
        generation = engine.submit(Prompt(chat.messages, prompt), chat.sampling, session=_session(request, chat.user))
    completion_id = f"chatcmpl-{secrets_module.token_hex(12)}"
    status = Status.STOPPED
    try:
        if chat.stream:
            response = await _stream(request, state, chat, generation, completion_id, len(prompt), model_id)
        else:
            response = await _whole(state, chat, generation, completion_id, len(prompt), model_id)
        status = Status.FAILED if generation.finish_reason == FinishReason.ERROR else Status.COMPLETE
        return response
    except ApiError:
        status = Status.FAILED
        raise
    finally:
        # A client that hung up cancels this handler (handler_cancellation): its slot is freed in one step.
        if generation.finish_reason is None:
            generation.cancel()
        if state.metrics is not None:
            state.metrics.replies.labels(PLATFORM, status).inc()
            state.metrics.tokens_generated.inc(generation.n_generated)
            state.metrics.prompt_tokens.inc(len(prompt))
            state.metrics.prompt_tokens_reused.inc(generation.n_prompt_reused)


@contextlib.contextmanager
def _submitting() -> Iterator[None]:
    """Submitting a request: a full queue is OpenAI's 429, an engine that cannot take it a 503."""
    try:
        yield
    except QueueFull as exc:
        raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full") from None
    except EngineError as exc:
        raise ApiError(503, str(exc), type="server_error", code="engine_unavailable") from None


async def _tool_chat(
    request: web.Request, state: ApiState, chat: ChatRequest, turn: ToolTurn, prompt: list[int], model_id: str
) -> web.StreamResponse:
    """A completion offered ``tools``: its text, then its calls as ``tool_calls`` (finish_reason "tool_calls")."""
    with _submitting():
        turn.start(prompt)
    completion_id = f"chatcmpl-{secrets_module.token_hex(12)}"
    status = Status.STOPPED
    try:
        if chat.stream:
            response = await _stream_tools(request, state, chat, turn, completion_id, len(prompt), prompt, model_id)
        else:
            response = await _whole_tools(turn, completion_id, len(prompt), prompt, model_id)
        last = turn.last
        status = Status.FAILED if last is not None and last.finish_reason == FinishReason.ERROR else Status.COMPLETE
        return response
    except (ApiError, EngineError):
        status = Status.FAILED
        raise
    finally:
        turn.cancel()
        if state.metrics is not None:
            state.metrics.replies.labels(PLATFORM, status).inc()
            state.metrics.tokens_generated.inc(turn.n_generated)
            state.metrics.prompt_tokens.inc(len(prompt))


def _tool_finish(turn: ToolTurn) -> str:
    if turn.calls:
        return "tool_calls"
    last = turn.last
    if turn.cutter.stopped or last is None or last.finish_reason is None:
        return "stop"
    return FINISH_REASONS.get(last.finish_reason, "stop")


def _tool_usage(turn: ToolTurn, n_prompt: int) -> dict[str, int]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": turn.n_generated,
        "total_tokens": n_prompt + turn.n_generated,
    }


async def _whole_tools(
    turn: ToolTurn, completion_id: str, n_prompt: int, prompt: list[int], model_id: str
) -> web.Response:
    try:
        text = "".join([piece async for piece in turn.texts(prompt)])
    except (EngineError, QueueFull) as exc:  # QueueFull: the call's second generation found the queue full
        raise ApiError(500, str(exc), type="server_error", code="engine_error") from None
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if turn.calls:
        message["tool_calls"] = [call_json(call) for call in turn.calls]
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": _tool_finish(turn)}],
            "usage": _tool_usage(turn, n_prompt),
        }
    )


Send = Callable[..., Awaitable[None]]


async def _event_stream(request: web.Request, completion_id: str, model_id: str) -> tuple[web.StreamResponse, Send]:
    """A prepared Server-Sent Events response, and how to send one ``chat.completion.chunk`` on it (its
    ``choices``, and any other fields such as ``usage``)."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    created = int(time.time())

    async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": choices,
            **extra,
        }
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

    return response, send


async def _stream_tools(
    request: web.Request,
    state: ApiState,
    chat: ChatRequest,
    turn: ToolTurn,
    completion_id: str,
    n_prompt: int,
    prompt: list[int],
    model_id: str,
) -> web.StreamResponse:
    response, send = await _event_stream(request, completion_id, model_id)

    await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        async for text in turn.texts(prompt):
            await send([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
        for index, call in enumerate(turn.calls):  # each call whole, in one chunk
            await send(
                [{"index": 0, "delta": {"tool_calls": [{"index": index, **call_json(call)}]}, "finish_reason": None}]
            )
    except (EngineError, QueueFull) as exc:  # the headers are sent: the error goes in the stream, as llama-server does
        error = ApiError(500, str(exc), type="server_error", code="engine_error")
        await response.write(f"data: {json.dumps(error.body())}\n\n".encode())
    else:
        await send([{"index": 0, "delta": {}, "finish_reason": _tool_finish(turn)}])
        if chat.include_usage:
            await send([], usage=_tool_usage(turn, n_prompt))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _check_length(n_ctx: int, n_prompt: int, chat: ChatRequest) -> None:
    wanted = n_prompt + (chat.sampling.max_tokens if chat.max_tokens_given else 1)
    if wanted > n_ctx:
        completion = (
            f" ({n_prompt} in the messages, {chat.sampling.max_tokens} in the completion)"
            if chat.max_tokens_given
            else ""
        )
        raise ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{wanted} tokens{completion}. Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )


def _session(request: web.Request, user: str) -> str:
    """One party for the engine's scheduler and KV reuse: the client's token and its ``user``, hashed."""
    token = request.headers.get("Authorization", "")
    return "api:" + hashlib.sha256(f"{token}\0{user}".encode()).hexdigest()[:16]


async def _texts(generation: Figures, cutter: StopCutter, metrics: Metrics | None) -> Any:
    """The reply's text pieces, cut at the first stop string (which then ends the generation)."""
    timer = TokenTimer(metrics)
    async for event in generation:
        if isinstance(event, QueuePosition | Retrying):
            continue
        timer.text_arrived()
        text = cutter.feed(event)
        if text:
            yield text
        if cutter.stopped:
            generation.cancel()
            return
    if rest := cutter.flush():
        yield rest


def _usage(generation: Figures, n_prompt: int) -> dict[str, int]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": generation.n_generated,
        "total_tokens": n_prompt + generation.n_generated,
    }


def _finish_reason(generation: Figures, cutter: StopCutter) -> str:
    if cutter.stopped or generation.finish_reason is None:
        return "stop"
    return FINISH_REASONS.get(generation.finish_reason, "stop")


async def _whole(
    state: ApiState, chat: ChatRequest, generation: Figures, completion_id: str, n_prompt: int, model_id: str
) -> web.Response:
    cutter = StopCutter(chat.stop)
    try:
        text = "".join([piece async for piece in _texts(generation, cutter, state.metrics)])
    except EngineError as exc:
        raise ApiError(500, str(exc), type="server_error", code="engine_error") from None
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _finish_reason(generation, cutter),
                }
            ],
            "usage": _usage(generation, n_prompt),
        }
    )


async def _stream(
    request: web.Request,
    state: ApiState,
    chat: ChatRequest,
    generation: Figures,
    completion_id: str,
    n_prompt: int,
    model_id: str,
) -> web.StreamResponse:
    response, send = await _event_stream(request, completion_id, model_id)

    cutter = StopCutter(chat.stop)
    await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        async for text in _texts(generation, cutter, state.metrics):
            await send([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
    except EngineError as exc:  # the headers are sent: the error goes in the stream, as llama-server does
        error = ApiError(500, str(exc), type="server_error", code="engine_error")
        await response.write(f"data: {json.dumps(error.body())}\n\n".encode())
    else:
        await send([{"index": 0, "delta": {}, "finish_reason": _finish_reason(generation, cutter)}])
        if chat.include_usage:
            await send([], usage=_usage(generation, n_prompt))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def create_app(
    engine: Engine,
    sampling: SamplingSettings,
    secrets: Secrets,
    *,
    host: str,
    metrics: Metrics | None = None,
    models: ModelRegistry | None = None,
) -> web.Application:
    """The API for ``engine``; requests leave out sampling fields to get ``sampling``'s. With ``metrics``, each
    request counts in them (platform "api"); with ``models`` (whose default ``engine`` is), a request's
    ``model`` picks any configured model."""
    app = web.Application(
        middlewares=[
            json_errors(error_response, name="openai api"),
            host_guard(host, _foreign_host),
            bearer_guard(secrets.api_token, _wrong_token),
            _json_only,
        ]
    )
    app[STATE] = ApiState(
        engine=engine,
        sampling=sampling,
        model_id=models.default.name if models is not None else engine.settings.model_path.stem,
        created=int(time.time()),
        metrics=metrics,
        models=models,
    )
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    return app


class OpenAIServer(Listener):
    """The OpenAI API's listener: a client that hangs up cancels its request's generation at once."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        super().__init__(
            app, host, port, section="api", shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS, handler_cancellation=True
        )
