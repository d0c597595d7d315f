"""The aiohttp application: the page, its static files, the API, and the checks in front of them.

In front of every request: the Host must be a loopback name when the server listens on loopback (a DNS
rebinding page cannot reach it), API calls from a foreign ``Origin`` are refused, the access token is
checked when one is set, and the namespace of the request's conversations is found: the browser's id from
its HttpOnly cookie, or one derived from the token for ``Authorization: Bearer`` clients. Errors under
/api/ are always JSON, never an HTML page or a stack trace (the shared edge, `adapters.http`, does those).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from adapters.http import (
    FOREIGN_HOST,
    Handler,
    HttpError,
    Listener,
    bearer_token,
    check_token_needed,
    host_guard,
    is_loopback,
    json_errors,
    token_matches,
)
from adapters.web.api import (
    AUTH_COOKIE,
    BROWSER_COOKIE,
    STATE,
    ApiError,
    WebState,
    current_browser,
    json_response,
    routes,
)
from adapters.web.tool_routes import tool_routes
from bot.config import Secrets, Settings, WebSettings
from bot.conversations import ConversationManager

__all__ = ["WebServer", "check_access", "create_app", "is_loopback"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SHUTDOWN_TIMEOUT_SECONDS = 2.0  # open event streams get this long to end (the core has ended every reply by then)
BROWSER_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
UNAUTHENTICATED_PATHS = ("/api/login",)

# Defence in depth behind the page's own escaping: no inline script, nothing from another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def check_access(settings: WebSettings, secrets: Secrets) -> None:
    """Refuse to serve other machines without an access token."""
    check_token_needed(
        settings.host, secrets.web_token, section="web", env="LLAMARELAY_WEB_TOKEN", exposes="reach the chat"
    )


# -- middleware ----------------------------------------------------------------------------------------


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _render(error: HttpError) -> web.Response:
    return json_response({"error": error.code, "message": error.message}, status=error.status)


def _foreign_host() -> ApiError:
    return ApiError(403, "foreign_host", FOREIGN_HOST)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Never a path out of a directory; on /api/ only, same-site requests with their browser id or token."""
    api = _is_api(request)
    if ".." in request.path.split("/"):  # whatever the router makes of it, never leave a directory
        raise web.HTTPNotFound()
    if not api:  # the page and its files: no id is read or given on a page load
        return await handler(request)
    _check_origin(request)
    bearer = request.path not in UNAUTHENTICATED_PATHS and _check_token(request)
    browser = request.app[STATE].token_namespace if bearer else request.cookies.get(BROWSER_COOKIE, "")
    reset = current_browser.set(browser if browser and BROWSER_ID.fullmatch(browser) else "")
    try:
        return await handler(request)
    finally:
        current_browser.reset(reset)


def _check_origin(request: web.Request) -> None:
    """Another site's page may not drive this API with the visitor's cookies."""
    origin = request.headers.get("Origin")
    if origin is not None:
        try:
            origin_host = urlsplit(origin).netloc.lower()
        except ValueError:
            origin_host = ""
        if origin_host != request.host.lower():
            raise ApiError(403, "foreign_origin", "Requests from another site are not allowed.")
    if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
        raise ApiError(403, "foreign_origin", "Requests from another site are not allowed.")


def _check_token(request: web.Request) -> bool:
    """Refuse a request without the access token (when one is set); True when it came as a Bearer header."""
    state = request.app[STATE]
    digest, token = state.auth_digest, state.secrets.web_token
    if digest is None or token is None:
        return False
    if token_matches(bearer_token(request), token):
        return True
    if token_matches(request.cookies.get(AUTH_COOKIE, ""), digest):
        return False
    raise ApiError(401, "token_required", "This server needs its access token (LLAMARELAY_WEB_TOKEN).")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/api/"):
        response.headers.setdefault("Cache-Control", "no-store")
    else:  # the page and its files are small; always revalidate so an upgrade shows at once
        response.headers.setdefault("Cache-Control", "no-cache")


# -- the application -----------------------------------------------------------------------------------


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})


def create_app(manager: ConversationManager, settings: Settings, secrets: Secrets) -> web.Application:
    """The web chat as an aiohttp Application (not listening yet: see `WebServer`)."""
    app = web.Application(
        middlewares=[
            json_errors(_render, name="web", applies=_is_api),
            host_guard(settings.web.host, _foreign_host),
            _guard,
        ]
    )
    state = WebState(manager, settings, secrets)
    app[STATE] = state
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC_DIR)
    app.router.add_routes(routes)
    app.router.add_routes(tool_routes)
    app.on_response_prepare.append(_security_headers)
    return app


class WebServer(Listener):
    """The chat page's listener; open event streams get a moment to end (the core has ended every reply by then)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        super().__init__(app, host, port, section="web", shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
