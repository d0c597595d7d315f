"""The composition root: builds the one engine and store, then starts the configured adapters.

This is the only module in bot/ that imports adapters/. The command line that calls it is `bot.cli`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from bot.config import Secrets, Settings
from bot.conversations import ConversationManager
from bot.engine.base import InferenceEngine, renders_template
from bot.errors import ConfigError, LlamarelayError
from bot.models import open_backend
from bot.store import open_store

if TYPE_CHECKING:
    from bot.tools import ToolSupervisor

__all__ = ["open_engine", "serve", "start_tools"]

log = logging.getLogger("llamarelay")

# Shutdown fits `docker stop` (SIGTERM, then SIGKILL after 10 s): replies first, then the adapters.
REPLIES_DEADLINE_SECONDS = 6.0
DISCONNECT_DEADLINE_SECONDS = 3.0


async def serve(settings: Settings, secrets: Secrets, *, mode: str = "run") -> None:
    """Run the adapters of ``mode`` until stopped, sharing one engine and one store.

    ``run``: every platform whose token is set, the web page and the OpenAI API when enabled, and the
    terminal chat when no platform token is set; ``chat``: the terminal chat only; ``web``: the web page only.
    SIGTERM (and Ctrl-C outside the terminal chat) shuts down cleanly: no new requests, running replies are ended and
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


async def open_engine(settings: Settings, secrets: Secrets) -> InferenceEngine:
    """The configured engine: llama.cpp loaded in this process, or a remote OpenAI-compatible server."""
    return await open_backend(settings.engine, secrets.engine_api_key)


async def start_tools(settings: Settings, manager: ConversationManager) -> ToolSupervisor | None:
    """The MCP tool servers, started and kept up, their health in /metrics, their tools offered by the manager
    where ``[[tools.allow]]`` grants them; None when none are configured (the MCP SDK is then not even imported)."""
    if not settings.tools.servers:
        return None
    from bot.access import AccessPolicy
    from bot.conversations.tools import Toolbox
    from bot.tools import ToolSupervisor

    tools = ToolSupervisor(settings.tools)
    await tools.start()
    tools.register_metrics(manager.metrics.registry)
    manager.use_tools(Toolbox(tools, AccessPolicy(tool_grants=settings.tools.allow), settings.tools))
    return tools


async def _run_adapters(
    manager: ConversationManager,
    settings: Settings,
    secrets: Secrets,
    *,
    mode: str,
    tools: ToolSupervisor | None = None,
) -> None:
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
        log.info(
            "no DISCORD_TOKEN or SLACK_BOT_TOKEN set%s. Set DISCORD_TOKEN to connect to Discord, "
            "SLACK_BOT_TOKEN (with SLACK_APP_TOKEN for Socket Mode) for Slack.",
            ": starting the terminal chat" if terminal else "",
        )
    api = mode == "run" and settings.api.enabled
    if not adapters and not terminal and not api:
        raise ConfigError(
            "nothing to run: set DISCORD_TOKEN or SLACK_BOT_TOKEN, enable [web] or [api], or start "
            "`llamarelay chat` in a terminal"
        )
    manager.platforms.expect(adapters)  # /readyz answers 503 until each of them reports it is connected
    if api:  # not a platform: it shares the engine's queue, not the conversations
        from adapters.openai_api import run_openai_api

        assert renders_template(manager.engine)  # load_settings refuses [api] with a remote backend
        adapters["api"] = run_openai_api(manager.engine, manager.metrics, settings, secrets, models=manager.models)
    if settings.ops.enabled and mode != "chat":
        from adapters.ops import run_ops

        adapters["ops"] = run_ops(manager, settings, tools)
    if terminal:
        from adapters.console import run_console

        # The terminal chat handles Ctrl-C and SIGTERM itself; leaving it stops everything.
        stop: asyncio.Task[object] = asyncio.create_task(run_console(manager), name="terminal")
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
        for task in done:  # the terminal chat's task is `stop`: its failure is logged too
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
