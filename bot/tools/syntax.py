"""How a model writes tool calls: which syntax its chat template uses, the tools as prompt text for a template
that does not take them, and a parser that splits the model's output into text and calls as it streams.

Three syntaxes cover the open models in use:
- Hermes / Qwen: ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``, any number, text around them;
- Llama 3.1: ``{"name": …, "parameters": {…}}`` as the whole reply, or after ``<|python_tag|>``;
- Mistral: ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`` (v3), or ``[TOOL_CALLS]name[ARGS]{…}`` (v11).
A template that shows none of them gets the Hermes syntax, explained in the prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import jinja2
import jinja2.meta

from bot.tools.registry import ToolSpec

__all__ = [
    "ToolSyntax",
    "ToolFormat",
    "ToolCall",
    "TextPiece",
    "CallStarted",
    "CallParsed",
    "CallInvalid",
    "ParseEvent",
    "ToolCallParser",
    "tool_format",
    "tool_definitions",
    "render_tools",
    "format_call",
    "parse_tool_calls",
]


class ToolSyntax(StrEnum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"


OPENING = {ToolSyntax.HERMES: "<tool_call>", ToolSyntax.LLAMA3: "<|python_tag|>", ToolSyntax.MISTRAL: "[TOOL_CALLS]"}
"""The text that starts a call; the engine constrains what follows with the tools' grammar."""
CLOSING = "</tool_call>"  # Hermes only; the other syntaxes end where the JSON does
ARGUMENTS_KEY = {ToolSyntax.HERMES: "arguments", ToolSyntax.LLAMA3: "parameters", ToolSyntax.MISTRAL: "arguments"}
_BARE_START = '{"name"'  # Llama 3.1 also writes a call as a bare JSON object: the reply starts with this


@dataclass(frozen=True)
class ToolFormat:
    """A chat template's tool-call syntax, and whether the template renders a ``tools`` list itself (else
    `render_tools` goes into the system prompt)."""

    syntax: ToolSyntax
    template_renders_tools: bool

    @property
    def opening(self) -> str:
        return OPENING[self.syntax]


def tool_format(chat_template: str | None) -> ToolFormat:
    """The tool format of a model from its Jinja chat template (None: the model has none)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        syntax = ToolSyntax.MISTRAL
    elif "<|python_tag|>" in template or ("<|start_header_id|>" in template and "ipython" in template):
        syntax = ToolSyntax.LLAMA3
    else:  # "<tool_call>" (Qwen, Hermes), and the fallback for templates without a syntax of their own
        syntax = ToolSyntax.HERMES
    return ToolFormat(syntax, _uses_variable(template, "tools"))


def _uses_variable(template: str, name: str) -> bool:
    try:
        return name in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateError:
        return False


def tool_definitions(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """The tools in OpenAI's shape, which chat templates (and remote servers) take as ``tools``."""
    return [
        {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": dict(tool.input_schema)},
        }
        for tool in tools
    ]


def render_tools(tools: Sequence[ToolSpec], syntax: ToolSyntax) -> str:
    """System-prompt text offering ``tools`` in ``syntax``, for a template that does not take them."""
    definitions = "\n".join(json.dumps(d, ensure_ascii=False) for d in tool_definitions(tools))
    if syntax is ToolSyntax.LLAMA3:
        return (
            "You have access to the following functions. To call one, respond with only a JSON object in the "
            'format {"name": function name, "parameters": dictionary of argument name and its value}. '
            "Do not use variables.\n\n" + definitions
        )
    if syntax is ToolSyntax.MISTRAL:
        return (
            "You have access to the following tools. To call tools, respond with [TOOL_CALLS] followed by a "
            'JSON list: [TOOL_CALLS][{"name": <tool-name>, "arguments": <args-json-object>}]\n\n'
            f"[AVAILABLE_TOOLS]\n{definitions}\n[/AVAILABLE_TOOLS]"
        )
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{definitions}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


def format_call(call: ToolCall, syntax: ToolSyntax) -> str:
    """``call`` written the way a model of ``syntax`` writes it (for tests, and for stored turns re-rendered)."""
    body = json.dumps({"name": call.name, ARGUMENTS_KEY[syntax]: dict(call.arguments)}, ensure_ascii=False)
    if syntax is ToolSyntax.HERMES:
        return f"<tool_call>\n{body}\n</tool_call>"
    if syntax is ToolSyntax.MISTRAL:
        return f"[TOOL_CALLS][{body}]"
    return f"<|python_tag|>{body}"


# Parser events, in the order the text arrives.
@dataclass(frozen=True)
class TextPiece:
    """Reply text outside any call."""

    text: str


@dataclass(frozen=True)
class CallStarted:
    """A call's opening was written: from here the engine can constrain the output with the tools' grammar."""


@dataclass(frozen=True)
class CallParsed:
    call: ToolCall


@dataclass(frozen=True)
class CallInvalid:
    """A call that could not be read: ``raw`` is what the model wrote after the opening."""

    raw: str
    reason: str


ParseEvent = TextPiece | CallStarted | CallParsed | CallInvalid
_DECODER = json.JSONDecoder()


class ToolCallParser:
    """Splits a model's streamed output into text and tool calls; feed it each text delta, then `finish`.

    Text that may be the start of a call's opening is held back until it is clear either way, so no event
    depends on how the output was cut into deltas.
    """

    def __init__(self, syntax: ToolSyntax) -> None:
        self.syntax = syntax
        self._opening = OPENING[syntax]
        self._pending = ""  # text not yet turned into events
        self._in_call = False
        self._started = False  # any text or call seen: a bare Llama call must come first
        self._bare = False  # the current call is a bare JSON object (Llama 3.1), not after an opening

    @property
    def in_call(self) -> bool:
        return self._in_call

    def feed(self, delta: str) -> list[ParseEvent]:
        self._pending += delta
        events: list[ParseEvent] = []
        while self._step(events, final=False):
            pass
        return _merge_text(events)

    def finish(self) -> list[ParseEvent]:
        """Events for the output's end: held-back text, or a call left unfinished."""
        events: list[ParseEvent] = []
        while self._step(events, final=True):
            pass
        if self._in_call:
            events.extend(self._close_call(self._pending, final=True) or [])  # final: never None
        elif self._pending:
            events.append(TextPiece(self._pending))
        self._pending = ""
        return _merge_text(events)

    def _step(self, events: list[ParseEvent], *, final: bool) -> bool:
        """Turn what can be decided of the pending text into events; True while progress is made."""
        if self._in_call:
            found = self._close_call(self._pending, final=False)
            if found is None:
                return False
            events.extend(found)
            return True
        if self.syntax is ToolSyntax.LLAMA3 and not self._started:
            compact = re.sub(r"\s+", "", self._pending[:64])
            if compact.startswith(_BARE_START):
                self._enter_call(events, bare=True)
                return True
            if _BARE_START.startswith(compact) and not final:
                return False  # may still become a bare call
            self._started = bool(self._pending)
        index = self._pending.find(self._opening)
        if index >= 0:
            if index:
                events.append(TextPiece(self._pending[:index]))
            self._pending = self._pending[index + len(self._opening) :]
            self._enter_call(events, bare=False)
            return True
        keep = 0 if final else _partial_suffix(self._pending, self._opening)
        if len(self._pending) > keep:
            events.append(TextPiece(self._pending[: len(self._pending) - keep]))
            self._pending = self._pending[len(self._pending) - keep :]
            self._started = True
        return False

    def _enter_call(self, events: list[ParseEvent], *, bare: bool) -> None:
        self._in_call, self._started, self._bare = True, True, bare
        events.append(CallStarted())

    def _close_call(self, payload: str, *, final: bool) -> list[ParseEvent] | None:
        """The events of a call whose payload is complete (the rest goes back to being text), or None while it
        is not; at the output's end (``final``) whatever there is becomes a call or an invalid one."""
        if self.syntax is ToolSyntax.HERMES:
            end = _find_outside_strings(payload, CLOSING)  # a "</tool_call>" in an argument does not end it
            if end < 0 and not final:
                return None
            body, rest = (payload[:end], payload[end + len(CLOSING) :]) if end >= 0 else (payload, "")
            events = [_read_call(body, self.syntax)]
        else:
            decoded = self._decode_payload(payload)
            if decoded is None:
                if not final:
                    return None
                events, rest = [CallInvalid(payload, "the call's JSON is incomplete or invalid")], ""
            else:
                events, rest = decoded
        self._in_call = self._bare = False
        self._pending = rest
        return events

    def _decode_payload(self, payload: str) -> tuple[list[ParseEvent], str] | None:
        """A JSON call (or Mistral's list of calls) at the start of ``payload``: its events and the text after
        it; None while it may still complete."""
        start = _first_char(payload)
        if start is None:
            return None
        if self.syntax is ToolSyntax.MISTRAL and payload[start] != "[":
            # v11: name[ARGS]{…}, with an optional [CALL_ID]id between
            marker = payload.find("[ARGS]")
            if marker < 0:
                return None
            name = payload[:marker].split("[CALL_ID]")[0].strip()
            decoded = self._decode_payload_object(payload, marker + len("[ARGS]"))
            if decoded is None or not isinstance(decoded[0][0], CallParsed):
                return decoded
            (parsed,), rest = decoded
            assert isinstance(parsed, CallParsed)
            if not name:
                return [CallInvalid(payload[:marker], "a call needs a name")], rest
            return [CallParsed(ToolCall(name, parsed.call.arguments))], rest
        opener = "[" if self.syntax is ToolSyntax.MISTRAL else "{"
        if payload[start] != opener:  # decided by one character, so no delta boundary can change it
            return [CallInvalid("", f"no JSON {'list' if opener == '[' else 'object'} after the opening")], payload
        try:
            value, end = _DECODER.raw_decode(payload, start)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        raw = payload[start:end]
        events: list[ParseEvent] = [_call_from(item, raw) for item in items] or [
            CallInvalid(raw, "an empty list of calls")
        ]
        return events, payload[end:]

    @staticmethod
    def _decode_payload_object(payload: str, offset: int) -> tuple[list[ParseEvent], str] | None:
        """Mistral v11's arguments object at ``offset``, as a call event without a name yet."""
        start = _first_char(payload, offset)
        if start is None:
            return None
        if payload[start] != "{":
            return [CallInvalid(payload[:offset], "no JSON object of arguments after [ARGS]")], payload[offset:]
        try:
            value, end = _DECODER.raw_decode(payload, start)
        except json.JSONDecodeError:
            return None
        return [CallParsed(ToolCall("-", value))], payload[end:]


def _first_char(text: str, offset: int = 0) -> int | None:
    """Index of the first character at or after ``offset`` that is not white space; None if there is none."""
    for index in range(offset, len(text)):
        if not text[index].isspace():
            return index
    return None


def _read_call(body: str, syntax: ToolSyntax) -> ParseEvent:
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return CallInvalid(body, f"the call is not valid JSON: {exc.msg}")
    return _call_from(value, body)


def _call_from(value: Any, raw: str) -> ParseEvent:
    """A call from ``{"name": …, "arguments" | "parameters": {…} or a JSON string of it}``."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return CallInvalid(raw, 'a call needs a "name"')
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI's API does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return CallInvalid(raw, "the call's arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return CallInvalid(raw, "the call's arguments are not a JSON object")
    return CallParsed(ToolCall(value["name"], arguments))


def _find_outside_strings(text: str, marker: str) -> int:
    """Index of the first ``marker`` in ``text`` that is not inside a JSON string; -1 if there is none."""
    in_string = escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif text.startswith(marker, index):
            return index
    return -1


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``marker`` (held back: it may complete)."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def _merge_text(events: list[ParseEvent]) -> list[ParseEvent]:
    merged: list[ParseEvent] = []
    for event in events:
        if isinstance(event, TextPiece) and merged and isinstance(merged[-1], TextPiece):
            merged[-1] = TextPiece(merged[-1].text + event.text)
        elif not (isinstance(event, TextPiece) and not event.text):
            merged.append(event)
    return merged


def parse_tool_calls(output: str, syntax: ToolSyntax) -> tuple[str, list[ToolCall], list[CallInvalid]]:
    """A whole output at once: its text outside calls, the calls read, and the calls that could not be."""
    parser = ToolCallParser(syntax)
    events = parser.feed(output) + parser.finish()
    text = "".join(e.text for e in events if isinstance(e, TextPiece))
    return (
        text,
        [e.call for e in events if isinstance(e, CallParsed)],
        [e for e in events if isinstance(e, CallInvalid)],
    )
