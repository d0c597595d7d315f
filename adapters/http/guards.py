"""Checks in front of every request: a loopback listener answers only loopback Host names (a DNS-rebinding
page cannot reach it), and an access token, when one is set, comes as ``Authorization: Bearer``."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

from aiohttp import web

from adapters.http.listener import Handler, Middleware
from bot.errors import ConfigError

__all__ = [
    "FOREIGN_HOST",
    "bearer_guard",
    "bearer_token",
    "check_token_needed",
    "host_guard",
    "is_loopback",
    "is_loopback_host",
    "token_matches",
]

LOOPBACK_NAMES = ("localhost", "localhost.")
FOREIGN_HOST = "This server answers only to localhost / 127.0.0.1."


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


def bearer_token(request: web.Request) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; "" when there is none."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else ""


def token_matches(given: str, expected: str) -> bool:
    """Whether ``given`` is the secret ``expected``, in constant time; an empty one never matches."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def bearer_guard(token: str | None, refuse: Callable[[], Exception]) -> Middleware:
    """Middleware refusing (``refuse()``) every request without ``Authorization: Bearer <token>``; with no
    token set, everyone passes (the listener is then on loopback: see each server's ``check_access``)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and not token_matches(bearer_token(request), token):
            raise refuse()
        return await handler(request)

    return guard


def check_token_needed(host: str, token: str | None, *, section: str, env: str, exposes: str) -> None:
    """Refuse to serve other machines without an access token: a `ConfigError` naming the keys to change."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"[{section}] host = {host!r} lets other machines {exposes}: set {env} to an access "
            'token, or listen on host = "127.0.0.1" only'
        )
