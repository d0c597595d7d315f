"""/v1 with ``tools``: the official ``openai`` client's tool API against the real engine and small model, which
``tool_choice`` holds to a call with the tools' GBNF grammar; the caller runs the tool and sends its result."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import openai
import pytest

from adapters.openai_api.schema import ApiError, parse_chat_request
from adapters.openai_api.tool_calls import ToolTurn, model_format, prompt_messages
from bot.engine import Engine
from tests.conftest import MODEL_PATH
from tests.test_openai_api import DEFAULTS, TOKEN, api, post, stream  # noqa: F401

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "required": ["a", "b"],
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        },
    },
}
ASK = [{"role": "user", "content": "What is 2 plus 3? Use the add tool."}]
MODEL = MODEL_PATH.stem  # the default model's name, as /v1/models lists it


async def test_the_openai_client_gets_a_tool_call_whole_and_streamed(api: str) -> None:
    async with openai.AsyncOpenAI(base_url=api, api_key=TOKEN, max_retries=0) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[ADD, WEATHER], tool_choice="required", max_tokens=60
        )  # type: ignore[arg-type,list-item]
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name in ("add", "weather") and call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        if call.function.name == "add":
            assert set(arguments) == {"a", "b"} and all(isinstance(v, int) for v in arguments.values())
        else:
            assert arguments["city"] in ("Paris", "Oslo")  # the schema's enum held, by the grammar
        assert "<tool_call>" not in (choice.message.content or "")

        chunks = await client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[ADD, WEATHER],
            stream=True,
            max_tokens=60,  # type: ignore[arg-type,list-item]
            tool_choice={"type": "function", "function": {"name": "weather"}},
        )
        streamed: list[Any] = []
        finish = None
        async for chunk in chunks:
            if chunk.choices:
                streamed += chunk.choices[0].delta.tool_calls or []
                finish = chunk.choices[0].finish_reason or finish
        [piece] = streamed
        assert finish == "tool_calls" and piece.function.name == "weather"
        assert json.loads(piece.function.arguments or "")["city"] in ("Paris", "Oslo")

        # The caller ran the tool: its result goes back as a tool message; "none" offers no tools this time.
        answer = await client.chat.completions.create(
            model=MODEL,
            tool_choice="none",
            tools=[ADD],
            max_tokens=8,
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "content": None,  # type: ignore[list-item]
                    "tool_calls": [call.model_dump()],
                },
                {"role": "tool", "tool_call_id": call.id, "content": "5"},
            ],
        )
        assert answer.choices[0].message.tool_calls is None
        assert answer.choices[0].finish_reason in ("stop", "length")


async def test_raw_chunks_carry_one_whole_call_and_usage(api: str) -> None:
    items = await stream(
        api,
        {
            "messages": ASK,
            "tools": [ADD],
            "tool_choice": "required",
            "max_tokens": 60,
            "stream_options": {"include_usage": True},
        },
    )
    assert items[-1] == "[DONE]"
    calls = [c for item in items[:-1] for choice in item["choices"] for c in choice["delta"].get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["add"] and calls[0]["index"] == 0
    assert items[-2]["usage"]["completion_tokens"] > 0 and items[-3]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_schema_the_grammar_cannot_take_is_a_400(api: str) -> None:
    bad = {
        "type": "function",
        "function": {"name": "odd", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}},
    }
    status, body = await post(api, {"messages": ASK, "tools": [bad], "tool_choice": "required"})
    assert status == 400 and body["error"]["param"] == "tools", body


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"tools": "add"}, "tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0]"),
        ({"tools": [ADD, ADD]}, "tools[1]"),
        ({"tools": [ADD], "tool_choice": "always"}, "tool_choice"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "weather"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [ADD["function"]]}, "functions"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}
                        ],
                    },
                    {"role": "tool", "content": "5"},
                ]
            },
            "messages[1].tool_calls",
        ),
    ],
)
def test_bad_tools_are_400s_naming_the_field(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_chat_request({"messages": ASK, **changes}, DEFAULTS)
    assert refused.value.status == 400 and refused.value.param == param


def test_a_tool_result_may_end_the_messages_and_tools_default_to_auto() -> None:
    chat = parse_chat_request(
        {
            "tools": [ADD],
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "1", "content": "5"},
            ],
        },
        DEFAULTS,
    )
    assert chat.tool_choice == "auto" and [t.name for t in chat.tools] == ["add"]
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool"]
    assert chat.messages[1]["tool_calls"][0].arguments == {"a": 2, "b": 3}


async def test_auto_lets_the_model_start_a_call_and_the_grammar_finishes_it(engine: Engine) -> None:
    # The model is made to write some text and a call's opening (a grammar on its first generation, which /v1
    # itself never sets); from the opening on, the tools' grammar writes the call.
    chat = parse_chat_request({"messages": ASK, "tools": [ADD], "max_tokens": 60}, DEFAULTS)
    chat = dataclasses.replace(
        chat,
        sampling=chat.sampling.model_copy(
            update={"grammar": 'root ::= "Sure. <tool_call>\\n{\\"name\\": \\"nothing\\"}"'}
        ),
    )
    fmt = model_format(engine)
    turn = ToolTurn(engine, chat, fmt, "test")
    prompt = engine.chat_tokens(prompt_messages(chat, fmt))
    turn.start(prompt)
    text = "".join([piece async for piece in turn.texts(prompt)])
    assert text.strip() == "Sure."
    [call] = turn.calls
    assert call.name == "add" and set(call.arguments) == {"a", "b"}  # not "nothing": the tools' grammar wrote it
    assert len(turn.generations) == 2
