"""Replies that call tools on a remote model server (``[engine] backend = "openai"``): a real server process that
records each request and streams a ``tool_calls`` reply (tests/recording_server.py), the real MCP server process,
and a real store. The calls go out as OpenAI ``tools``, come back as ``tool_calls`` and return as ``tool`` messages."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.access import AccessPolicy
from bot.config import Settings, ToolGrant, ToolServerSettings, ToolsSettings
from bot.conversations import ConversationManager
from bot.conversations.tools import Toolbox
from bot.store import Store
from bot.tools import ToolSupervisor
from bot.types import SessionKey
from bot.wording import tool_running, tools_used
from tests.conversations.helpers import Target, message
from tests.pictures import recorded_manager
from tests.recording_server import CALL_ID, REPLY, RecordingServer, answer_for

SERVER = str(Path(__file__).resolve().parent.parent / "tools" / "mcp_server.py")
DM = SessionKey.for_dm("test", "u1")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, "remote-test").start()
    yield server
    await server.stop()


async def remote_with_tools(
    settings: Settings, store: Store, server: RecordingServer, max_rounds: int
) -> AsyncIterator[ConversationManager]:
    tools = ToolsSettings(
        servers=[ToolServerSettings(name="test", command=sys.executable, args=[SERVER])],
        allow=[ToolGrant(places=["test/dm/*"], tools=["add", "pid"])],
        max_rounds=max_rounds,
    )
    async with ToolSupervisor(tools) as supervisor, recorded_manager(settings, store, server, vision=False) as manager:
        manager.use_tools(Toolbox(supervisor, AccessPolicy(tool_grants=tools.allow), tools))
        yield manager


async def test_a_remote_models_tool_call_runs_and_its_result_goes_back_as_a_tool_message(
    settings: Settings, store: Store, server: RecordingServer
) -> None:
    async for manager in remote_with_tools(settings, store, server, max_rounds=1):
        target = Target()
        result = await manager.respond(message("What is 2 plus 3?", DM), target)
    assert result.status == "complete", result
    assert result.text == f"Let me check.\n\n{answer_for('5')}"
    assert result.notes == [tools_used(["Adding numbers"])] and result.tool_details
    assert any(tool_running("Adding numbers") in text for _, text in target.calls)  # the 🔧 line while it ran
    [call] = await store.tool_calls(result.reply_id or 0)
    assert (call.tool, call.arguments, call.result) == ("add", '{"a": 2, "b": 3}', "5")

    first, second = [request["body"] for request in server.requests()]
    assert [t["function"]["name"] for t in first["tools"]] == ["add", "pid"] and first["tool_choice"] == "auto"
    assert first["tools"][0]["function"]["parameters"]["properties"].keys() == {"a", "b"}
    assistant, tool = second["messages"][-2:]
    assert assistant == {
        "role": "assistant",
        "content": "Let me check. ",
        "tool_calls": [
            {"id": CALL_ID, "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
        ],
    }
    assert tool == {"role": "tool", "tool_call_id": CALL_ID, "content": "5"}
    assert second["tool_choice"] == "none"  # max_rounds = 1: the last round answers without tools
    assert "<tool_call>" not in first["messages"][0].get("content", "")  # no tools in the prompt's text


async def test_a_place_without_a_grant_sends_no_tools(
    settings: Settings, store: Store, server: RecordingServer
) -> None:
    async for manager in remote_with_tools(settings, store, server, max_rounds=2):
        channel = SessionKey.for_channel("test", "guild1", "chan1")
        result = await manager.respond(message("What is 2 plus 3?", channel), Target())
    assert result.text == REPLY
    [request] = server.requests()
    assert "tools" not in request["body"] and "tool_choice" not in request["body"]
