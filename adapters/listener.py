"""`Listener`: serves an aiohttp Application on host:port, for the web page, the ops endpoints and the OpenAI
API alike; `is_loopback` tells whether an address is this machine's own, and `host_guard` keeps a loopback
listener for this machine's own clients."""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from bot.errors import ConfigError

__all__ = ["FOREIGN_HOST", "Handler", "Listener", "host_guard", "is_loopback", "is_loopback_host"]

LOOPBACK_NAMES = ("localhost", "localhost.")
FOREIGN_HOST = "This server answers only to localhost / 127.0.0.1."
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """True for names and addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_host(header: str) -> bool:
    """True when an HTTP ``Host`` header (a name or address, maybe with a port) names only this machine."""
    try:
        return is_loopback(urlsplit(f"//{header}").hostname or "")
    except ValueError:
        return False


def host_guard(host: str, refuse: Callable[[], Exception]) -> Middleware:
    """Middleware for a listener on ``host``: when that is loopback, a request whose Host header names another
    machine raises ``refuse()`` (the server's own 403), since only a page using DNS rebinding sends one."""
    loopback_only = is_loopback(host)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback_only and not is_loopback_host(request.host):
            raise refuse()
        return await handler(request)

    return guard


class Listener:
    """Listens for ``app`` on ``host:port``; ``port`` 0 picks a free one (tests). ``section`` names the config
    section whose host and port a start-up error points at. With ``handler_cancellation`` a client that
    hangs up cancels its request's handler at once (aiohttp otherwise lets it run on)."""

    def __init__(self, app: web.Application, host: str, port: int, *, section: str,
                 shutdown_timeout: float = 2.0, handler_cancellation: bool = False) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.section = section
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout,
                                     handler_cancellation=handler_cancellation)

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
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {self.port} on {self.host} is already in use: stop the program using it "
                                  f"or choose another port with [{self.section}] port in config.toml") from None
            raise ConfigError(f"cannot listen on {self.host}:{self.port} ([{self.section}] host / port): "
                              f"{exc.strerror or exc}") from None
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        return self.url

    async def close(self) -> None:
        """Stop listening and close open connections."""
        await self._runner.cleanup()
