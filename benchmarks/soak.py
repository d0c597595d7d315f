"""Soak: 8 channels on the fake Discord with random prompts, /stop, /reset, 429s, a restart and a crash.

Run: .venv/bin/python benchmarks/soak.py [--minutes 10] [--seed N] [--threads 1] [--state-cache-mb 0] [--keep]

`llamarelay run` (default config, except: no per-user rate limit; one llama.cpp thread, because two threads
that spin-wait for each other take seconds per decode step when other processes want the CPU; no saved-KV
cache, which fills by design and would hide a leak) runs in a child process, with the small default model
and SQLite in a temp dir, against the fake Discord on 127.0.0.1. Each channel gets random messages (long fenced
lines, huge messages, CJK, emoji, combining marks), now and then two or three at once, and random /stop and
/reset (sometimes a mention right behind a /reset). Every 20th message edit is answered 429 (with ``Via``
before the restart, so discord.py retries it; without after, so the bot's delivery does). Halfway the bot
gets SIGTERM and is started again; at 80 % it is killed with SIGKILL and started again.

The model's replies are forced with a per-session GBNF grammar to random text, so what it wrote is known.
Checks (exit 1 if any fails): each reply's messages are exactly the pieces of its text plus notes
(`split_reply`), so never more messages than its pieces need; every stored reply is the forced text
(complete) or a prefix of it (stopped, interrupted); no message goes unanswered or unstored; nothing is
left `generating` after a SIGTERM; a crash keeps the text shown 5 s before it; the bot's RSS after warm-up
stays within 30 MB of its level at the end of warm-up; the bot logs no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discord_harness import BotProcess, channel_key, force_reply, is_reply_text, open_store, write_config, writes

from bot.delivery import display_text
from bot.replies import split_reply
from bot.store import Status
from bot.store.sqlite import SQLiteStore
from bot.wording import RESET_NOTE, STOPPED_NOTE
from tests.fake_discord import ALICE_ID, BOB_ID, FakeDiscord, FakeInteraction

CHANNELS = 8
LIMIT = 2000  # Discord's message length; the bot's Discord target measures it with len()
EDIT_429_EVERY = 20
EDIT_PATH = r"/channels/\d+/messages/\d+"
WARM_UP_MINUTES = 2.0
RSS_GROWTH_LIMIT_MB = 30.0
RSS_SAMPLE_SECONDS = 5.0
REFRESH_SECONDS = 0.5
STUCK_SECONDS = 300.0  # a message with no stored or shown outcome after this long is a failure
SHORT_TEXT_MAX = 1500  # with any note it still fits one message, so several mentions may share such a text
MAX_PENDING = 3  # unanswered mentions per channel (the bot's default cap is 5 waiting)
CHECKPOINT_MARGIN_SECONDS = 5.0  # text shown this long before a crash must be in the stored checkpoint
MAX_TEXT_BYTES = 2800  # a forced text needs up to one token per byte, within the 4,096-token window
MAX_TOKENS_FLOOR = 3200  # every reply may be this long, so prompts stay under ~900 tokens (prefill is slow)
NONCE = re.compile(r"\[m\d+\]")
FENCE_LINE = re.compile(r"`{3,}[\w+-]*")

# ------------------------------------------------------------------ random text

WORDS = (
    "the of and to in is you that it was for on are as with they at be this have from or one had by word "
    "but not what all were we when your can said there use each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go "
    "see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part"
).split()
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Thank you for your understanding and cooperation.",
    "Here is a short summary of the main points.",
    "Let me know if you have any other questions!",
    "This is a common pattern in many programming languages.",
    "I hope this helps you get started.",
]
CJK = [
    "日本語の文章です。",
    "中文字符测试，",
    "你好，世界！",
    "한국어 문장입니다.",
    "漢字かな交じり文",
    "「引用」と（括弧）",
]
EMOJI = ["👍", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "🤖", "❤️", "🧑🏿‍💻", "😀", "🫠"]
COMBINING = [
    "e\u0301",
    "a\u0308\u0323",
    "n\u0303",
    "o\u0328\u0304",
    "Z\u0335\u0321",
    "\u0915\u094d\u0937\u093f",
    "\u05e9\u05c1\u05b8",
]
CODE = [
    "var a=1;",
    "function f(b){return b*2}",
    "if(x){y()}else{z()};",
    "a.b.c(d,e);",
    'x="q\\"s\\\\n";',
    "for(let i=0;i<n;i++){s+=i}",
    "const q=[1,2,3].map(v=>v+1);",
    "`${t}`;",
    "/[a-z]+/g.test(w);",
]
LANGS = ["", "js", "python", "c++", "text"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def prose(rng: random.Random, length: int, unicode: bool = False) -> str:
    parts: list[str] = []
    size = 0
    while size < length:
        roll = rng.random()
        if unicode and roll < 0.3:
            part = rng.choice([rng.choice(CJK), rng.choice(EMOJI) + " ", rng.choice(COMBINING) + " "])
        elif roll < 0.4:  # plain sentences: the model writes them a word per token, random words letter by letter
            part = rng.choice(SENTENCES) + " "
        elif roll < 0.42:
            part = words(rng, rng.randint(3, 12)).capitalize() + rng.choice([". ", "! ", "? ", ", "])
        elif roll < 0.47:
            part = "\n\n"
        elif roll < 0.5:
            part = "\n- " + words(rng, rng.randint(2, 6))
        elif roll < 0.6:
            part = words(rng, rng.randint(1, 8)) + " "
        else:
            part = rng.choice(SENTENCES) + " "
        parts.append(part)
        size += len(part)
    return "".join(parts)[:length]


def minified(rng: random.Random, length: int) -> str:
    line = ""
    while len(line) < length:
        line += rng.choice(CODE)
    return line[:length]


def reply_text(rng: random.Random, long: bool) -> str:
    """A random text for the model to write: long ones (2,050-2,600 chars) need two or more messages."""
    length = rng.randint(2050, 2600) if long else rng.choice([rng.randint(5, 120), rng.randint(120, SHORT_TEXT_MAX)])
    kind = rng.choice(["prose", "unicode", "fence-line", "code-block", "inline"])
    if kind == "prose":
        text = prose(rng, length)
    elif kind == "unicode":
        text = prose(rng, length, unicode=True)
    elif kind == "fence-line":  # the runaway case: ``` and thousands of characters on its opening line
        lang = rng.choice(LANGS)
        text = "```" + lang + minified(rng, length)
        if rng.random() < 0.5:
            text = text[: length - 12] + "\n```\nDone."
    elif kind == "code-block":
        head = prose(rng, rng.randint(0, 200))
        body = "\n".join(minified(rng, rng.randint(10, 900)) for _ in range(rng.randint(1, 4)))
        text = f"{head}\n```{rng.choice(LANGS)}\n{body}\n```\n" + prose(rng, max(0, length - len(head) - len(body)))
    else:  # triple backticks on one line, which is no open fence
        text = f"Run ```{rng.choice(CODE)}``` then " + prose(rng, length)
    text = text[:length] if long else text[:SHORT_TEXT_MAX]
    while len(text.encode()) > MAX_TEXT_BYTES:
        text = text[:-50]
    return text.strip() or "Empty? No."


def prompt_text(rng: random.Random, nonce: str) -> str:
    roll = rng.random()
    if roll < 0.6:
        body = words(rng, rng.randint(2, 30)) + "?"
    elif roll < 0.75:
        body = f"fix this:\n```{rng.choice(LANGS)}\n{minified(rng, rng.randint(1000, 5000))}\n```"
    elif roll < 0.95:
        body = prose(rng, rng.randint(20, 600), unicode=True)
    else:  # huge: more than max_message_chars (50,000) at times
        body = prose(rng, rng.randint(15_000, 60_000), unicode=rng.random() < 0.3)
    return f"{nonce} {body}"


# ------------------------------------------------------------------ bookkeeping


@dataclass
class Row:
    status: str
    content: str
    notes: str


@dataclass(eq=False)
class Mention:
    """One message pushed to a channel, and what became of it."""

    id: int
    channel: int
    nonce: str
    expected: str  # the forced text of the channel when it was pushed
    at: float
    reply_id: int | None = None  # its reply's row, once seen in the database
    row: Row | None = None  # that row as last read
    fate: str = ""  # stored, refused, cleared, crashed, lost, stuck; "" while unsettled
    refusal_seen: bool = False
    checkpoint: str | None = None  # the reply's row at the crash, if it was still generating


@dataclass
class Reset:
    channel: int
    at: float
    interaction: FakeInteraction


@dataclass
class Figures:
    sent: int = 0
    long_texts: int = 0
    bursts: int = 0
    stops: int = 0
    resets: int = 0
    mention_after_reset: int = 0
    rss: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, run, MB)
    graceful_exit_codes: list[int] = field(default_factory=list)
    left_generating_at_restart: int = 0
    crash_at: float | None = None
    errors: list[str] = field(default_factory=list)


def pieces(text: str) -> list[str]:
    return [piece.text for piece in split_reply(text, LIMIT, len)]


def matching_prefix(observed: list[str], expected: str, last_notes: tuple[str, ...]) -> int | None:
    """The k for which ``observed`` are the pieces of ``expected[:k]`` plus notes ending with one of
    ``last_notes`` ("" for none), if there is one. The notes are read off the end of what is shown."""
    tail = observed[-1]
    candidates = {tail.rsplit("\n\n", 1)[-1], tail} if any(last_notes) else {""}
    for note in candidates:
        if note and not any(note.endswith(last) for last in last_notes if last):
            continue
        shown = sum(map(len, observed)) - len(note)
        near = range(max(0, shown - 64), min(len(expected), shown + 64) + 1)
        for k in [*near, *range(len(expected), -1, -1)]:
            if pieces(display_text(expected[:k], note)) == observed:
                return k
    return None


class Soak:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.directory = directory
        self.rng = random.Random(args.seed)
        self.fake = FakeDiscord()
        self.mentions: list[Mention] = []
        self.by_nonce: dict[str, Mention] = {}
        self.current: dict[int, str] = {}
        self.resets: list[Reset] = []
        self.figures = Figures()
        self.run = 1
        self.up = asyncio.Event()
        self.started = time.monotonic()
        self.sending_until = 0.0
        self.last_row_id = 0
        self.bot: BotProcess
        self.store: SQLiteStore
        self.db: Any  # the store's aiosqlite connection, for reads of a few columns in bulk

    # -- driving ---------------------------------------------------------------------------------------

    async def set_text(self, channel: int, long: bool) -> None:
        text = reply_text(self.rng, long)
        await force_reply(
            self.store, channel_key(channel), text, max_tokens=max(MAX_TOKENS_FLOOR, len(text.encode()) + 16)
        )
        self.current[channel] = text
        self.figures.long_texts += long

    async def mention(self, channel: int) -> None:
        if not self.up.is_set():
            return
        nonce = f"[m{len(self.mentions)}]"
        text = prompt_text(self.rng, nonce)
        at = time.monotonic()
        mention = Mention(0, channel, nonce, self.current[channel], at)
        self.mentions.append(mention)
        self.by_nonce[nonce] = mention
        mention.id = await self.fake.message_create(
            text, channel_id=channel, author_id=self.rng.choice([ALICE_ID, BOB_ID])
        )
        self.figures.sent += 1

    async def slash(self, channel: int, name: str) -> None:
        if not self.up.is_set():
            return
        at = time.monotonic()
        interaction = await self.fake.slash(name, channel_id=channel, user_id=self.rng.choice([ALICE_ID, BOB_ID]))
        if name == "reset":
            self.resets.append(Reset(channel, at, interaction))
            self.figures.resets += 1
        else:
            self.figures.stops += 1

    def pending(self, channel: int) -> list[Mention]:
        return [m for m in self.mentions if m.channel == channel and not m.fate]

    def generating(self, mention: Mention) -> bool:
        """True once its reply shows text: its prompt (and grammar) was read, a new text cannot touch it."""
        first = self.fake.replies_to(mention.id)
        return bool(first) and is_reply_text(first[0]["content"])

    async def drive(self, channel: int) -> None:
        """One channel's user until sending time is over: a message when the last is answered (now and then two
        or three at once, or one more while a reply streams), /stop while a reply streams, /reset at times.

        Rates suit an engine that writes a few dozen tokens a second: each reply should have time to finish.
        """
        rng = random.Random(self.rng.random())
        while time.monotonic() < self.sending_until:
            await self.up.wait()
            pending = self.pending(channel)
            streaming = [m for m in pending if self.generating(m)]
            may_change = len(streaming) == len(pending)  # nothing waits to read the grammar
            roll = rng.random()
            if streaming and roll < 0.04:
                await self.slash(channel, "stop")
            elif roll < 0.06:
                await self.slash(channel, "reset")
                if may_change and rng.random() < 0.5:
                    await self.set_text(channel, long=rng.random() < 0.3)
                    await self.mention(channel)  # right behind the /reset, while it waits for the running reply
                    self.figures.mention_after_reset += 1
            elif not pending:
                burst = rng.choice([1] * 9 + [2, 3])
                await self.set_text(channel, long=burst == 1 and rng.random() < 0.4)
                self.figures.bursts += burst > 1
                for _ in range(burst):
                    await self.mention(channel)
            elif roll < 0.12 and len(pending) < MAX_PENDING:
                if may_change:
                    await self.set_text(channel, long=rng.random() < 0.3)
                    await self.mention(channel)
                elif len(self.current[channel]) <= SHORT_TEXT_MAX:  # waits behind others with the same text
                    await self.mention(channel)
            await asyncio.sleep(rng.uniform(2.0, 8.0))

    # -- watching --------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read new and changed rows, and settle what became of each unsettled mention."""
        async with self.db.execute(
            "SELECT id, role, substr(content, 1, 24) FROM messages WHERE id > ? ORDER BY id", (self.last_row_id,)
        ) as cursor:
            for row_id, role, head in await cursor.fetchall():
                self.last_row_id = row_id
                if role == "user" and (match := NONCE.match(head)) and match.group() in self.by_nonce:
                    self.by_nonce[match.group()].reply_id = row_id + 1  # add_exchange writes both rows together
        open_ids = [m.reply_id for m in self.mentions if m.reply_id and not m.fate]
        rows: dict[int, Row] = {}
        if open_ids:
            marks = ",".join("?" * len(open_ids))
            async with self.db.execute(
                f"SELECT id, status, content, notes FROM messages WHERE id IN ({marks})", open_ids
            ) as cursor:
                rows = {row_id: Row(*rest) for row_id, *rest in await cursor.fetchall()}
        now = time.monotonic()
        for m in self.mentions:
            if m.fate:
                continue
            if m.reply_id is not None:
                row = rows.get(m.reply_id)
                if row is not None:
                    m.row = row
                    if row.status != Status.GENERATING:
                        m.fate = "stored"
                elif m.row is not None:  # deleted: by a /reset sent after it, or else it is stored nowhere
                    m.fate = "cleared" if self.reset_after(m, answered=False) else "lost"
                continue
            first = self.fake.replies_to(m.id)
            if first and first[0]["content"].startswith("⚠️"):
                m.fate = "refused" if m.refusal_seen else ""  # no row came in a whole refresh: none will
                m.refusal_seen = True
            elif self.reset_after(m):
                m.fate = "cleared"
            elif now - m.at > STUCK_SECONDS:
                m.fate = "stuck"

    def reset_after(self, m: Mention, answered: bool = True) -> bool:
        """True if a /reset was sent after ``m`` in its channel (and, with ``answered``, has cleared the history,
        so ``m`` was cancelled before)."""
        return any(
            r.channel == m.channel and r.at > m.at and (not answered or self.reset_outcome(r) == "cleared")
            for r in self.resets
        )

    def reset_outcome(self, reset: Reset) -> str:
        """cleared, failed, or "" while unanswered."""
        if not reset.interaction.original_id:
            return ""
        return "cleared" if "cleared" in self.fake.messages[reset.interaction.original_id]["content"] else "failed"

    def reset_running(self, m: Mention) -> str:
        """A note if a /reset in the channel of ``m`` was sent before it and answered after it (so the reset's
        deletion of the history may have taken the rows of ``m`` too), else ""."""
        for r in self.resets:
            answers = [
                q.at for q in self.fake.requests if r.interaction.token in q.path and q.path.endswith("/callback")
            ]
            if r.channel == m.channel and r.at < m.at and (not answers or answers[0] > m.at):
                answered = f"answered {answers[0] - m.at:.2f} s after it" if answers else "never answered"
                return f", sent while a /reset ran (the /reset was sent {m.at - r.at:.2f} s before it, {answered})"
        return ""

    async def watch(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS)

    async def sample_rss(self) -> None:
        while True:
            rss = self.bot.rss_mb()
            if rss is not None:
                self.figures.rss.append((time.monotonic() - self.started, self.run, rss))
            await asyncio.sleep(RSS_SAMPLE_SECONDS)

    # -- restarts --------------------------------------------------------------------------------------

    async def restart(self) -> None:
        """SIGTERM, as `docker stop` sends: replies in flight are ended and stored; then start again."""
        self.up.clear()
        await asyncio.sleep(1.5)  # mentions and commands already sent reach the bot
        self.figures.graceful_exit_codes.append(await self.bot.terminate())
        async with self.db.execute("SELECT COUNT(*) FROM messages WHERE status = ?", (Status.GENERATING,)) as cur:
            (self.figures.left_generating_at_restart,) = await cur.fetchone()  # type: ignore[misc]
        for _ in range(2):
            await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS)
        for m in self.mentions:
            if not m.fate:
                self.figures.errors.append(f"{m.nonce}: no outcome after the SIGTERM shutdown")
                m.fate = "stuck"
        self.fake.clear_scripts()  # from now on without Via: discord.py gives up, the bot's delivery retries
        self.fake.script_status("PATCH", EDIT_PATH, times=10**9, every=EDIT_429_EVERY, via=False)
        self.run += 1
        await self.bot.start(self.fake)
        self.up.set()

    async def crash(self) -> None:
        """SIGKILL while a reply has streamed for a while; the rows it leaves must keep what was shown."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(self.streamed_since(m) for m in self.pending_all()):
            await asyncio.sleep(0.2)
        self.up.clear()
        await self.bot.kill()
        self.figures.crash_at = time.monotonic()
        await self.refresh()
        async with self.db.execute("SELECT id, content FROM messages WHERE status = ?", (Status.GENERATING,)) as cur:
            left = dict(await cur.fetchall())  # type: ignore[arg-type]
        for m in self.mentions:
            if not m.fate:
                m.fate = "crashed"
                if m.reply_id in left:
                    m.checkpoint = left[m.reply_id]
        self.run += 1
        await self.bot.start(self.fake)
        self.up.set()

    def pending_all(self) -> list[Mention]:
        return [m for m in self.mentions if not m.fate]

    def streamed_since(self, m: Mention) -> float | None:
        """When the reply's first message first showed text, if over CHECKPOINT_MARGIN_SECONDS ago."""
        shown = self.shown_at(m, time.monotonic() - CHECKPOINT_MARGIN_SECONDS)
        return shown[0] if shown else None

    def shown_at(self, m: Mention, moment: float) -> tuple[float, str] | None:
        """(when text first showed, the text shown at ``moment``) for the reply's first message, or None."""
        first = self.fake.replies_to(m.id)
        if not first:
            return None
        path = f"/channels/{m.channel}/messages/{first[0]['id']}"
        shown = [
            r
            for r in writes(self.fake, m.channel)
            if r.at <= moment
            and (
                r.path == path
                or (
                    r.method == "POST"
                    and ((r.body or {}).get("message_reference") or {}).get("message_id") == str(m.id)
                )
            )
        ]
        texts = [(r.at, r.body.get("content") or "") for r in shown if is_reply_text(r.body.get("content") or "")]
        return (texts[0][0], texts[-1][1]) if texts else None

    async def scenario(self) -> None:
        """Drive every channel until sending time is over; the restart at half time, the crash at 80 %."""
        drivers = [asyncio.create_task(self.drive(c)) for c in self.channels]
        seconds = self.args.minutes * 60
        await asyncio.sleep(seconds * 0.5)
        await self.restart()
        await asyncio.sleep(max(0.0, self.started + seconds * 0.8 - time.monotonic()))
        await self.crash()
        await asyncio.gather(*drivers)

    async def drain(self) -> None:
        """Let the last replies finish (stopping what still runs after a while), then wait for quiet."""
        for phase_seconds in (120, 60):
            deadline = time.monotonic() + phase_seconds
            while self.pending_all() and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            if not self.pending_all():
                break
            for channel in {m.channel for m in self.pending_all()}:
                await self.slash(channel, "stop")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(writes(self.fake, c, time.monotonic() - 2) for c in self.channels):
            await asyncio.sleep(0.5)

    # -- the run ---------------------------------------------------------------------------------------

    async def main(self) -> bool:
        args = self.args
        async with self.fake:
            self.channels = self.fake.add_text_channels(CHANNELS)  # before the bot connects: GUILD_CREATE has them
            engine = {"n_threads": args.threads, "state_cache_mb": args.state_cache_mb}
            config = write_config(self.directory, self.fake, discord={"user_messages_per_minute": 0}, engine=engine)
            self.fake.script_status("PATCH", EDIT_PATH, times=10**9, every=EDIT_429_EVERY, via=True)
            self.bot = BotProcess(config, self.directory / "bot.log")
            await self.bot.start(self.fake)
            self.store = await open_store(self.directory / "llamarelay.sqlite3")
            self.db = self.store._db
            self.started = time.monotonic()
            self.sending_until = self.started + args.minutes * 60
            self.up.set()
            helpers = [asyncio.create_task(self.watch()), asyncio.create_task(self.sample_rss())]
            try:
                await self.scenario()
                await self.drain()
                self.figures.graceful_exit_codes.append(await self.bot.terminate())
                for task in helpers:
                    task.cancel()
                await self.refresh()
                return await self.verify()
            finally:
                for task in helpers:
                    task.cancel()
                await self.bot.kill()
                await self.store.close()

    # -- checks ----------------------------------------------------------------------------------------

    def attribute(self) -> tuple[dict[Mention, list[str]], list[str]]:
        """Each mention's messages (first, then continuations) as they read now; and messages nobody owns.

        A first message answers its mention. A continuation (short texts never have one) goes to the long reply
        before it in its channel whose next expected piece it is; else whose text holds its opening; else to the
        newest long reply before it.
        """
        shown: dict[Mention, list[str]] = {m: [] for m in self.mentions}
        orphans: list[str] = []
        for channel in self.channels:
            firsts: list[tuple[int, Mention]] = []
            for m in self.mentions:
                if m.channel == channel and (first := self.fake.replies_to(m.id)):
                    firsts.append((int(first[0]["id"]), m))
                    shown[m] += [message["content"] for message in first]
            firsts.sort(key=lambda pair: pair[0])
            for message in self.fake.bot_messages(channel):
                if message.get("message_reference") or message.get("interaction_token"):
                    continue
                candidates = [
                    m for first_id, m in firsts if first_id < int(message["id"]) and len(m.expected) > SHORT_TEXT_MAX
                ]
                if not candidates:
                    orphans.append(f"message {message['id']} in channel {channel}: {message['content'][:60]!r}")
                    continue
                shown[self.owner(message["content"], candidates, shown)].append(message["content"])
        return shown, orphans

    def owner(self, content: str, candidates: list[Mention], shown: dict[Mention, list[str]]) -> Mention:
        def next_piece(m: Mention) -> str | None:
            if m.fate != "stored" or m.row is None:
                return None
            wanted = pieces(display_text(m.row.content, m.row.notes))
            return wanted[len(shown[m])] if len(shown[m]) < len(wanted) else None

        if exact := [m for m in candidates if next_piece(m) == content]:
            return exact[-1]
        lines = content.split("\n")
        opening = "\n".join(lines[1:] if FENCE_LINE.fullmatch(lines[0]) else lines)[:120]
        if len(opening) >= 40 and (holding := [m for m in candidates if opening in m.expected]):
            return holding[-1]
        return candidates[-1]

    async def verify(self) -> bool:
        f = self.figures
        ok = True

        def check(passed: bool, what: str, details: list[str] | None = None) -> None:
            nonlocal ok
            ok &= passed
            print(f"check: {what}: {'ok' if passed else 'FAILED'}")
            for line in (details or [])[:10]:
                print(f"    {line}")

        async with self.db.execute("SELECT id, role, status, content, notes FROM messages ORDER BY id") as cursor:
            rows = {row[0]: row for row in await cursor.fetchall()}
        statuses: collections.Counter[str] = collections.Counter()
        wrong_text: list[str] = []
        for row_id, role, status, content, _notes in rows.values():
            if role != "assistant":
                continue
            statuses[status] += 1
            user = rows.get(row_id - 1)
            match = NONCE.match(user[3]) if user and user[1] == "user" else None
            m = self.by_nonce.get(match.group()) if match else None
            if m is None:
                wrong_text.append(f"row {row_id}: no message of ours before it")
                continue
            good = content == m.expected if status == Status.COMPLETE else m.expected.startswith(content)
            if not good:
                wrong_text.append(f"{m.nonce} ({status}): stored {content[:80]!r}, forced {m.expected[:80]!r}")
            if m.checkpoint is not None and (status != Status.INTERRUPTED or content != m.checkpoint):
                wrong_text.append(
                    f"{m.nonce}: after the crash {status} {len(content)} chars, checkpoint {len(m.checkpoint)}"
                )

        shown, orphans = self.attribute()
        fates = collections.Counter(m.fate or "unsettled" for m in self.mentions)
        per_reply: collections.Counter[int] = collections.Counter()
        too_many, mismatched, lost = [], [], []
        unverified = 0
        for m in self.mentions:
            seen = shown[m]
            per_reply[len(seen)] += 1
            if m.fate == "stored":
                assert m.row is not None
                want = pieces(display_text(m.row.content, m.row.notes))
                matches, need = seen == want, len(want)
            elif m.fate == "refused":
                matches, need = len(seen) == 1 and seen[0].startswith("⚠️"), 1
            elif m.fate == "cleared":
                matches = bool(seen) and matching_prefix(seen, m.expected, (RESET_NOTE, STOPPED_NOTE)) is not None
                need = len(seen) if matches else len(pieces(display_text(m.expected, STOPPED_NOTE)))
            elif m.fate == "crashed":
                if not seen or (len(seen) == 1 and not is_reply_text(seen[0])):
                    matches, need = True, 1
                elif matching_prefix(seen, m.expected, ("",)) is not None:
                    matches, need = True, len(seen)
                else:  # killed between two edits of a long reply: only the count can be checked
                    unverified += 1
                    matches, need = True, len(pieces(m.expected))
            else:
                lost.append(
                    f"{m.nonce} in channel {m.channel} ({m.fate or 'unsettled'}): shown "
                    f"{[s[:40] for s in seen]}, row {m.row and (m.row.status, m.row.content[:40])}"
                    f"{self.reset_running(m)}"
                )
                continue
            if len(seen) > need:
                too_many.append(f"{m.nonce} ({m.fate}): {len(seen)} messages, its text needs {need}")
            if not matches:
                mismatched.append(
                    f"{m.nonce} ({m.fate}, {m.row and m.row.status}): shown {[(len(s), s[-40:]) for s in seen]}"
                )

        print(
            f"mentions sent: {f.sent} ({f.bursts} bursts of 2-3; {f.long_texts} long forced texts); "
            f"/stop sent: {f.stops}; /reset sent: {f.resets} ({f.mention_after_reset} with a mention right "
            f"behind; {sum(self.reset_outcome(r) == 'failed' for r in self.resets)} answered with an error)"
        )
        print(
            f"restarts: {len(f.graceful_exit_codes) - 1} by SIGTERM (exit codes {f.graceful_exit_codes}, the last "
            f"ends the run), 1 crash by SIGKILL; bot processes: {self.bot.starts}"
        )
        answered_429 = sum(r.status == 429 for r in self.fake.requests)
        edits = len(self.fake.matching("PATCH", EDIT_PATH))
        print(f"edits: {edits}, answered 429: {answered_429}")
        print("replies stored by status:", dict(statuses.most_common()))
        print("what became of each mention:", dict(fates.most_common()))
        print(
            "messages per reply:",
            dict(sorted(per_reply.items())),
            f"(crash-cut displays checked by count only: {unverified})",
        )
        crashed = [m for m in self.mentions if m.checkpoint is not None]
        checkpoint_problems = []
        assert f.crash_at is not None
        print(f"crash: {len(crashed)} replies were still being written")
        for m in crashed:
            kept = len(m.checkpoint or "")
            before = self.shown_at(m, f.crash_at - CHECKPOINT_MARGIN_SECONDS)
            shown_before = len(before[1]) if before else 0
            if at_crash := self.shown_at(m, f.crash_at):
                print(
                    f"    {m.nonce} showed {len(at_crash[1])} chars in its first message, {shown_before} of them "
                    f"{CHECKPOINT_MARGIN_SECONDS:.0f} s before the crash; its checkpoint kept {kept}"
                )
            if kept < shown_before - 8:  # 8: a closing fence the display may add
                checkpoint_problems.append(f"{m.nonce}: checkpoint {kept} chars, shown {shown_before}")
        minutes = collections.defaultdict(list)
        for seconds, run, mb in f.rss:
            minutes[int(seconds // 60)].append((run, mb))
        print(
            "bot RSS per minute (MB, max; process):",
            ", ".join(
                f"{minute}: {max(mb for _, mb in samples):.0f} (#{samples[-1][0]})"
                for minute, samples in sorted(minutes.items())
            ),
        )
        warm_up = min(WARM_UP_MINUTES, self.args.minutes / 4) * 60
        base = [mb for seconds, _, mb in f.rss if seconds <= warm_up]
        later = [mb for seconds, _, mb in f.rss if seconds > warm_up]
        growth = max(later) - base[-1] if base and later else 0.0
        log = self.bot.log()
        tracebacks = log.count("Traceback (most recent call last)")
        errors = [line for line in log.splitlines() if " ERROR " in line]
        print(
            f"bot log: {len(log.splitlines())} lines, {log.count(' WARNING ')} warnings, {len(errors)} errors, "
            f"{tracebacks} tracebacks"
        )
        for line in errors[:5]:
            print(f"    {line[:200]}")

        check(not too_many, "no reply posted more messages than its pieces need", too_many)
        check(not orphans, "every posted message belongs to a reply", orphans)
        check(not mismatched, "each reply shows exactly the pieces of its stored text + notes", mismatched)
        check(not wrong_text, "every stored reply is the forced text (complete) or a prefix of it", wrong_text)
        check(not lost and not f.errors, "every message got a stored or shown outcome", lost + f.errors)
        check(
            statuses[Status.GENERATING] == 0 and f.left_generating_at_restart == 0,
            f"nothing left generating (after the run: {statuses[Status.GENERATING]}, after the SIGTERM restart: "
            f"{f.left_generating_at_restart})",
        )
        check(all(code == 0 for code in f.graceful_exit_codes), "the bot exits 0 on SIGTERM")
        check(
            not checkpoint_problems,
            f"a crash keeps the text shown {CHECKPOINT_MARGIN_SECONDS:.0f} s before it "
            f"({len(crashed)} replies were cut)",
            checkpoint_problems,
        )
        check(
            growth < RSS_GROWTH_LIMIT_MB,
            f"RSS after warm-up ({warm_up / 60:.1f} min) grows {growth:.1f} MB < {RSS_GROWTH_LIMIT_MB:.0f} MB",
        )
        check(tracebacks == 0, "no traceback in the bot's log")
        return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long messages are sent")
    parser.add_argument("--seed", type=int, default=None, help="for the random prompts and replies")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="[engine] n_threads (0: all cores, the config's default); see the note above",
    )
    parser.add_argument(
        "--state-cache-mb",
        type=int,
        default=0,
        help="[engine] state_cache_mb; it fills by design, so above 0 it shows as RSS growth",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (database, bot log)")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    print(f"soak: {args.minutes:g} minutes, {CHANNELS} channels, seed {args.seed}")
    directory = Path(tempfile.mkdtemp(prefix="llamarelay-soak-"))
    try:
        ok = asyncio.run(Soak(args, directory).main())
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
