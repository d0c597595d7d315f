"""The OpenAI chat request, read and checked: messages (with tool calls and tool results), sampling, stop
strings, tools and tool_choice; and `StopCutter`, which ends the text at the first stop string however the text
arrives in pieces."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from adapters.http import HttpError
from bot.config import SamplingSettings
from bot.tools.registry import ToolSpec
from bot.tools.syntax import ToolCall

__all__ = ["ApiError", "ChatRequest", "StopCutter", "parse_chat_request"]

MAX_STOP_STRINGS = 16  # OpenAI takes 4; llama-server more
MAX_STOP_CHARS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required")
# Request keys that map onto SamplingSettings fields of the same name.
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "ignore_eos",
)


class ApiError(HttpError):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(status, code, message)
        self.type, self.param = type, param

    @classmethod
    def of(cls, error: HttpError) -> ApiError:
        """``error`` (the shared edge's own) in OpenAI's words: a server error from 500 up."""
        if isinstance(error, ApiError):
            return error
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
        return cls(error.status, error.message, type=kind, code=error.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # role and content; an assistant's may hold "tool_calls" (`ToolCall`s)
    sampling: SamplingSettings
    max_tokens_given: bool  # the client asked for max_tokens: prompt + max_tokens must fit the window
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    stop: tuple[str, ...]
    user: str
    tools: tuple[ToolSpec, ...] = ()  # the caller's functions (it runs them itself)
    tool_choice: str = "none"  # "auto", "none", "required", or the name of the one function to call
    model: str = ""  # the model asked for by name; "" for the default


def parse_chat_request(body: Any, defaults: SamplingSettings) -> ChatRequest:
    """Check a /v1/chat/completions body; sampling the request leaves out comes from ``defaults`` (less their
    grammar, which is the bot's own). Raises `ApiError` (400) naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    messages = _messages(body.get("messages"))
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # strict: true is not 1
        raise ApiError(400, "Only n = 1 is supported.", param="n")
    if body.get("functions") or body.get("function_call"):
        raise ApiError(400, "'functions' is not supported; send 'tools'.", param="functions")
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    if body.get("logit_bias") not in (None, {}):  # a bias silently ignored would be a wrong answer
        raise ApiError(400, "logit_bias is not supported.", param="logit_bias")
    if body.get("logprobs"):
        raise ApiError(400, "logprobs is not supported.", param="logprobs")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise ApiError(400, 'Only response_format {"type": "text"} is supported.', param="response_format")
    overrides: dict[str, Any] = {key: body[key] for key in SAMPLING_KEYS if body.get(key) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        overrides["max_tokens"] = max_tokens
    for key, value in overrides.items():  # pydantic would turn true into 1 and "0.5" into 0.5
        if isinstance(value, bool) is not (key == "ignore_eos") or isinstance(value, str):
            raise ApiError(400, f"'{key}' must be a {'boolean' if key == 'ignore_eos' else 'number'}.", param=key)
    try:
        sampling = SamplingSettings(**{**defaults.model_dump(), "grammar": None, **overrides})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else ""
        param = (
            "max_tokens"
            if key == "max_tokens" and "max_tokens" in body
            else ("max_completion_tokens" if key == "max_tokens" else key)
        )
        raise ApiError(400, f"'{param}' = {error['input']!r} is invalid: {error['msg']}.", param=param) from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean.", param="stream")
    options = {} if body.get("stream_options") is None else body["stream_options"]
    if not isinstance(options, dict) or not isinstance(options.get("include_usage"), bool | None):
        raise ApiError(400, "'stream_options' must be an object, its include_usage a boolean.", param="stream_options")
    user = body.get("user", "")
    if not isinstance(user, str):
        raise ApiError(400, "'user' must be a string.", param="user")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string.", param="model")
    return ChatRequest(
        messages=messages,
        sampling=sampling,
        max_tokens_given=max_tokens is not None,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        stop=_stop(body.get("stop")),
        user=user,
        tools=tools,
        tool_choice=tool_choice,
        model=model.strip(),
    )


def _tools(value: Any) -> tuple[ToolSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be an array of at most {MAX_TOOLS} tools.", param="tools")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or any(t.name == name for t in tools):
            raise ApiError(
                400,
                f'tools[{i}] must be {{"type": "function", "function": {{"name": …}}}} '
                "with a unique name of letters, digits, _, . or -.",
                param=f"tools[{i}]",
            )
        assert isinstance(function, dict)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        description = function.get("description", "")
        if not isinstance(parameters, dict) or not isinstance(description, str):
            raise ApiError(
                400,
                f"tools[{i}].function: 'parameters' must be a JSON schema object and 'description' a string.",
                param=f"tools[{i}].function",
            )
        tools.append(ToolSpec(name, "api", description, parameters, name))
    return tuple(tools)


def _tool_choice(value: Any, tools: Sequence[ToolSpec]) -> str:
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str) and value in TOOL_CHOICES:
        choice = value
    elif (
        isinstance(value, dict)
        and value.get("type") == "function"
        and isinstance(value.get("function"), dict)
        and isinstance(value["function"].get("name"), str)
    ):
        choice = value["function"]["name"]
        if not any(tool.name == choice for tool in tools):
            raise ApiError(400, f"tool_choice names {choice!r}, which is not in 'tools'.", param="tool_choice")
    else:
        raise ApiError(
            400,
            '\'tool_choice\' must be "auto", "none", "required" or {"type": "function", "function": {"name": …}}.',
            param="tool_choice",
        )
    if choice != "none" and not tools:
        raise ApiError(400, f"tool_choice {choice!r} needs 'tools'.", param="tool_choice")
    return choice


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = ROLES.get(raw) if isinstance(raw := message.get("role"), str) else None  # a list is unhashable
        if role is None:
            raise ApiError(
                400,
                f"messages[{i}].role must be one of {', '.join(ROLES)}, not {message.get('role')!r}.",
                param=f"messages[{i}].role",
            )
        entry: dict[str, Any] = {"role": role, "content": _content(message.get("content"), i, role)}
        if role == "assistant" and message.get("tool_calls") is not None:
            entry["tool_calls"] = _calls(message["tool_calls"], i)
        messages.append(entry)
    if messages[-1]["role"] not in ("user", "tool"):
        raise ApiError(
            400,
            "The last message must be the user's (or a tool's result).",
            param=f"messages[{len(messages) - 1}].role",
        )
    return messages


def _calls(value: Any, i: int) -> list[ToolCall]:
    """An assistant message's ``tool_calls``: each a function's name and its arguments as a JSON object text."""
    param = f"messages[{i}].tool_calls"
    if not isinstance(value, list):
        raise ApiError(400, f"{param} must be an array.", param=param)
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(name, str) or not name or not isinstance(parsed, dict):
            raise ApiError(
                400, f"{param}: each call needs a function name and its arguments as a JSON object text.", param=param
            )
        calls.append(ToolCall(name, parsed))
    return calls


def _content(content: Any, i: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # an assistant turn that only called tools
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f"messages[{i}].content: only text parts are supported.", param=f"messages[{i}].content"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(
        400, f"messages[{i}].content must be a string or an array of text parts.", param=f"messages[{i}].content"
    )


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
    if (
        stops is None
        or len(stops) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise ApiError(
            400,
            f"'stop' must be a string or an array of at most {MAX_STOP_STRINGS} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters.",
            param="stop",
        )
    return tuple(stops)


class StopCutter:
    """Ends a streamed text just before the first stop string to complete, holding back any tail that may be
    the start of one; the result is the same however the text is split into pieces."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is sure to be shown."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buffer = self._held + text
        # Held text holds no whole stop string, so any found ends in the new text: the earliest end came first.
        found = [(i + len(stop), i) for stop in self.stops if (i := buffer.find(stop)) >= 0]
        if found:
            self.stopped, self._held = True, ""
            return buffer[: min(found)[1]]
        hold = next(
            (
                n
                for n in range(min(len(buffer), max(map(len, self.stops)) - 1), 0, -1)
                if any(stop.startswith(buffer[-n:]) for stop in self.stops)
            ),
            0,
        )
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """What was held back, now that the text has ended without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
