"""What the Discord benchmarks share: `llamarelay run` in a child process against a `FakeDiscord` in this one.

The bot runs as users run it (its own process, config file, DISCORD_TOKEN, SIGTERM to stop), so its memory
and its shutdown are its own. The driver reads and writes the bot's SQLite file through a second connection
(WAL allows it) with the bot's own `Store` methods, opened without migrations (which mark replies interrupted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

from bot.errors import StoreError  # noqa: E402
from bot.store.sqlite import SQLiteStore  # noqa: E402
from bot.types import Phase, ReplyStatus, SessionKey  # noqa: E402
from bot.wording import queued_line, status_line  # noqa: E402
from tests.fake_discord import GUILD_ID, FakeDiscord, Recorded  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMPTY_PLACEHOLDER = "…"  # what the Discord target sends for a message without text
START_TIMEOUT_SECONDS = 180.0
LOCKED_RETRIES = 10
STOP_TIMEOUT_SECONDS = 20.0  # `docker stop` gives 10 s; a clean exit must come well within this


def channel_key(channel_id: int) -> str:
    return str(SessionKey.for_channel("discord", str(GUILD_ID), str(channel_id)))


def is_reply_text(content: str) -> bool:
    """True if a message shows reply text, not a status line ("💭 Thinking…", a queue place) or a blank."""
    return bool(content.strip()) and content != EMPTY_PLACEHOLDER and not _is_status_line(content)


def _is_status_line(content: str) -> bool:
    """A status as the bot renders it on Discord (the harness sees only the rendered text)."""
    named = (Phase.TOOL, Phase.APPROVAL)  # "🔧 " and the tool's title, and the like
    fixed = {status_line(ReplyStatus(phase)) for phase in Phase if phase is not Phase.QUEUED and phase not in named}
    tools = tuple(status_line(ReplyStatus(phase, tool="X")).partition("X")[0] for phase in named)
    return (
        content in fixed
        or content.startswith(tools)
        or re.fullmatch(re.escape(queued_line(0)).replace("0", r"\d+"), content) is not None
    )


def write_config(directory: Path, fake: FakeDiscord, **sections: dict[str, Any]) -> Path:
    """A config.toml for the bot: defaults, pointed at ``fake`` and a store in ``directory``, plus ``sections``."""
    config: dict[str, dict[str, Any]] = {
        "engine": {"model_path": str(MODEL)},
        "store": {"path": str(directory / "llamarelay.sqlite3")},
        "web": {"enabled": False},
        "discord": {"api_base_url": fake.api_base_url, "gateway_url": fake.gateway_url},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    lines = []
    for name, values in config.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON scalars are TOML
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class BotProcess:
    """`python -m bot --config FILE run` with DISCORD_TOKEN set; its output is appended to ``log_path``."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, fake: FakeDiscord) -> None:
        """Start the bot and wait until discord.py says it is ready."""
        assert self.proc is None or self.proc.returncode is not None, "the bot is already running"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["DISCORD_TOKEN"] = "fake-token"
        ready_before = self.log().count("connected to Discord as")
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                "--config",
                str(self.config),
                "run",
                cwd=ROOT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while self.log().count("connected to Discord as") == ready_before:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self.kill()
                raise RuntimeError(f"the bot did not start; the end of its log:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.1)

    async def terminate(self) -> int:
        """SIGTERM, as `docker stop` or systemd would send; returns the exit code (the bot is killed if stuck)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            await self.kill()
            raise RuntimeError(f"the bot did not exit within {STOP_TIMEOUT_SECONDS:.0f} s of SIGTERM") from None

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing in the bot runs any more."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def rss_mb(self) -> float | None:
        """The bot process's resident memory in MB, or None if it is not running."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return kb / 1024

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


async def open_store(path: Path) -> SQLiteStore:
    """A second connection to the bot's database (made by the bot's first start), without its start-up step
    that marks replies still `generating` as interrupted."""
    store_log = logging.getLogger("bot.store.sqlite")
    level = store_log.level
    store_log.setLevel(logging.ERROR)  # not its warning that another process (the bot, of course) has it open
    try:
        return await SQLiteStore.open(path, migrate=False)
    finally:
        store_log.setLevel(level)


async def force_reply(store: SQLiteStore, key: str, text: str, max_tokens: int | None = None) -> None:
    """Make the model answer exactly ``text`` in this session: a GBNF grammar with that one string.

    max_tokens defaults to one token per byte (under a grammar the model may spell a text out byte by byte).
    """
    literal = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    for attempt in range(LOCKED_RETRIES):
        try:
            overrides = await store.sampling(key)
            await store.set_sampling(
                key,
                {**overrides, "grammar": f'root ::= "{literal}"', "max_tokens": max_tokens or len(text.encode()) + 16},
            )
            return
        except StoreError as exc:  # the bot's writes come first; after a SIGKILL, SQLite may need a moment
            if "locked" not in str(exc) or attempt == LOCKED_RETRIES - 1:
                raise
            await store._db.rollback()  # or this connection keeps reading an old snapshot
            await asyncio.sleep(1.0)


def writes(fake: FakeDiscord, channel_id: int, since: float = 0.0) -> list[Recorded]:
    """The bot's accepted message posts and edits in a channel since ``since`` (monotonic), in order."""
    prefix = f"/channels/{channel_id}/messages"
    return [
        r
        for r in fake.requests
        if r.at >= since
        and r.method in ("POST", "PATCH")
        and r.status == 200
        and (r.path == prefix or r.path.startswith(prefix + "/"))
    ]
