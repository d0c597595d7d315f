"""The HTTP edge shared by the web page, the OpenAI-compatible /v1 and the ops endpoints.

`listener` serves an aiohttp application until cancelled, `guards` holds the checks in front of every request
(a loopback listener answers only loopback Host names; the Bearer token), `errors` turns every failure into a
JSON error body, never an HTML page or a stack trace.
"""

from __future__ import annotations

from adapters.http.errors import HttpError, json_errors
from adapters.http.guards import (
    FOREIGN_HOST,
    bearer_guard,
    bearer_token,
    check_token_needed,
    host_guard,
    is_loopback,
    is_loopback_host,
    token_matches,
)
from adapters.http.listener import Handler, Listener, Middleware

__all__ = [
    "FOREIGN_HOST",
    "Handler",
    "HttpError",
    "Listener",
    "Middleware",
    "bearer_guard",
    "bearer_token",
    "check_token_needed",
    "host_guard",
    "is_loopback",
    "is_loopback_host",
    "json_errors",
    "token_matches",
]
