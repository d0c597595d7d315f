"""The tool-call syntax: detection from real templates' tells, prompt text, and the streaming parser, with
hypothesis over arbitrary text and arbitrary cuts into deltas."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bot.prompt import CHATML_TEMPLATE
from bot.tools.registry import ToolSpec
from bot.tools.syntax import (
    CallInvalid,
    CallParsed,
    CallStarted,
    ParseEvent,
    TextPiece,
    ToolCall,
    ToolCallParser,
    ToolSyntax,
    format_call,
    parse_tool_calls,
    render_tools,
    tool_format,
)

# The tool-call parts of real chat templates (Qwen2.5, Llama 3.1, Mistral v3), abridged.
QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- tool | tojson }}"
    "{%- endfor %}{{- '</tools>' }}{%- endif %}{%- for message in messages %}{%- if message.tool_calls %}"
    "{{- '<tool_call>\\n' }}{%- endif %}{%- endfor %}"
)
LLAMA31 = (
    "{%- if tools is not none %}{{- 'Environment: ipython' }}{%- endif %}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}{%- if builtin_tools is defined %}"
    "{{- '<|python_tag|>' }}{%- endif %}{%- endfor %}"
)
MISTRAL = (
    "{%- for message in messages %}{%- if tools is not none and loop.last %}{{- '[AVAILABLE_TOOLS] ' }}"
    "{{- tools|tojson }}{%- endif %}{%- if message.tool_calls %}{{- '[TOOL_CALLS] [' }}{%- endif %}"
    "{%- endfor %}"
)
ADD = ToolSpec(
    "add",
    "test",
    "Add two integers.",
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    "Adding numbers",
)


def test_the_syntax_is_read_from_the_template() -> None:
    assert tool_format(QWEN).syntax is ToolSyntax.HERMES and tool_format(QWEN).template_renders_tools
    assert tool_format(LLAMA31).syntax is ToolSyntax.LLAMA3 and tool_format(LLAMA31).template_renders_tools
    assert tool_format(MISTRAL).syntax is ToolSyntax.MISTRAL and tool_format(MISTRAL).opening == "[TOOL_CALLS]"
    # A template with no tool syntax (SmolLM2's ChatML) gets Hermes', explained in the system prompt.
    plain = tool_format(CHATML_TEMPLATE)
    assert plain.syntax is ToolSyntax.HERMES and not plain.template_renders_tools
    assert tool_format(None) == plain and not tool_format("{% broken").template_renders_tools


def test_rendered_tools_show_the_schema_and_the_syntax_to_answer_in() -> None:
    hermes = render_tools([ADD], ToolSyntax.HERMES)
    assert '"name": "add"' in hermes and '"required": ["a"]' in hermes and "<tool_call>" in hermes
    assert '"parameters"' in render_tools([ADD], ToolSyntax.LLAMA3)
    assert "[TOOL_CALLS]" in render_tools([ADD], ToolSyntax.MISTRAL)


def test_text_calls_and_text_after_them_in_each_syntax() -> None:
    text, calls, invalid = parse_tool_calls(
        'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 2}"}</tool_call>',
        ToolSyntax.HERMES,
    )
    assert (text, calls, invalid) == ("Let me add.\n\n", [ToolCall("add", {"a": 1}), ToolCall("add", {"a": 2})], [])
    assert parse_tool_calls(' {"name": "add", "parameters": {"a": 1}}', ToolSyntax.LLAMA3) == (
        "",
        [ToolCall("add", {"a": 1})],
        [],
    )
    assert parse_tool_calls('{"a": 1} is JSON', ToolSyntax.LLAMA3) == ('{"a": 1} is JSON', [], [])
    assert parse_tool_calls(
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "b", "arguments": {}}]', ToolSyntax.MISTRAL
    )[1] == [ToolCall("add", {"a": 1}), ToolCall("b", {})]
    assert parse_tool_calls('[TOOL_CALLS]add[ARGS]{"a": 3}', ToolSyntax.MISTRAL)[1] == [ToolCall("add", {"a": 3})]


def test_a_broken_call_is_reported_and_the_text_after_it_kept() -> None:
    text, calls, invalid = parse_tool_calls('<tool_call>{"name": add}</tool_call>after', ToolSyntax.HERMES)
    assert (text, calls) == ("after", []) and invalid[0].raw == '{"name": add}'
    assert "not valid JSON" in invalid[0].reason
    assert (
        parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>', ToolSyntax.HERMES)[2][0].reason
        == 'a call needs a "name"'
    )
    unfinished = parse_tool_calls('[TOOL_CALLS][{"name": "add", "argu', ToolSyntax.MISTRAL)
    assert unfinished[1] == [] and unfinished[2][0].raw == '[{"name": "add", "argu'


def test_call_started_comes_as_soon_as_the_opening_is_complete() -> None:
    parser = ToolCallParser(ToolSyntax.HERMES)
    assert parser.feed("Sure <tool_") == [TextPiece("Sure ")]  # "<tool_" may start a call: held back
    assert parser.feed("call>") == [CallStarted()] and parser.in_call
    assert parser.feed('{"name": "add", "arguments": {}}') == []
    assert parser.feed("</tool_call>") == [CallParsed(ToolCall("add", {}))] and not parser.in_call
    assert parser.feed(" <tool_cab") == [TextPiece(" <tool_cab")]
    assert parser.finish() == []


# Hypothesis --------------------------------------------------------------------------------------------------

TRICKY = st.lists(
    st.sampled_from(
        list('<>/_|[]{}":, \nabcdelmnopstuxyzATCLOS')
        + [
            "<tool_call>",
            "</tool_call>",
            "[TOOL_CALLS]",
            "<|python_tag|>",
            '{"name"',
            "[ARGS]",
            '"arguments": {}',
            '"parameters": {}',
            "}",
        ]
    ),
    max_size=40,
).map("".join)
ANY_TEXT = st.one_of(st.text(max_size=200), TRICKY)


def _cuts(text: str, data: st.DataObject) -> list[str]:
    points = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _run(syntax: ToolSyntax, pieces: list[str]) -> list[ParseEvent]:
    parser = ToolCallParser(syntax)
    events: list[ParseEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.finish())
    merged: list[ParseEvent] = []
    for event in events:
        if isinstance(event, TextPiece) and merged and isinstance(merged[-1], TextPiece):
            merged[-1] = TextPiece(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


@settings(max_examples=300, deadline=None)
@given(syntax=st.sampled_from(ToolSyntax), text=ANY_TEXT, data=st.data())
def test_any_text_cut_anywhere_parses_as_it_does_whole(syntax: ToolSyntax, text: str, data: st.DataObject) -> None:
    whole = _run(syntax, [text])
    assert _run(syntax, _cuts(text, data)) == whole
    # Every call that started ends, read or not, and nothing is both text and call.
    assert sum(isinstance(e, CallStarted) for e in whole) <= sum(isinstance(e, CallParsed | CallInvalid) for e in whole)


@settings(max_examples=300, deadline=None)
@given(syntax=st.sampled_from(ToolSyntax), text=st.text(max_size=300), data=st.data())
def test_text_without_a_call_comes_through_unchanged(syntax: ToolSyntax, text: str, data: st.DataObject) -> None:
    assume(all(opening not in text for opening in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")))
    assume(syntax is not ToolSyntax.LLAMA3 or not "".join(text.split()).startswith('{"name"'))
    assert _run(syntax, _cuts(text, data)) == ([TextPiece(text)] if text else [])


# Argument strings may hold any syntax's markers: only the call's JSON structure may end it.
MARKERS = st.sampled_from(
    ["</tool_call>", "<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "[ARGS]", "]", "}", '"', "\\"]
)
STRINGS = st.lists(st.text(max_size=6) | MARKERS, max_size=4).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | STRINGS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
CALLS = st.builds(
    ToolCall,
    name=st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True),
    arguments=st.dictionaries(STRINGS, JSON_VALUES, max_size=4),
)
PLAIN = st.text(max_size=60).filter(
    lambda t: not any(o in t for o in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"))
)


@settings(max_examples=200, deadline=None)
@given(
    syntax=st.sampled_from(ToolSyntax),
    parts=st.lists(st.tuples(PLAIN, CALLS), min_size=1, max_size=3),
    tail=PLAIN,
    data=st.data(),
)
def test_calls_written_between_any_text_are_read_back(
    syntax: ToolSyntax, parts: list[tuple[str, ToolCall]], tail: str, data: st.DataObject
) -> None:
    if syntax is ToolSyntax.LLAMA3:  # its bare form must open the reply: keep the first text from looking like one
        assume(not "".join(parts[0][0].split()).startswith("{"))
    output = "".join(text + format_call(call, syntax) for text, call in parts) + tail
    events = _run(syntax, _cuts(output, data))
    assert [e.call for e in events if isinstance(e, CallParsed)] == [call for _, call in parts]
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == "".join(t for t, _ in parts) + tail
    assert not [e for e in events if isinstance(e, CallInvalid)]
