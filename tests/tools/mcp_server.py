"""A small MCP server for the tool tests, run as a real process: stdio by default, streamable HTTP with a bearer
check when given ``--http PORT`` (the token comes from MCP_TEST_TOKEN)."""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("llamarelay-test")


@server.tool(title="Adding numbers")
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool(title="Deleting a file")
def delete_file(path: str) -> str:
    """Pretend to delete a file (the bot's config marks this tool confirm = true)."""
    return f"deleted {path}"


@server.tool(title="Sleeping")
async def slow(seconds: float) -> str:
    """Sleep, then say so; writes a line to the file in MCP_TEST_MARK when it starts and when it finishes."""
    _mark(f"slow started {seconds}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark("slow cancelled")
        raise
    _mark("slow finished")
    return f"slept {seconds}"


@server.tool(title="Writing a lot")
def big(chars: int) -> str:
    """Return ``chars`` characters."""
    return "x" * chars


@server.tool(title="Learning a new trick")
async def add_tool(ctx: Context) -> str:
    """Add a tool named 'echo' and tell the client the list changed."""
    server.add_tool(lambda text: text, name="echo", description="Echo the text back.")
    await ctx.session.send_tool_list_changed()
    return "added echo"


@server.tool(title="Telling its process id")
def pid() -> str:
    """The server process's id (the tests check it is gone after shutdown)."""
    return str(os.getpid())


@server.tool(title="Reading the environment")
def env(name: str) -> str:
    """The value of an environment variable in the server's process ("" if unset)."""
    return os.environ.get(name, "")


@server.tool(title="Crashing")
def crash() -> str:
    """Exit the whole server process at once (a crash, for the restart tests)."""
    _mark("crash")
    os._exit(3)


def _mark(line: str) -> None:
    if path := os.environ.get("MCP_TEST_MARK"):
        with open(path, "a", encoding="utf-8") as file:
            file.write(line + "\n")


def _serve_http(port: int) -> None:
    import uvicorn

    token = os.environ["MCP_TEST_TOKEN"]
    inner = server.streamable_http_app()

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if headers.get(b"authorization") != f"Bearer {token}".encode():
                await send(
                    {"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"text/plain")]}
                )
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
        await inner(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        _serve_http(int(sys.argv[2]))
    else:
        server.run("stdio")
