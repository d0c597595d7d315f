"""Tools from MCP servers: the servers' supervisor, the tool registry, results as plain text, and the models'
tool-call syntax (prompt, parser, grammar). Wiring them into the reply loop is the conversations' job."""

from bot.tools.health import ServerHealth, ServerState
from bot.tools.registry import ToolRegistry, ToolSpec
from bot.tools.results import ToolResult
from bot.tools.supervisor import ToolSupervisor

__all__ = ["ServerHealth", "ServerState", "ToolRegistry", "ToolResult", "ToolSpec", "ToolSupervisor"]
