"""The shared HTTP edge (`adapters.http`) on a real listener on 127.0.0.1: the Host check, the Bearer guard,
JSON error bodies for every failure, and serving until cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from adapters.http import (
    FOREIGN_HOST,
    HttpError,
    Listener,
    bearer_guard,
    bearer_token,
    host_guard,
    json_errors,
    token_matches,
)
from bot.errors import StoreError


def _render(error: HttpError) -> web.Response:
    return web.json_response({"error": error.code, "message": error.message}, status=error.status)


async def _fine(request: web.Request) -> web.Response:
    return web.json_response({"token": bearer_token(request)})


async def _refused(request: web.Request) -> web.Response:
    raise HttpError(409, "busy", "Not now.", headers={"Retry-After": "3"})


async def _broken(request: web.Request) -> web.Response:
    raise RuntimeError("a secret detail")


async def _no_store(request: web.Request) -> web.Response:
    raise StoreError("database is locked")


def _app(*, token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[
            json_errors(_render, name="test", applies=lambda request: request.path.startswith("/api/")),
            host_guard("127.0.0.1", lambda: HttpError(403, "foreign_host", FOREIGN_HOST)),
            bearer_guard(token, lambda: HttpError(401, "token_required", "Send the token.")),
        ]
    )
    for path in ("/api/fine", "/page"):
        app.router.add_get(path, _fine)
    app.router.add_get("/api/refused", _refused)
    app.router.add_get("/api/broken", _broken)
    app.router.add_get("/page/broken", _broken)
    app.router.add_get("/api/store", _no_store)
    return app


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    server = Listener(_app(token=getattr(request, "param", None)), "127.0.0.1", 0, section="test")
    urls: list[str] = []
    task = asyncio.create_task(server.serve(urls.append))
    while not urls:
        await asyncio.sleep(0.01)
    yield urls[0]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _get(url: str, **options: Any) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(options.pop("method", "GET"), url, **options) as response,
    ):
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body, response.headers


async def test_every_api_failure_is_a_json_body_and_never_a_traceback(served: str) -> None:
    assert (await _get(served + "api/fine"))[:2] == (200, {"token": ""})
    status, body, headers = await _get(served + "api/refused")
    assert (status, body, headers["Retry-After"]) == (409, {"error": "busy", "message": "Not now."}, "3")
    assert (await _get(served + "api/nothing"))[:2] == (404, {"error": "not_found", "message": "Not Found"})
    status, body, headers = await _get(served + "api/fine", method="DELETE")
    assert (status, body["error"], headers["Allow"]) == (405, "method_not_allowed", "GET,HEAD")
    status, body, _ = await _get(served + "api/broken")
    assert status == 500 and body["error"] == "internal_error" and "secret" not in str(body)
    assert (await _get(served + "api/store"))[:2] == (
        503,
        {"error": "unavailable", "message": "The bot cannot serve this right now."},
    )
    # A page keeps aiohttp's plain answers, and still shows no traceback.
    status, text, _ = await _get(served + "page/broken")
    assert status == 500 and "secret" not in text and "Traceback" not in text


async def test_a_loopback_listener_refuses_a_foreign_host_name(served: str) -> None:
    status, body, _ = await _get(served + "api/fine", headers={"Host": "rebind.example"})
    assert (status, body) == (403, {"error": "foreign_host", "message": FOREIGN_HOST})
    assert (await _get(served + "api/fine", headers={"Host": "localhost"}))[0] == 200


@pytest.mark.parametrize("served", ["s3cret"], indirect=True)
async def test_the_bearer_guard_wants_the_token_in_any_case_of_its_scheme(served: str) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        assert (await _get(served + "api/fine", headers=headers))[:2] == (
            401,
            {"error": "token_required", "message": "Send the token."},
        ), headers
    for scheme in ("Bearer", "bearer"):
        status, body, _ = await _get(served + "api/fine", headers={"Authorization": f"{scheme} s3cret"})
        assert (status, body) == (200, {"token": "s3cret"})


def test_token_matches_only_the_same_non_empty_secret() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc") and not token_matches("", "") and not token_matches("", "abc")


async def test_serving_ends_when_cancelled_and_frees_the_port() -> None:
    server = Listener(_app(), "127.0.0.1", 0, section="test")
    urls: list[str] = []
    task = asyncio.create_task(server.serve(urls.append))
    while not urls:
        await asyncio.sleep(0.01)
    assert (await _get(urls[0] + "api/fine"))[0] == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(urls[0] + "api/fine")
