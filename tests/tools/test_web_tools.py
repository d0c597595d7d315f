"""Tools on the web page's API end to end: the real engine and small model made to call a tool with a GBNF
grammar, the real MCP server process, and the page's own routes: the ``approval`` event, Run / Deny, and the
reply's tool calls behind a disclosure (never in the streamed text)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot.access import AccessPolicy
from bot.config import ToolGrant, ToolOptions, ToolServerSettings, ToolsSettings
from bot.conversations import ConversationManager
from bot.conversations.tools import Toolbox
from bot.tools import ToolSupervisor
from bot.wording import APPROVAL_GONE, TOOL_DENIED_RESULT, tool_asking, tool_denied, tools_used
from tests.conversations.test_tools import call_or
from tests.test_web import Browser, browsers, server  # noqa: F401

SERVER = str(Path(__file__).with_name("mcp_server.py"))
DELETE_CALL = '<tool_call>\n{"name": "delete_file", "arguments": {"path": "notes.txt"}}\n</tool_call>'


@pytest.fixture
async def asking(manager: ConversationManager) -> AsyncIterator[ConversationManager]:
    settings = ToolsSettings(
        servers=[
            ToolServerSettings(
                name="test", command=sys.executable, args=[SERVER], tools={"delete_file": ToolOptions(confirm=True)}
            )
        ],
        allow=[ToolGrant(places=["web/*"])],
        max_rounds=1,
    )
    async with ToolSupervisor(settings) as supervisor:
        manager.use_tools(Toolbox(supervisor, AccessPolicy(tool_grants=settings.allow), settings))
        yield manager


async def test_run_from_the_page_then_the_details_behind_a_disclosure(
    asking: ConversationManager, browsers: Callable[[], Browser]
) -> None:
    browser, other = browsers(), browsers()
    conversation = await browser.new(call_or("done", DELETE_CALL), max_tokens=40)
    stream = await browser.send(conversation, "delete notes.txt")
    _, approval = await stream.until(lambda name, data: name == "approval" and data["id"])
    assert any(
        name == "status" and data["kind"] == "approval" and data["text"] == tool_asking("Deleting a file")
        for name, data in stream.events
    )
    path = f"/api/conversations/{conversation}/approvals/{approval['id']}"
    assert (await other.call("POST", path, json={"run": True}))[0] == 404  # not its conversation: no hints
    assert (await browser.call("POST", path, json={"run": "yes"}))[0] == 400
    assert await browser.call("POST", path, json={"run": True}) == (200, {"answered": True, "run": True})
    done = await stream.done()
    assert ("approval", {"id": None}) in stream.events  # the page takes the buttons away
    assert done["tool_details"] is True and tools_used(["Deleting a file"]) in done["notes"]
    assert "deleted notes.txt" not in stream.shown()
    status, body = await browser.call("POST", path, json={"run": True})
    assert (status, body["message"]) == (404, APPROVAL_GONE)

    status, details = await browser.call("GET", f"/api/conversations/{conversation}/replies/{done['reply_id']}/tools")
    assert status == 200
    assert details["calls"] == [
        {
            "tool": "delete_file",
            "round": 1,
            "arguments": '{"path": "notes.txt"}',
            "result": "deleted notes.txt",
            "is_error": False,
        }
    ]
    history = await browser.conversation(conversation)
    assert [m["tool_details"] for m in history["messages"]] == [False, True]
    foreign = await other.new()
    status, nothing = await other.call("GET", f"/api/conversations/{foreign}/replies/{done['reply_id']}/tools")
    assert (status, nothing) == (200, {"calls": []})  # another browser's reply id shows nothing


async def test_deny_from_the_page(asking: ConversationManager, browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(call_or("done", DELETE_CALL), max_tokens=40)
    stream = await browser.send(conversation, "delete notes.txt")
    _, approval = await stream.until(lambda name, data: name == "approval" and data["id"])
    path = f"/api/conversations/{conversation}/approvals/{approval['id']}"
    assert (await browser.call("POST", path, json={"run": False}))[0] == 200
    done = await stream.done()
    assert tool_denied("Deleting a file") in done["notes"]
    [call] = await asking.store.tool_calls(done["reply_id"])
    assert (call.result, call.is_error) == (TOOL_DENIED_RESULT, True)


async def test_the_page_shows_run_deny_and_a_disclosure_as_plain_text(browsers: Callable[[], Browser]) -> None:
    async with browsers().request("GET", "/static/app.js") as response:
        assert response.status == 200
        page = await response.text()
    assert 'name === "approval"' in page and "/approvals/" in page and 'createElement("details")' in page
    assert "pre.textContent" in page and "innerHTML" not in page
