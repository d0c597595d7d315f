"""One MCP server kept connected: start it (stdio) or reach it (streamable HTTP), list its tools, notice when
it dies, and start it again after a growing delay. Each connection lives in one task of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from mcp import types
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from bot.config import ToolServerSettings, ToolsSettings
from bot.tools.health import ServerHealth, ServerState
from bot.tools.registry import ToolSpec

__all__ = ["ServerConnection", "describe_error"]

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0  # to start (stdio), initialize and list the tools
PING_TIMEOUT_SECONDS = 10.0


class ServerConnection:
    """Keeps one configured server connected and its tools listed; ``session`` is None while it is down."""

    def __init__(
        self,
        server: ToolServerSettings,
        limits: ToolsSettings,
        *,
        environ: Mapping[str, str],
        on_tools: Callable[[str, list[ToolSpec] | None], None],
    ) -> None:
        self.settings = server
        self._limits = limits
        self._environ = environ
        self._on_tools = on_tools  # called with the new list, or None when the server goes down
        self.session: ClientSession | None = None
        self.health = ServerHealth(ServerState.STARTING)
        self.first_outcome = asyncio.Event()  # set once the first start succeeded or failed
        self._wake = asyncio.Event()
        self._list_changed = False
        self._http_status: int | None = None  # the last HTTP error status a streamable-HTTP server answered

    @property
    def name(self) -> str:
        return self.settings.name

    def check_soon(self) -> None:
        """Ping now rather than at the next interval (a call saw the connection close)."""
        self._wake.set()

    async def run(self) -> None:
        """Connect, serve, and reconnect after each failure, until cancelled."""
        failures = 0
        restarts = 0
        while True:
            began = time.monotonic()
            self._http_status = None
            try:
                await self._connect_and_watch(restarts)
                reason = "the connection closed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything the server or transport does wrong: it is down, not the bot
                reason = describe_error(exc)
            if self._http_status is not None:
                reason = f"HTTP {self._http_status} ({reason})"
                if self._http_status in (401, 403) and self.settings.auth_env:
                    reason += f"; is the token in {self.settings.auth_env} right?"
                self._http_status = None
            self.session = None
            self._on_tools(self.name, None)
            if time.monotonic() - began > self._limits.max_restart_delay:  # it had been up a good while
                failures = 0
            delay = min(self._limits.restart_delay * 2**failures, self._limits.max_restart_delay)
            failures += 1
            self.health = ServerHealth(ServerState.DOWN, reason, restarts=restarts)
            self.first_outcome.set()
            log.warning("tool server %s is down (%s); restarting in %g s", self.name, reason, delay)
            await asyncio.sleep(delay)
            restarts += 1

    async def _connect_and_watch(self, restarts: int) -> None:
        async with (
            self._transport() as (read, write),
            ClientSession(read, write, message_handler=self._on_message) as session,
        ):
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                await session.initialize()
                tools = await self._list_tools(session)
            self.session = session
            self.health = ServerHealth(ServerState.UP, tools=len(tools), restarts=restarts)
            self.first_outcome.set()
            log.info("tool server %s is up with %d tools", self.name, len(tools))
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._limits.check_interval)
                self._wake.clear()
                await asyncio.wait_for(session.send_ping(), PING_TIMEOUT_SECONDS)  # raises once it is gone
                if self._list_changed:
                    self._list_changed = False
                    tools = await asyncio.wait_for(self._list_tools(session), START_TIMEOUT_SECONDS)
                    self.health = ServerHealth(ServerState.UP, tools=len(tools), restarts=restarts)
                    log.info("tool server %s changed its tools: %s", self.name, ", ".join(t.name for t in tools))

    @contextlib.asynccontextmanager
    async def _transport(self) -> AsyncIterator[Any]:
        server = self.settings
        if server.command is not None:
            # The SDK passes on only a safe few variables (PATH, HOME, …): the bot's own secrets stay here.
            params = StdioServerParameters(command=server.command, args=server.args, env=server.env or None)
            async with stdio_client(params) as streams:
                yield streams
            return
        assert server.url is not None
        headers: dict[str, str] = {}
        if server.auth_env is not None:
            token = self._environ.get(server.auth_env)
            if not token:
                raise ToolServerUnavailable(f"environment variable {server.auth_env} (auth_env) is not set")
            headers[server.auth_header] = f"{server.auth_scheme} {token}" if server.auth_scheme else token
        async with create_mcp_http_client(headers=headers) as client:
            # The SDK turns an HTTP error into "Server returned an error response": keep the status for /status.
            async def remember_status(response: Any) -> None:
                if response.status_code >= 400:
                    self._http_status = response.status_code

            client.event_hooks["response"].append(remember_status)
            async with streamable_http_client(server.url, http_client=client) as streams:
                yield streams

    async def _list_tools(self, session: ClientSession) -> list[ToolSpec]:
        listed: list[types.Tool] = []
        cursor: str | None = None
        while True:
            page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        tools = [self._spec(tool) for tool in listed]
        unknown = set(self.settings.tools) - {tool.name for tool in tools}
        if unknown:
            log.warning(
                "tool server %s has no tool named %s (tools.servers.tools)", self.name, ", ".join(sorted(unknown))
            )
        self._on_tools(self.name, tools)
        return tools

    def _spec(self, tool: types.Tool) -> ToolSpec:
        options = self.settings.tools.get(tool.name)
        title = (
            (options.title if options else None)
            or tool.title
            or (tool.annotations.title if tool.annotations else None)
            or tool.name.replace("_", " ")
        )
        return ToolSpec(
            name=tool.name,
            server=self.name,
            description=tool.description or "",
            input_schema=dict(tool.input_schema),
            title=title,
            confirm=bool(options and options.confirm),
        )

    async def _on_message(self, message: IncomingMessage) -> None:
        # Runs in the session's reader: a request from here would wait on itself, so the watcher relists.
        if isinstance(message, types.ToolListChangedNotification):
            self._list_changed = True
            self._wake.set()
        elif isinstance(message, Exception):
            log.debug("tool server %s: %s", self.name, describe_error(message))


class ToolServerUnavailable(Exception):
    """The server cannot be started or reached; the message says why, for /status."""


def describe_error(exc: BaseException) -> str:
    """One line for a failure, the innermost of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, ToolServerUnavailable):
        return str(exc)
    if isinstance(exc, MCPError):
        return exc.error.message
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {exc.filename or exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
