"""Tools from MCP servers: the servers' supervisor, the tool registry, results as plain
text, the models' tool-call syntax (prompt, parser, grammar), the calls waiting for Run / Deny (`approvals`) and
a reply's calls as the user expands them (`details`). The reply loops are `bot.conversations.tools` (embedded
engine) and `bot.conversations.remote_tools` (OpenAI's tools API).

The supervisor and results load the MCP SDK, so they are imported on first use: a bot without tool servers
never loads it."""

from __future__ import annotations

from typing import Any

from bot.tools.health import ServerHealth, ServerState
from bot.tools.registry import ToolRegistry, ToolSpec

__all__ = ["ServerHealth", "ServerState", "ToolRegistry", "ToolResult", "ToolSpec", "ToolSupervisor"]


def __getattr__(name: str) -> Any:
    if name == "ToolSupervisor":
        from bot.tools.supervisor import ToolSupervisor

        return ToolSupervisor
    if name == "ToolResult":
        from bot.tools.results import ToolResult

        return ToolResult
    raise AttributeError(name)
