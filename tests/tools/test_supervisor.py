"""The MCP client against real server processes: the test server in mcp_server.py over stdio and over
streamable HTTP (127.0.0.1, bearer token), crashing, slow and changing its tools."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from bot.config import ToolServerSettings, ToolsSettings
from bot.tools import ServerState, ToolSupervisor

SERVER = str(Path(__file__).with_name("mcp_server.py"))
TOKEN = "test-token-0123456789"


def stdio_server(
    name: str = "test", *, mark: Path | None = None, env: dict[str, str] | None = None, **options: Any
) -> ToolServerSettings:
    env = {**(env or {}), **({"MCP_TEST_MARK": str(mark)} if mark else {})}
    return ToolServerSettings(name=name, command=sys.executable, args=[SERVER], env=env, **options)


async def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[ToolSupervisor]:
    settings = ToolsSettings(
        servers=[stdio_server(mark=tmp_path / "mark", tools={"delete_file": {"confirm": True}})],
        call_timeout=5,
        max_result_chars=200,
        restart_delay=0.5,
    )
    async with ToolSupervisor(settings) as tools:
        yield tools


async def test_tools_are_listed_at_start_with_titles_and_confirm_flags(supervisor: ToolSupervisor) -> None:
    health = supervisor.health()["test"]
    assert health.state is ServerState.UP and health.describe() == "up, 8 tools"
    tools = {tool.name: tool for tool in supervisor.tools()}
    assert set(tools) == {"add", "delete_file", "slow", "big", "add_tool", "pid", "env", "crash"}
    assert tools["add"].title == "Adding numbers" and tools["add"].server == "test"
    assert tools["add"].input_schema["required"] == ["a", "b"]
    assert tools["delete_file"].confirm and not tools["add"].confirm


async def test_a_pure_tool_answers_as_plain_text(supervisor: ToolSupervisor) -> None:
    result = await supervisor.call("add", {"a": 2, "b": 40})
    assert (result.text, result.is_error, result.cut) == ("42", False, False)


async def test_bad_arguments_and_unknown_tools_are_error_results_not_exceptions(supervisor: ToolSupervisor) -> None:
    bad = await supervisor.call("add", {"a": "two"})
    assert bad.is_error and "validation error" in bad.text.lower()
    unknown = await supervisor.call("nope", {})
    assert unknown.is_error and unknown.text == "there is no tool named 'nope'"
    assert (await supervisor.call("add", {"a": 1, "b": 1})).text == "2"  # the server is still fine


async def test_a_long_result_is_cut_with_a_note(supervisor: ToolSupervisor) -> None:
    result = await supervisor.call("big", {"chars": 5000})
    assert result.cut and result.text.startswith("x" * 200)
    assert result.text[200:] == "\n[cut: the tool returned 5,000 characters; only the first 200 are shown]"
    exact = await supervisor.call("big", {"chars": 200})
    assert not exact.cut and exact.text == "x" * 200


async def test_a_changed_tool_list_is_read_again(supervisor: ToolSupervisor) -> None:
    assert supervisor.registry.get("echo") is None
    assert (await supervisor.call("add_tool", {})).text == "added echo"
    await eventually(lambda: supervisor.registry.get("echo") is not None)
    assert supervisor.health()["test"].tools == 9
    assert (await supervisor.call("echo", {"text": "hello"})).text == "hello"


async def test_a_call_past_the_timeout_is_cancelled_at_the_server(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    settings = ToolsSettings(servers=[stdio_server(mark=mark)], call_timeout=0.5)
    async with ToolSupervisor(settings) as tools:
        started = time.monotonic()
        result = await tools.call("slow", {"seconds": 30})
        assert time.monotonic() - started < 5
        assert result.is_error and result.text == "the tool slow did not answer within 0.5 s"
        await eventually(lambda: "slow cancelled" in mark.read_text())
        assert (await tools.call("add", {"a": 1, "b": 2})).text == "3"  # the session lives on


async def test_cancelling_the_caller_cancels_the_request(supervisor: ToolSupervisor, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    call = asyncio.create_task(supervisor.call("slow", {"seconds": 30}))
    await eventually(lambda: mark.exists() and "slow started" in mark.read_text())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: "slow cancelled" in mark.read_text())
    assert "slow finished" not in mark.read_text()
    assert supervisor.health()["test"].up


async def test_a_crashed_server_is_reported_down_then_restarted(supervisor: ToolSupervisor) -> None:
    registry = CollectorRegistry()
    supervisor.register_metrics(registry)
    assert 'llamarelay_tool_server_up{server="test"} 1.0' in generate_latest(registry).decode()
    result = await supervisor.call("crash", {})
    assert result.is_error and "Connection closed" in result.text
    await eventually(lambda: supervisor.health()["test"].state is ServerState.DOWN)
    down = supervisor.health()["test"]
    assert down.reason and down.describe().startswith("down: ")
    assert supervisor.registry.get("add") is None
    assert 'llamarelay_tool_server_up{server="test"} 0.0' in generate_latest(registry).decode()
    refused = await supervisor.call("add", {"a": 1, "b": 2})
    assert refused.is_error and refused.text == "there is no tool named 'add'"
    await eventually(lambda: supervisor.health()["test"].up)
    assert supervisor.health()["test"].restarts == 1
    assert (await supervisor.call("add", {"a": 1, "b": 2})).text == "3"
    assert 'llamarelay_tool_server_up{server="test"} 1.0' in generate_latest(registry).decode()


async def test_a_server_killed_while_idle_is_noticed_by_its_ping_and_restarted() -> None:
    settings = ToolsSettings(servers=[stdio_server()], check_interval=0.2, restart_delay=0.2)
    async with ToolSupervisor(settings) as tools:
        pid = int((await tools.call("pid", {})).text)
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: tools.health()["test"].state is ServerState.DOWN)
        await eventually(lambda: tools.health()["test"].up)
        assert int((await tools.call("pid", {})).text) != pid


async def test_restarts_back_off_doubling_up_to_the_longest_delay(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="bot.tools.connection")
    settings = ToolsSettings(
        servers=[ToolServerSettings(name="ghost", command="/nonexistent/mcp-server")],
        restart_delay=0.05,
        max_restart_delay=0.2,
    )
    async with ToolSupervisor(settings) as tools:
        await eventually(lambda: tools.health()["ghost"].restarts >= 4)
    delays = re.findall(r"restarting in ([\d.]+) s", caplog.text)
    assert delays[:5] == ["0.05", "0.1", "0.2", "0.2", "0.2"]


async def test_calls_run_side_by_side(supervisor: ToolSupervisor) -> None:
    started = time.monotonic()
    results = await asyncio.gather(*(supervisor.call("slow", {"seconds": 1}) for _ in range(3)))
    assert [r.text for r in results] == ["slept 1.0"] * 3
    assert time.monotonic() - started < 2.5  # not one after another


async def test_a_stdio_server_gets_its_env_and_never_the_bots_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "discord-secret")
    monkeypatch.setenv("LLAMARELAY_API_TOKEN", "api-secret")
    server = stdio_server(env={"GIVEN": "yes"})
    async with ToolSupervisor(ToolsSettings(servers=[server])) as tools:
        assert (await tools.call("env", {"name": "GIVEN"})).text == "yes"
        assert (await tools.call("env", {"name": "PATH"})).text  # what a program needs to run
        assert (await tools.call("env", {"name": "DISCORD_TOKEN"})).text == ""
        assert (await tools.call("env", {"name": "LLAMARELAY_API_TOKEN"})).text == ""


async def test_a_server_that_cannot_start_is_down_with_the_reason_and_the_others_work() -> None:
    settings = ToolsSettings(
        servers=[ToolServerSettings(name="ghost", command="/nonexistent/mcp-server"), stdio_server("real")],
        restart_delay=30,
    )
    async with ToolSupervisor(settings) as tools:
        health = tools.health()
        assert health["ghost"].state is ServerState.DOWN
        assert health["ghost"].describe() == "down: command not found: /nonexistent/mcp-server"
        assert health["real"].up and (await tools.call("add", {"a": 1, "b": 1})).text == "2"


async def test_stopping_the_supervisor_ends_the_server_process() -> None:
    async with ToolSupervisor(ToolsSettings(servers=[stdio_server()])) as tools:
        pid = int((await tools.call("pid", {})).text)
        os.kill(pid, 0)  # alive
    await eventually(lambda: not _alive(pid), timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# Streamable HTTP ---------------------------------------------------------------------------------------------


@pytest.fixture
def http_server() -> Iterator[str]:
    """The test server over streamable HTTP on 127.0.0.1, checking a bearer token; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, SERVER, "--http", str(port)], env={**os.environ, "MCP_TEST_TOKEN": TOKEN}
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the HTTP MCP server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


async def test_a_streamable_http_server_gets_the_token_from_the_named_variable(http_server: str) -> None:
    server = ToolServerSettings(name="remote", url=http_server, auth_env="TEST_MCP_TOKEN")
    async with ToolSupervisor(ToolsSettings(servers=[server]), environ={"TEST_MCP_TOKEN": TOKEN}) as tools:
        assert tools.health()["remote"].up
        assert (await tools.call("add", {"a": 20, "b": 22})).text == "42"


async def test_a_wrong_or_missing_token_leaves_the_server_down_with_a_reason(http_server: str) -> None:
    server = ToolServerSettings(name="remote", url=http_server, auth_env="TEST_MCP_TOKEN")
    settings = ToolsSettings(servers=[server], restart_delay=30)
    async with ToolSupervisor(settings, environ={"TEST_MCP_TOKEN": "wrong"}) as tools:
        health = tools.health()["remote"]
        assert health.describe() == (
            "down: HTTP 401 (Server returned an error response); is the token in TEST_MCP_TOKEN right?"
        )
        assert "wrong" not in (health.reason or "")
    async with ToolSupervisor(settings, environ={}) as tools:
        assert tools.health()["remote"].describe() == "down: environment variable TEST_MCP_TOKEN (auth_env) is not set"
