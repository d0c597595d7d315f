"""The tool-call grammar with the real llama.cpp engine and the small model: it compiles for every syntax, and
it makes the model call a tool that the parser reads back and the real MCP server answers."""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import pytest

from bot.config import SamplingSettings, ToolServerSettings, ToolsSettings
from bot.engine import Engine
from bot.errors import EngineError
from bot.tools import ToolSpec, ToolSupervisor
from bot.tools.grammar import call_grammar
from bot.tools.syntax import CallParsed, CallStarted, ParseEvent, ToolCallParser, ToolSyntax, render_tools, tool_format

SERVER = str(Path(__file__).with_name("mcp_server.py"))
# Schemas of the shapes MCP servers send: strings, numbers, a $ref into $defs, an enum, no arguments at all.
VARIED = [
    ToolSpec(
        "search",
        "s",
        "Search.",
        {
            "type": "object",
            "title": "searchArguments",
            "required": ["query"],
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
        },
        "Searching",
    ),
    ToolSpec(
        "ticket",
        "s",
        "Open a ticket.",
        {
            "type": "object",
            "$defs": {"Level": {"enum": ["low", "high"]}},
            "properties": {
                "level": {"$ref": "#/$defs/Level"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "score": {"type": "number"},
            },
            "required": ["level"],
        },
        "Opening a ticket",
    ),
    ToolSpec("now", "s", "The time.", {"type": "object"}, "Reading the clock"),
]


async def _text(
    engine: Engine, prompt: list[int], sampling: SamplingSettings, parser: ToolCallParser | None = None
) -> tuple[str, list[ParseEvent]]:
    text, events = "", []
    async for event in engine.submit(prompt, sampling):
        if isinstance(event, str):
            text += event
            if parser is not None:
                events.extend(parser.feed(event))
    if parser is not None:
        events.extend(parser.finish())
    return text, events


@pytest.mark.parametrize("syntax", list(ToolSyntax))
@pytest.mark.parametrize("with_opening", [True, False])
async def test_the_grammar_of_every_syntax_compiles_in_llama_cpp(
    engine: Engine, syntax: ToolSyntax, with_opening: bool
) -> None:
    grammar = call_grammar(VARIED, syntax, with_opening=with_opening)
    prompt = engine.chat_tokens([{"role": "user", "content": "Open a ticket."}])
    try:
        text, _ = await _text(engine, prompt, SamplingSettings(max_tokens=6, temperature=0.0, grammar=grammar))
    except EngineError as exc:  # llama.cpp refused the grammar
        pytest.fail(f"llama.cpp refused the {syntax} grammar: {exc}")
    opening = {"hermes": "<tool_call>", "llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}[syntax]
    assert text.startswith(opening[:4] if with_opening else ("[" if syntax is ToolSyntax.MISTRAL else "{"))


def test_a_grammar_needs_a_tool() -> None:
    with pytest.raises(ValueError, match="at least one tool"):
        call_grammar([], ToolSyntax.HERMES)


async def test_the_model_made_to_call_a_tool_is_read_back_and_answered(engine: Engine) -> None:
    settings = ToolsSettings(servers=[ToolServerSettings(name="test", command=sys.executable, args=[SERVER])])
    async with ToolSupervisor(settings) as supervisor:
        add = supervisor.registry.get("add")
        assert add is not None
        form = tool_format(engine.chat_template.source)  # SmolLM2: ChatML, no tools in its template
        assert form.syntax is ToolSyntax.HERMES and not form.template_renders_tools
        prompt = engine.chat_tokens(
            [
                {"role": "system", "content": "You are a helpful assistant.\n\n" + render_tools([add], form.syntax)},
                {"role": "user", "content": "What is 2 plus 3?"},
            ]
        )
        grammar = call_grammar([add], form.syntax, with_opening=True)
        text, events = await _text(
            engine,
            prompt,
            SamplingSettings(max_tokens=96, temperature=0.0, grammar=grammar),
            ToolCallParser(form.syntax),
        )
        assert text.startswith("<tool_call>") and text.rstrip().endswith("</tool_call>"), text
        assert isinstance(events[0], CallStarted), events
        calls = [event.call for event in events if isinstance(event, CallParsed)]
        assert len(calls) == 1 and calls[0].name == "add", events
        jsonschema.validate(dict(calls[0].arguments), dict(add.input_schema))
        result = await supervisor.call(calls[0].name, calls[0].arguments)
        assert not result.is_error
        assert result.text == str(calls[0].arguments["a"] + calls[0].arguments["b"])
