"""Command line and composition root: builds the one engine and store, then starts the configured adapters.

This is the only module in bot/ that imports adapters/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import DEFAULT_CONFIG_PATH, Secrets, Settings, load_settings
from bot.conversations import ConversationManager
from bot.errors import ConfigError, LlamarelayError
from bot.default_model import fetch_default_model
from bot.models import open_backend
from bot.engine.remote import RemoteEngine
from bot.store import is_database_url, open_store, redact_url
from bot.store.transfer import export_jsonl, import_jsonl

if TYPE_CHECKING:
    from bot.engine.embedded import Engine
    from bot.tools import ToolSupervisor

__all__ = ["main", "serve"]

log = logging.getLogger("llamarelay")

# Shutdown fits `docker stop` (SIGTERM, then SIGKILL after 10 s): replies first, then the adapters.
REPLIES_DEADLINE_SECONDS = 6.0
DISCONNECT_DEADLINE_SECONDS = 3.0


class RedactingFormatter(logging.Formatter):
    """Formats log records with every known secret replaced, tracebacks included."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def setup_logging(secrets: Secrets, *, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", secrets.values()))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    if not verbose:  # llama.cpp's loader chatter is only useful when debugging
        logging.getLogger("llama_cpp").setLevel(logging.WARNING)
    # Even with -v: aiosqlite's debug lines print every SQL parameter (browser ids, what users wrote).
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # The MCP SDK's HTTP client logs each request (tool calls, pings) at INFO.
    logging.getLogger("httpx2").setLevel(logging.WARNING)


async def serve(settings: Settings, secrets: Secrets, *, mode: str = "run") -> None:
    """Run the adapters of ``mode`` until stopped, sharing one engine and one store.

    ``run``: every platform whose token is set, the web page and the OpenAI API when enabled, and the
    terminal chat when no platform token is set; ``chat``: the terminal chat only; ``web``: the web page only. SIGTERM (and
    Ctrl-C outside the terminal chat) shuts down cleanly: no new requests, running replies are ended and
    stored, then the adapters disconnect and the database closes.
    """
    engine = await open_engine(settings, secrets)
    try:
        engine.check_sampling(settings.sampling)
        store = await open_store(settings.store.target())
        try:
            manager = ConversationManager(engine, store, settings)
            manager.start()  # leases: replies of another process that dies are taken over
            tools = await start_tools(settings, manager)
            try:
                await _run_adapters(manager, settings, secrets, mode=mode, tools=tools)
            finally:
                if tools is not None:
                    await tools.aclose()
        finally:
            await store.close()
    finally:
        await engine.aclose()
    log.info("stopped")


async def open_engine(settings: Settings, secrets: Secrets) -> Engine | RemoteEngine:
    """The configured engine: llama.cpp loaded in this process, or a remote OpenAI-compatible server."""
    return await open_backend(settings.engine, secrets.engine_api_key)  # type: ignore[return-value]


async def start_tools(settings: Settings, manager: ConversationManager) -> ToolSupervisor | None:
    """The MCP tool servers, started and kept up, their health in /metrics; None when none are configured (the
    MCP SDK is then not even imported)."""
    if not settings.tools.servers:
        return None
    from bot.tools import ToolSupervisor

    tools = ToolSupervisor(settings.tools)
    await tools.start()
    tools.register_metrics(manager.metrics.registry)
    return tools


async def _run_adapters(manager: ConversationManager, settings: Settings, secrets: Secrets, *, mode: str,
                        tools: ToolSupervisor | None = None) -> None:
    adapters: dict[str, Coroutine[Any, Any, None]] = {}
    if mode == "run" and secrets.discord_token:
        from adapters.discord import run_discord
        adapters["discord"] = run_discord(manager, settings, secrets)
    if mode == "run" and secrets.slack_bot_token:
        from adapters.slack import run_slack
        adapters["slack"] = run_slack(manager, settings, secrets)
    # Without a platform token, `run` chats in the terminal it was started from (not as a service or container).
    terminal = mode == "chat" or (mode == "run" and not adapters and sys.stdin.isatty())
    if mode == "web" or (mode == "run" and settings.web.enabled):
        from adapters.web import run_web
        adapters["web"] = run_web(manager, settings, secrets)
    if mode == "run" and not secrets.discord_token and not secrets.slack_bot_token:
        log.info("no DISCORD_TOKEN or SLACK_BOT_TOKEN set%s. Set DISCORD_TOKEN to connect to Discord, "
                 "SLACK_BOT_TOKEN (with SLACK_APP_TOKEN for Socket Mode) for Slack.",
                 ": starting the terminal chat" if terminal else "")
    api = mode == "run" and settings.api.enabled
    if not adapters and not terminal and not api:
        raise ConfigError("nothing to run: set DISCORD_TOKEN or SLACK_BOT_TOKEN, enable [web] or [api], or start "
                          "`llamarelay chat` in a terminal")
    manager.platforms.expect(adapters)  # /readyz answers 503 until each of them reports it is connected
    if api:  # not a platform: it shares the engine's queue, not the conversations
        from adapters.openai_api import run_openai_api
        adapters["api"] = run_openai_api(manager.engine, manager.metrics, settings, secrets)
    if settings.ops.enabled and mode != "chat":
        from adapters.ops import run_ops
        adapters["ops"] = run_ops(manager, settings, tools)
    if terminal:
        from adapters.console import run_console
        # The terminal chat handles Ctrl-C and SIGTERM itself; leaving it stops everything.
        stop = asyncio.create_task(run_console(manager), name="terminal")
    else:
        stopping = asyncio.Event()

        def on_signal() -> None:
            if stopping.is_set():  # a second Ctrl-C or SIGTERM: the user does not want to wait
                log.warning("second signal: exiting now")
                os._exit(1)
            stopping.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        stop = asyncio.create_task(stopping.wait())
    tasks = {asyncio.create_task(coroutine, name=name) for name, coroutine in adapters.items()}
    failure: BaseException | None = None
    try:
        done, _ = await asyncio.wait(tasks | {stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stop}:
            if not task.cancelled() and task.exception() is not None:
                failure = task.exception()
                if not isinstance(failure, LlamarelayError):  # a bug, not a config problem: keep the traceback
                    log.error("the %s adapter failed", task.get_name(), exc_info=failure)
        log.info("shutting down: finishing replies in flight")
        await manager.shutdown(REPLIES_DEADLINE_SECONDS)
    finally:
        for task in tasks | {stop}:
            task.cancel()
        # Adapters disconnect within what is left of `docker stop`'s 10 s; then the process goes on regardless.
        _, stuck = await asyncio.wait(tasks | {stop}, timeout=DISCONNECT_DEADLINE_SECONDS)
        for task in stuck:
            log.warning("the %s adapter did not stop in time", task.get_name())
        for task in (tasks | {stop}) - stuck:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not terminal:
            for signum in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().remove_signal_handler(signum)
    if failure is not None:  # e.g. a port in use: the user sees why, and a service manager sees a failure
        raise failure


def _describe_target(target: Path | str) -> str:
    return redact_url(target) if is_database_url(target) else str(target)


async def manage_store(settings: Settings, command: str, file: Path | None = None) -> None:
    """``migrate``, ``export FILE`` or ``import FILE`` on the configured database, printing what was done."""
    target = settings.store.target()
    store = await open_store(target, migrate=command != "migrate")
    try:
        if command == "migrate":
            current = await store.schema_version()
            print(f"database: {_describe_target(target)}\nschema version: {current} (latest: {store.latest_version})")
            applied = await store.migrate()
            print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "up to date")
        elif command == "export":
            assert file is not None
            sessions, messages = await export_jsonl(store, file)
            print(f"exported {sessions} conversations, {messages} messages to {file}")
        else:
            assert file is not None
            sessions, messages = await import_jsonl(store, file)
            print(f"imported {sessions} conversations, {messages} messages into {_describe_target(target)}")
    finally:
        await store.close()


COMMANDS = {
    "run": "start every adapter that has a token (the terminal chat when none has)",
    "chat": "chat with the model in this terminal",
    "web": "serve only the browser chat page ([web] host and port)",
    "fetch-model": "download the default model into the configured model_path",
    "migrate": "show the database's schema version and apply pending migrations",
    "export": "write every conversation to FILE (JSON lines)",
    "import": "load every conversation from FILE (made by export) into an empty database",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamarelay", description="A local LLM chat bot for Discord and Slack.")
    _add_common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        # Users type options after the command too (`llamarelay chat --config FILE`).
        command = commands.add_parser(name, help=help_text)
        _add_common_options(command, defaults=False)
        if name in ("export", "import"):
            command.add_argument("file", type=Path, metavar="FILE")
    return parser


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--config and -v; on a subcommand without defaults, so an option given before it is not overwritten."""
    parser.add_argument("--config", type=Path, default=None if defaults else argparse.SUPPRESS,
                        help=f"config file (default: ./{DEFAULT_CONFIG_PATH}, or built-in defaults if absent)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False if defaults else argparse.SUPPRESS,
                        help="debug logging")


def _load(config: Path | None) -> Settings:
    if config is None and not DEFAULT_CONFIG_PATH.is_file():
        return load_settings(None)  # the defaults, with the environment's overrides
    return load_settings(config or DEFAULT_CONFIG_PATH)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    secrets = Secrets.from_env()
    setup_logging(secrets, verbose=args.verbose)
    try:
        settings = _load(args.config)
        if args.command == "fetch-model":
            fetch_default_model(settings.engine.model_path)
        elif args.command in ("migrate", "export", "import"):
            asyncio.run(manage_store(settings, args.command, getattr(args, "file", None)))
        else:
            asyncio.run(serve(settings, secrets, mode=args.command))
    except LlamarelayError as exc:
        print(f"llamarelay: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
