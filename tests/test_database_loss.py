"""A running bot whose database goes away or refuses writes, and what its logs may never show.

Real processes: `llamarelay run` (web page, /v1 and the ops endpoints) as a user starts it, its SQLite file
deleted under it, and its log scanned for every secret the test knows, with and without ``-v``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.wording import NOT_SAVED
from tests.conftest import MODEL_PATH
from tests.test_cli import ENV

API_TOKEN = "api-t0ken-that-must-stay-secret"
DB_PASSWORD = "pg-passw0rd-that-must-stay-secret"


def config(tmp_path: Path, store: str = 'path = "chat.sqlite3"') -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[engine]\nmodel_path = "{MODEL_PATH}"\nn_ctx = 1024\nn_threads = 1\n'
        "[sampling]\ntemperature = 0.0\nmax_tokens = 8\n"
        f"[store]\n{store}\n[web]\nport = 0\n[ops]\nenabled = true\nport = 0\n"
        "[api]\nenabled = true\nport = 0\n"
    )
    return path


class RunningBot:
    """`llamarelay run` in ``tmp_path`` with its log in a file; the URLs it announced."""

    def __init__(self, tmp_path: Path, verbose: bool) -> None:
        self.tmp_path = tmp_path
        self.log_path = tmp_path / "bot.log"
        self.verbose = verbose
        self.process: asyncio.subprocess.Process | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def start(self) -> RunningBot:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                *(["-v"] if self.verbose else []),
                "--config",
                str(config(self.tmp_path)),
                "run",
                cwd=self.tmp_path,
                env={**ENV, "LLAMARELAY_API_TOKEN": API_TOKEN},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        async with asyncio.timeout(60):
            while not all(marker in self.log() for marker in ("web chat on", "health and metrics on", "API on")):
                assert self.process.returncode is None, self.log()
                await asyncio.sleep(0.05)
        self.web = re.search(r"web chat on (\S+)", self.log()).group(1)  # type: ignore[union-attr]
        self.ops = re.search(r"health and metrics on (\S+)healthz", self.log()).group(1)  # type: ignore[union-attr]
        self.api = re.search(r"API on (\S+)", self.log()).group(1)  # type: ignore[union-attr]
        return self

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 20)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def ready(http: aiohttp.ClientSession, bot: RunningBot) -> tuple[int, dict[str, Any]]:
    async with http.get(bot.ops + "readyz") as response:
        return response.status, await response.json()


async def send(http: aiohttp.ClientSession, bot: RunningBot, conversation: str, text: str) -> dict[str, Any]:
    """Send ``text`` as the page does; the reply's closing ``done`` event."""
    origin = {"Origin": bot.web.rstrip("/")}
    async with http.post(
        f"{bot.web}api/conversations/{conversation}/messages", json={"text": text}, headers=origin
    ) as response:
        event = ""
        async for line in response.content:
            if line.startswith(b"event: "):
                event = line[7:].decode().strip()
            elif line.startswith(b"data: ") and event == "done":
                return dict(json.loads(line[6:]))
    raise AssertionError("the stream ended without a done event")


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
async def test_a_database_deleted_under_the_bot_fails_readiness_and_no_reply_is_called_stored(
    tmp_path: Path, http: aiohttp.ClientSession, verbose: bool
) -> None:
    bot = await RunningBot(tmp_path, verbose).start()
    try:
        async with asyncio.timeout(60):
            while (await ready(http, bot))[0] != 200:
                await asyncio.sleep(0.05)
        async with http.post(bot.web + "api/conversations", headers={"Origin": bot.web.rstrip("/")}) as response:
            conversation = (await response.json())["id"]
        browser = next(cookie.value for cookie in http.cookie_jar if cookie.key == "llamarelay_browser")
        first = await send(http, bot, conversation, "Hello!")
        assert first["status"] == "complete" and first["stored"] is True

        for file in tmp_path.glob("chat.sqlite3*"):  # what an operator's `rm data/llamarelay.sqlite3*` does
            file.unlink()
        status, body = await ready(http, bot)
        assert status == 503 and "deleted or replaced" in body["checks"]["database"]
        second = await send(http, bot, conversation, "Are you still there?")
        assert second["status"] == "failed" and second["stored"] is False and NOT_SAVED in second["notes"]
        async with http.post(
            bot.api + "/chat/completions",
            json={"messages": []},  # a refused API call too
            headers={"Authorization": "Bearer wrong"},
        ) as response:
            assert response.status == 401
    finally:
        assert await bot.stop() == 0
    log = bot.log()
    [lost] = [line for line in log.splitlines() if "ERROR   bot.store" in line]  # said once, by the store
    assert "chat.sqlite3 was deleted or replaced while the bot was running" in lost
    for secret in (browser, API_TOKEN, "web/ch/"):  # a browser id is its cookie: never in a log line
        assert secret not in log
    assert not list(tmp_path.glob("chat.sqlite3")), "nothing recreated the lost database behind the user's back"


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_database_that_cannot_be_reached_never_shows_its_password(tmp_path: Path, verbose: bool) -> None:
    import socket
    import subprocess

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    url = f"postgresql://llamarelay:{DB_PASSWORD}@127.0.0.1:{port}/llamarelay"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bot",
            *(["-v"] if verbose else []),
            "--config",
            str(config(tmp_path, f'url = "{url}"')),
            "run",
        ],
        cwd=tmp_path,
        env=ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "cannot" in result.stderr and f"127.0.0.1:{port}" in result.stderr
    assert DB_PASSWORD not in result.stderr + result.stdout
