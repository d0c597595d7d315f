"""The operations endpoints over real HTTP on 127.0.0.1, with the real engine, store and manager."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.ops import OpsServer, create_app
from bot.app import _run_adapters
from bot.config import Secrets, Settings
from bot.conversations import ConversationManager
from bot.engine import Engine
from bot.engine.devices import gpus
from bot.store import Status, Store
from bot.types import Controls, Incoming, SessionKey

CHANNEL = SessionKey.for_channel("web", "w1", "c1")
METRIC_NAMES = (
    "llamarelay_queue_depth",
    "llamarelay_requests_running",
    "llamarelay_time_to_first_token_seconds",
    "llamarelay_inter_token_latency_seconds",
    "llamarelay_tokens_generated_total",
    "llamarelay_prompt_tokens_total",
    "llamarelay_prompt_tokens_reused_total",
    "llamarelay_replies_total",
    "llamarelay_platform_api_errors_total",
    "llamarelay_platform_rate_limited_total",
)


class Target:
    """A ReplyTarget that keeps each message's text; `fail_with` makes its next calls raise that error."""

    max_length = 2000
    min_edit_interval = 0.0

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fail_with: list[Exception] = []

    async def post(self, text: str, controls: Controls | None = None) -> int:
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.messages.append(text)
        return len(self.messages) - 1

    async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
        return await self.post(text)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.messages[handle] = text


class TooManyRequests(Exception):
    """What discord.py's HTTPException and aiohttp's errors carry: the HTTP status."""

    status = 429


@pytest.fixture
async def ops(manager: ConversationManager) -> AsyncIterator[str]:
    server = OpsServer(create_app(manager), "127.0.0.1", 0)
    url = await server.start()
    yield url
    await server.close()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def figures(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await get(url + "metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_healthz_answers_while_the_process_lives(ops: str) -> None:
    assert await get(ops + "healthz") == (200, "ok\n")


async def test_readyz_waits_for_every_platform_and_fails_without_the_database(
    ops: str, manager: ConversationManager, store: Store
) -> None:
    manager.platforms.expect(["web", "discord"])
    status, body = await get(ops + "readyz")
    assert status == 503 and '"web": "not connected"' in body and '"engine": "ok"' in body
    manager.platforms.connected("web")
    assert (await get(ops + "readyz"))[0] == 503  # Discord has not connected yet
    manager.platforms.connected("discord")
    status, body = await get(ops + "readyz")
    assert status == 200 and '"database": "ok"' in body
    manager.platforms.disconnected("discord")  # a lost gateway: not ready until it is back
    assert (await get(ops + "readyz"))[0] == 503
    manager.platforms.connected("discord")
    await store.close()
    status, body = await get(ops + "readyz")
    assert status == 503 and '"database": "failing: cannot write to the database' in body


async def test_readyz_fails_while_the_database_refuses_writes(ops: str, store: Store, settings: Settings) -> None:
    assert (await get(ops + "readyz"))[0] == 200  # (no platform is expected here)
    files = [str(settings.store.path), f"{settings.store.path}-wal"]
    subprocess.run(["chattr", "+i", *files], check=True)  # readable, but nothing can be written
    try:
        status, body = await get(ops + "readyz")
        assert await store.messages("web/ch/w1/c1") == []  # reads still work: a read probe would say ready
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    assert status == 503 and '"database": "failing: cannot write to the database' in body
    assert (await get(ops + "readyz"))[0] == 200


async def test_ops_endpoints_answer_only_to_a_loopback_host(ops: str) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 under its own name: its Host header gives it away.
    for path in ("healthz", "readyz", "metrics"):
        async with aiohttp.ClientSession() as http, http.get(ops + path, headers={"Host": "evil.example"}) as response:
            assert response.status == 403 and (await response.json())["error"] == "foreign_host"
            assert "localhost" in (await response.json())["message"]
        async with aiohttp.ClientSession() as http, http.get(ops + path, headers={"Host": "localhost:9090"}) as r:
            assert r.status == 200
    # Errors are JSON bodies here too, as on the web API and /v1 (the shared edge, adapters.http).
    async with aiohttp.ClientSession() as http, http.get(ops + "nothing") as response:
        assert response.status == 404 and await response.json() == {"error": "not_found", "message": "Not Found"}


async def test_metrics_count_a_reply_and_its_first_token(ops: str, manager: ConversationManager) -> None:
    status, text = await get(ops + "metrics")
    assert status == 200
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    before = await figures(ops)
    ttft = ("llamarelay_time_to_first_token_seconds_count", ())
    complete = ("llamarelay_replies_total", (("platform", "web"), ("status", Status.COMPLETE)))
    assert before[ttft] == 0 and complete not in before

    result = await manager.respond(Incoming(CHANNEL, "u1", "Ann", "Say hello."), Target())
    assert result.status == Status.COMPLETE
    after = await figures(ops)
    assert after[complete] == 1 and after[ttft] == 1
    assert after[("llamarelay_tokens_generated_total", ())] >= 1
    assert after[("llamarelay_inter_token_latency_seconds_count", ())] >= 1
    assert after[("llamarelay_prompt_tokens_total", ())] > after[("llamarelay_prompt_tokens_reused_total", ())]

    # The same conversation again: its earlier turns are still in the KV cache, and the count says so.
    await manager.respond(Incoming(CHANNEL, "u1", "Ann", "Again."), Target())
    again = await figures(ops)
    assert again[complete] == 2 and again[ttft] == 2
    assert again[("llamarelay_prompt_tokens_reused_total", ())] > 0
    assert again[("llamarelay_queue_depth", ())] == 0 and again[("llamarelay_requests_running", ())] == 0


async def test_metrics_say_where_the_model_runs(ops: str) -> None:
    info = {labels: value for (name, labels), value in (await figures(ops)).items() if name == "llamarelay_engine_info"}
    if gpus():  # a GPU build on a GPU machine: all 31 layers of the small model there
        [(labels, value)] = info.items()
        assert dict(labels)["device"] == "gpu" and dict(labels)["gpu_layers"] == "31" and value == 1
    else:
        assert info == {(("device", "cpu"), ("gpu_layers", "0"), ("gpus", ""), ("layers", "31")): 1}


async def test_empty_message_counts_as_a_failed_reply(ops: str, manager: ConversationManager) -> None:
    await manager.respond(Incoming(CHANNEL, "u1", "Ann", "  "), Target())
    assert (await figures(ops))[("llamarelay_replies_total", (("platform", "web"), ("status", Status.FAILED)))] == 1


async def test_platform_errors_and_429s_are_counted_by_platform(ops: str, manager: ConversationManager) -> None:
    target = Target()
    target.fail_with = [TooManyRequests("slow down"), RuntimeError("502 Bad Gateway")]
    key = SessionKey.for_dm("slack", "U1")
    result = await manager.respond(Incoming(key, "U1", "Ann", "Say hello."), target)
    assert result.delivered  # delivery retried past both failures
    after = await figures(ops)
    assert after[("llamarelay_platform_api_errors_total", (("platform", "slack"),))] == 2
    assert after[("llamarelay_platform_rate_limited_total", (("platform", "slack"),))] == 1


async def test_two_bots_in_one_process_keep_their_own_figures(
    engine: Engine, store: Store, settings: Settings, manager: ConversationManager, ops: str
) -> None:
    other = ConversationManager(engine, store, settings)
    await other.respond(Incoming(CHANNEL, "u1", "Ann", "  "), Target())
    assert ("llamarelay_replies_total", (("platform", "web"), ("status", Status.FAILED))) not in await figures(ops)
    assert (
        other.metrics.registry.get_sample_value(
            "llamarelay_replies_total", {"platform": "web", "status": Status.FAILED}
        )
        == 1
    )


async def test_the_bot_starts_the_ops_server_and_expects_its_platforms(
    manager: ConversationManager, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    settings.web.port = 0
    settings.ops.enabled, settings.ops.port = True, 0
    caplog.set_level(logging.INFO, logger="adapters.ops")
    running = asyncio.create_task(_run_adapters(manager, settings, Secrets(), mode="web"))
    try:
        async with asyncio.timeout(10):
            while not (match := re.search(r"(http://127\.0\.0\.1:\d+/)healthz", caplog.text)):
                await asyncio.sleep(0.01)
        url = match.group(1)
        assert (await get(url + "healthz"))[0] == 200
        status, body = await get(url + "readyz")
        assert '"web": ' in body and '"ops"' not in body  # the web page is expected; ops is no platform
        manager.platforms.connected("web")
        assert (await get(url + "readyz"))[0] == 200
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
