"""Every failure of an HTTP request as a JSON error body: the server's own refusals (`HttpError`), aiohttp's
(no route, wrong method, body too large), a store that cannot answer, and anything unexpected, which is
logged and never shown as a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from adapters.http.listener import Handler, Middleware
from bot.errors import LlamarelayError

__all__ = ["HttpError", "error_body", "json_errors"]

log = logging.getLogger(__name__)

# aiohttp's own refusals, by status; others get their reason phrase in snake case.
AIOHTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class HttpError(Exception):
    """A request the server refuses: its status, a machine-readable code, a readable message, extra headers."""

    def __init__(self, status: int, code: str | None, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _from_aiohttp(exc: web.HTTPException) -> HttpError:
    code = AIOHTTP_CODES.get(exc.status) or exc.reason.lower().replace(" ", "_")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return HttpError(exc.status, code, exc.reason, headers=headers)


def error_body(error: HttpError) -> web.Response:
    """The plain shape of an error: ``{"error": code, "message": message}`` with its status."""
    return web.json_response({"error": error.code, "message": error.message}, status=error.status)


def json_errors(
    render: Callable[[HttpError], web.Response] = error_body,
    *,
    name: str,
    applies: Callable[[web.Request], bool] = lambda request: True,
) -> Middleware:
    """Middleware answering every error as ``render`` writes an `HttpError` (an API may have its own shape).

    Where ``applies`` is false (a page rather than an API), aiohttp's own errors and failures keep plain
    text pages. ``name`` labels the log lines of unexpected failures.
    """

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            error = exc
        except web.HTTPException as exc:
            if exc.status < 400 or not applies(request):
                raise
            error = _from_aiohttp(exc)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except LlamarelayError as exc:  # the store (or engine) cannot serve this now
            log.error("%s: %s %s failed: %s", name, request.method, request.path, exc)
            if not applies(request):
                raise web.HTTPServiceUnavailable(text="temporarily unavailable") from None
            error = HttpError(503, "unavailable", "The bot cannot serve this right now.")
        except Exception:
            log.exception("%s: %s %s failed", name, request.method, request.path)
            if not applies(request):
                raise web.HTTPInternalServerError(text="internal error") from None
            error = HttpError(500, "internal_error", "Something went wrong on the server.")
        response = render(error)
        response.headers.update(error.headers)
        return response

    return errors
