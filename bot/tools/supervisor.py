"""Every configured MCP server, started with the bot and kept up; tool calls with a timeout and a size cap."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED
from prometheus_client import CollectorRegistry, Gauge

from bot.config import ToolsSettings
from bot.tools.connection import START_TIMEOUT_SECONDS, ServerConnection, describe_error
from bot.tools.health import ServerHealth
from bot.tools.registry import ToolRegistry, ToolSpec
from bot.tools.results import ToolResult, cut, result_text

__all__ = ["ToolSupervisor"]

log = logging.getLogger(__name__)


class ToolSupervisor:
    """Starts each server in ``[[tools.servers]]`` in a task of its own, restarts the ones that die, and
    routes calls by tool name. ``registry`` holds the tools of the servers that are up."""

    def __init__(self, settings: ToolsSettings, *, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.registry = ToolRegistry([server.name for server in settings.servers])
        env = os.environ if environ is None else environ
        self._connections = {
            server.name: ServerConnection(server, settings, environ=env, on_tools=self._on_tools)
            for server in settings.servers
        }
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, *, wait: float = START_TIMEOUT_SECONDS) -> None:
        """Start every server and wait (at most ``wait`` seconds) until each is up or has failed once; a slow
        one comes up later on its own."""
        for connection in self._connections.values():
            self._tasks.append(asyncio.create_task(connection.run(), name=f"tool server {connection.name}"))
        if self._connections:
            waits = [asyncio.ensure_future(c.first_outcome.wait()) for c in self._connections.values()]
            _, pending = await asyncio.wait(waits, timeout=wait)
            for future in pending:
                future.cancel()

    async def aclose(self) -> None:
        """Stop every server (stdio ones are terminated) and forget their tools."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for name in self._connections:
            self.registry.drop(name)

    async def __aenter__(self) -> ToolSupervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def health(self) -> dict[str, ServerHealth]:
        """Each configured server's health, in config order."""
        return {name: connection.health for name, connection in self._connections.items()}

    def tools(self) -> list[ToolSpec]:
        """The tools that can be called now."""
        return self.registry.tools()

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Call the tool ``name``; its answer as untrusted plain text, cut at ``max_result_chars``.

        A failure (no such tool, server down, timeout, the tool's own error) comes back as a result with
        ``is_error`` set and a line saying what happened, for the model and the user. Cancelling the awaiting
        task cancels the request at the server.
        """
        spec = self.registry.get(name)
        if spec is None:
            return ToolResult(name, f"there is no tool named {name!r}", is_error=True)
        connection = self._connections[spec.server]
        session = connection.session
        if session is None:
            return ToolResult(name, f"tool server {spec.server} is {connection.health.describe()}", is_error=True)
        timeout = self.settings.call_timeout
        try:
            async with asyncio.timeout(timeout):
                result = await session.call_tool(name, dict(arguments or {}))
        except TimeoutError:
            return ToolResult(name, f"the tool {name} did not answer within {timeout:g} s", is_error=True)
        except MCPError as exc:
            if exc.error.code == CONNECTION_CLOSED:
                connection.check_soon()
            return ToolResult(name, f"the tool {name} failed: {describe_error(exc)}", is_error=True)
        except Exception as exc:  # a malformed answer, a transport torn down mid-call: the reply goes on
            log.warning("tool %s on %s failed: %s", name, spec.server, describe_error(exc))
            connection.check_soon()
            return ToolResult(name, f"the tool {name} failed: {describe_error(exc)}", is_error=True)
        text, was_cut = cut(result_text(result), self.settings.max_result_chars)
        return ToolResult(name, text, is_error=bool(result.is_error), cut=was_cut)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add ``llamarelay_tool_server_up{server}`` (1 up, 0 not) and ``llamarelay_tool_server_tools``, read
        at scrape time."""
        up = Gauge(
            "llamarelay_tool_server_up",
            "1 while the MCP tool server answers, 0 while it starts or is down",
            ["server"],
            registry=registry,
        )
        tools = Gauge("llamarelay_tool_server_tools", "Tools the MCP server offers now", ["server"], registry=registry)
        for name, connection in self._connections.items():
            up.labels(name).set_function(functools.partial(lambda c: 1.0 if c.health.up else 0.0, connection))
            tools.labels(name).set_function(
                functools.partial(lambda c: float(c.health.tools if c.health.up else 0), connection)
            )

    def _on_tools(self, server: str, tools: list[ToolSpec] | None) -> None:
        if tools is None:
            self.registry.drop(server)
        else:
            self.registry.replace(server, tools)
