"""Tool servers' health where an operator looks: /readyz details and /metrics, over real HTTP on 127.0.0.1,
with the real manager and the test MCP server as a real process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import aiohttp

from adapters.ops import OpsServer, create_app
from bot.app import start_tools
from bot.config import Settings, ToolServerSettings, ToolsSettings
from bot.conversations import ConversationManager

SERVER = str(Path(__file__).with_name("mcp_server.py"))


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def test_readyz_and_metrics_report_each_tool_server(manager: ConversationManager, settings: Settings) -> None:
    settings.tools = ToolsSettings(
        restart_delay=30,
        servers=[
            ToolServerSettings(name="test", command=sys.executable, args=[SERVER]),
            ToolServerSettings(name="ghost", command="/nonexistent/mcp-server"),
        ],
    )
    tools = await start_tools(settings, manager)
    assert tools is not None
    server = OpsServer(create_app(manager, tools=tools), "127.0.0.1", 0)
    try:
        url = await server.start()
        status, text = await _get(url + "readyz")
        body = json.loads(text)
        assert body["tools"] == {"test": "up, 8 tools", "ghost": "down: command not found: /nonexistent/mcp-server"}
        # Details only: a dead tool server does not make the bot unready.
        assert body["ready"] == all(v in ("ok", "connected") for v in body["checks"].values())
        assert status == (200 if body["ready"] else 503)
        _, metrics = await _get(url + "metrics")
        assert 'llamarelay_tool_server_up{server="test"} 1.0' in metrics
        assert 'llamarelay_tool_server_up{server="ghost"} 0.0' in metrics
        assert 'llamarelay_tool_server_tools{server="test"} 8.0' in metrics
    finally:
        await server.close()
        await tools.aclose()


async def test_without_tool_servers_nothing_starts_and_readyz_lists_none(
    manager: ConversationManager, settings: Settings
) -> None:
    assert await start_tools(settings, manager) is None
    server = OpsServer(create_app(manager), "127.0.0.1", 0)
    try:
        url = await server.start()
        assert "tools" not in json.loads((await _get(url + "readyz"))[1])
        assert "llamarelay_tool_server" not in (await _get(url + "metrics"))[1]
    finally:
        await server.close()
