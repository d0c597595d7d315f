"""`Listener`: serves an aiohttp Application on host:port until cancelled, for the web page, the ops endpoints
and the OpenAI API alike; a taken port is a `ConfigError` naming the config key."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware  # aiohttp's own: its Application(middlewares=) takes these

from bot.errors import ConfigError

__all__ = ["Handler", "Listener", "Middleware"]


class Listener:
    """Listens for ``app`` on ``host:port``; ``port`` 0 picks a free one (tests). ``section`` names the config
    section whose host and port a start-up error points at (their names start with ``keys_prefix``, as
    ``[slack] http_port`` does). With ``handler_cancellation`` a client that hangs up cancels its request's
    handler at once (aiohttp otherwise lets it run on)."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        section: str,
        keys_prefix: str = "",
        shutdown_timeout: float = 2.0,
        handler_cancellation: bool = False,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.section = section
        self._keys = keys_prefix
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=shutdown_timeout, handler_cancellation=handler_cancellation
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> str:
        """Start listening and return the base URL. A taken port is a `ConfigError` naming the key."""
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            await self._runner.cleanup()
            section, keys = f"[{self.section}]", self._keys
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {self.port} on {self.host} is already in use: stop the program using it "
                    f"or choose another port with {section} {keys}port in config.toml"
                ) from None
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} ({section} {keys}host / {keys}port): {exc.strerror or exc}"
            ) from None
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        return self.url

    async def close(self) -> None:
        """Stop listening and close open connections."""
        await self._runner.cleanup()

    async def serve(self, started: Callable[[str], None] = lambda url: None) -> None:
        """Listen until cancelled, then close: a server task's whole life. ``started`` gets the base URL once
        the port is open (to log it, or to report the platform connected)."""
        started(await self.start())
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()
