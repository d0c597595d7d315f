"""``tools`` and ``tool_calls`` on /v1, as llama-server does with ``--jinja``: the tools are offered in the
model's own syntax, its output is split into text and calls, and a call's JSON is held to the tools' schemas
by a grammar. The caller runs the tools itself and sends the results back as ``tool`` messages: this API never
runs the bot's MCP tools.

``tool_choice``: "auto" lets the model choose (once it writes a call's opening, the rest is generated again
under the grammar), "required" or one named function makes it call (a grammar from the first token), "none"
offers nothing.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapters.openai_api.schema import ApiError, ChatRequest, StopCutter
from bot.engine import Generation, QueuePosition
from bot.tools.registry import ToolSpec
from bot.tools.syntax import (
    CallParsed,
    CallStarted,
    TextPiece,
    ToolCall,
    ToolCallParser,
    ToolFormat,
    format_call,
    render_tools,
    tool_format,
)

if TYPE_CHECKING:
    from bot.engine.embedded import Engine

__all__ = ["ToolTurn", "model_format", "prompt_messages", "call_json"]

AUTO, NONE, REQUIRED = "auto", "none", "required"


def model_format(engine: Engine) -> ToolFormat:
    """The engine's model's tool-call syntax, from its chat template (read once per template)."""
    return _format_of(engine.chat_template.source)


@functools.lru_cache(maxsize=8)
def _format_of(template: str | None) -> ToolFormat:
    return tool_format(template)


def prompt_messages(chat: ChatRequest, fmt: ToolFormat) -> list[dict[str, str]]:
    """The request's messages as the chat template takes them: an assistant's tool calls written in the model's
    syntax, ``tool`` results as a user turn of ``<tool_response>`` blocks (as the bot's own tool loop feeds them
    back), and the offered tools in the system prompt."""
    messages: list[dict[str, str]] = []
    after_tool = False
    for message in chat.messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if after_tool:
                messages[-1]["content"] += "\n" + block
            else:
                messages.append({"role": "user", "content": block})
            after_tool = True
            continue
        after_tool = False
        calls: Sequence[ToolCall] = message.get("tool_calls") or ()
        content = str(message["content"]) + "".join(format_call(call, fmt.syntax) for call in calls)
        messages.append({"role": str(message["role"]), "content": content})
    if chat.tools and chat.tool_choice != NONE:
        offer = render_tools(offered(chat), fmt.syntax)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{offer}"}
        else:
            messages.insert(0, {"role": "system", "content": offer})
    return messages


def offered(chat: ChatRequest) -> list[ToolSpec]:
    """The tools the model may call: all of them, or the one ``tool_choice`` names."""
    if chat.tool_choice in (AUTO, REQUIRED, NONE):
        return list(chat.tools)
    return [tool for tool in chat.tools if tool.name == chat.tool_choice]


def call_json(call: ToolCall) -> dict[str, Any]:
    """One call in OpenAI's shape (its arguments a JSON string)."""
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(dict(call.arguments), ensure_ascii=False)},
    }


@dataclass
class ToolTurn:
    """One completion that may call tools: text pieces as they come (`texts`), then `calls`. Holds every
    generation it starts, so the handler can cancel and count them."""

    engine: Engine
    chat: ChatRequest
    fmt: ToolFormat
    session: str
    generations: list[Generation] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    cutter: StopCutter = field(init=False)

    def __post_init__(self) -> None:
        self.cutter = StopCutter(self.chat.stop)

    def _submit(self, prompt: list[int], grammar: str | None) -> Generation:
        sampling = self.chat.sampling.model_copy(update={"grammar": grammar})
        generation = self.engine.submit(prompt, sampling, session=self.session)
        self.generations.append(generation)
        return generation

    def grammar(self, *, with_opening: bool) -> str:
        from bot.tools.grammar import call_grammar  # llama.cpp's converter: loaded only when tools are asked for

        try:
            return call_grammar(offered(self.chat), self.fmt.syntax, with_opening=with_opening)
        except Exception as exc:  # the converter asserts, raises KeyError, ValueError…: the caller's schema, a 400
            raise ApiError(
                400, f"The tools' parameters could not be made into a grammar: {exc}", param="tools"
            ) from None

    @property
    def forced(self) -> bool:
        return self.chat.tool_choice not in (AUTO, NONE)

    def start(self, prompt: list[int]) -> None:
        """Queue the first generation (raises `QueueFull` or `EngineError` before any answer is sent); a schema
        the grammar converter refuses raises a 400 first."""
        grammar = self.grammar(with_opening=self.forced)
        self.grammar(with_opening=False)
        self._submit(prompt, grammar if self.forced else self.chat.sampling.grammar)  # /v1 sets none of its own

    async def texts(self, prompt: list[int]) -> AsyncIterator[str]:
        """The reply's text outside calls, cut at the first stop string; the calls land in `calls`. `start`
        queued its first generation."""
        forced = self.forced
        grammar = self.grammar(with_opening=False)
        parser = ToolCallParser(self.fmt.syntax)
        written = ""  # text before a call's opening, for the prompt it is generated again from
        generation = self.generations[0]
        switched = False
        async for event in generation:
            if isinstance(event, QueuePosition):
                continue
            for parsed in parser.feed(event):
                if isinstance(parsed, TextPiece):
                    written += parsed.text
                    if text := self.cutter.feed(parsed.text):
                        yield text
                    if self.cutter.stopped:
                        generation.cancel()
                        return
                elif isinstance(parsed, CallStarted) and not forced and not switched:
                    switched = True
                    generation.cancel()
                elif isinstance(parsed, CallParsed):
                    self.calls.append(parsed.call)
            if switched:
                break
        if switched:  # the call again, from its opening, under the tools' grammar
            tail = list(prompt) + self.engine.tokenize(written) + self.engine.tokenize(self.fmt.opening, special=True)
            parser = ToolCallParser(self.fmt.syntax)
            parser.feed(self.fmt.opening)
            async for event in self._submit(tail, grammar):
                if isinstance(event, str):
                    self.calls += [p.call for p in parser.feed(event) if isinstance(p, CallParsed)]
        for parsed in parser.finish():
            if isinstance(parsed, CallParsed):
                self.calls.append(parsed.call)
            elif isinstance(parsed, TextPiece) and (text := self.cutter.feed(parsed.text)):
                yield text
        if rest := self.cutter.flush():
            yield rest

    def cancel(self) -> None:
        for generation in self.generations:
            if generation.finish_reason is None:
                generation.cancel()

    @property
    def n_generated(self) -> int:
        return sum(generation.n_generated for generation in self.generations)

    @property
    def last(self) -> Generation | None:
        return self.generations[-1] if self.generations else None
