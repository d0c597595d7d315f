"""First content on Discord: time from a mention to the first message the bot writes that holds reply text.

Run: .venv/bin/python benchmarks/first_content.py [--mentions 15] [--together 8] [--max-tokens 32] [--threads N]

`llamarelay run` (default config but a short max_tokens and no per-user rate limit; the small default model;
SQLite in a temp dir) talks through the real discord.py to the fake Discord on 127.0.0.1. With the engine
idle, one mention at a time, each in a channel of its own: the time from the fake pushing MESSAGE_CREATE until
it receives the first post or edit of the reply that is not a status line ("💭 Thinking…"). Prints median /
p90 / worst and checks median <= 0.5 s; then the same for mentions in 8 channels at once (checks median <= 1 s,
worst <= 2 s); then a conversation of long messages whose history overflows the window while 7 other channels
chat (checks every turn <= 2 x its next turns' with the other channels quiet, and <= 3 x a message of the same
length mentioned in a new channel of an idle bot). First, for reference, the
engine's own time to first token for the same prompts.

Stream rate: a long reply (``--stream-tokens``, written past the end of turn) in a channel of its own, on an idle
engine: the tokens of text that reach Discord between the first write with reply text and the last write, per
second, against the tokens per second the engine alone writes such a reply at from its first token (checks >=
0.9x). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from discord_harness import MODEL, BotProcess, channel_key, is_reply_text, open_store, write_config, writes

from bot.config import EngineSettings, SamplingSettings, Settings
from bot.engine import Engine, QueuePosition
from bot.store import Status, Store
from tests.fake_discord import FakeDiscord

TARGET_MEDIAN_SECONDS = 0.5
TARGET_STREAM_RATE = 0.9  # of the engine's own rate
REPLY_TIMEOUT_SECONDS = 60.0
LONG_TURN_TIMEOUT_SECONDS = 300.0  # a long message beside 7 busy channels on a small CPU


async def first_content(
    fake: FakeDiscord, channel_id: int, mentioned: float, timeout: float = REPLY_TIMEOUT_SECONDS
) -> tuple[float, bool]:
    """(seconds until the first write with reply text, whether a status line was shown before it)."""
    deadline = mentioned + timeout
    while time.monotonic() < deadline:
        seen = writes(fake, channel_id, mentioned)
        for index, write in enumerate(seen):
            if is_reply_text((write.body or {}).get("content") or ""):
                return write.at - mentioned, index > 0
        await asyncio.sleep(0.005)
    raise RuntimeError(f"no reply text in channel {channel_id} within {timeout:.0f} s")


async def wait_answered(store: Store, channel_ids: list[int], fake: FakeDiscord) -> None:
    """Until every reply in these channels is stored and its last edit is out: the engine is idle again."""
    deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        rows = [m for c in channel_ids for m in await store.messages(channel_key(c))]
        replies = [m for m in rows if m.role == "assistant"]
        quiet = all(not writes(fake, c, time.monotonic() - 0.3) for c in channel_ids)
        if len(replies) == len(channel_ids) and all(m.status != Status.GENERATING for m in replies) and quiet:
            return
        await asyncio.sleep(0.05)
    shown = {c: [(r.method, (r.body or {}).get("content", "")[:80]) for r in writes(fake, c)] for c in channel_ids}
    raise RuntimeError(
        f"replies in {channel_ids} not finished within {REPLY_TIMEOUT_SECONDS:.0f} s: "
        f"stored {[(m.role, m.status, m.content[:80]) for m in rows]}, shown {shown}"
    )


def question(number: int) -> str:
    return f"Question {number}: name a colour and say why you like it."


async def engine_first_tokens(threads: int | None, count: int) -> list[float]:
    """For reference: the engine's own time to first token here, for the same prompts, without Discord."""
    settings = EngineSettings(model_path=MODEL, **({} if threads is None else {"n_threads": threads}))
    engine = await asyncio.to_thread(Engine, settings)
    system = Settings().conversation.system_prompt
    times = []
    try:
        for number in range(count):
            prompt = engine.chat_tokens(
                [{"role": "system", "content": system}, {"role": "user", "content": question(100 + number)}]
            )
            started = time.monotonic()
            async for event in engine.submit(prompt, SamplingSettings(max_tokens=1), session=str(number)):
                if not isinstance(event, QueuePosition):
                    times.append(time.monotonic() - started)
            await asyncio.sleep(0.5)
    finally:
        engine.close()
    return times


def stream_sampling(tokens: int) -> dict[str, Any]:
    """A reply of exactly ``tokens`` tokens, the same each time (greedy, past the end of turn)."""
    return {"max_tokens": tokens, "ignore_eos": True, "temperature": 0.0}


def token_counter() -> Callable[[str], int]:
    """How many tokens of the model a text is (its vocabulary only: no weights, no context)."""
    import llama_cpp  # here: the harness sets libgomp's spin before llama.cpp loads

    vocab = llama_cpp.Llama(str(MODEL), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False))


async def engine_stream_rates(threads: int | None, tokens: int, runs: int) -> list[float]:
    """For reference: tokens per second the engine alone writes a long reply at, after its first token."""
    settings = EngineSettings(model_path=MODEL, **({} if threads is None else {"n_threads": threads}))
    engine = await asyncio.to_thread(Engine, settings)
    system = Settings().conversation.system_prompt
    rates = []
    try:
        for number in range(runs):
            prompt = engine.chat_tokens(
                [{"role": "system", "content": system}, {"role": "user", "content": question(200 + number)}]
            )
            generation = engine.submit(prompt, SamplingSettings(**stream_sampling(tokens)), session=f"stream-{number}")
            async for _ in generation:
                pass
            # The engine's own timing: its text reaches the event loop a few tokens at a time.
            assert generation.tokens_per_second is not None
            rates.append(generation.tokens_per_second)
            await asyncio.sleep(0.5)
    finally:
        engine.close()
    return rates


async def discord_stream_rate(
    fake: FakeDiscord, store: Store, channel_id: int, number: int, tokens: int, count_tokens: Callable[[str], int]
) -> float:
    """Tokens of text per second reaching Discord in one long reply, from its first write with reply text to its
    last."""
    overrides = await store.sampling(channel_key(channel_id))
    await store.set_sampling(channel_key(channel_id), {**overrides, **stream_sampling(tokens)})
    mentioned = time.monotonic()
    await fake.message_create(question(200 + number), channel_id=channel_id)
    await first_content(fake, channel_id, mentioned)
    await wait_answered(store, [channel_id], fake)
    shown = [w for w in writes(fake, channel_id, mentioned) if is_reply_text((w.body or {}).get("content") or "")]
    reply = next(m for m in await store.messages(channel_key(channel_id)) if m.role == "assistant")
    first_text = (shown[0].body or {}).get("content") or ""
    return (count_tokens(reply.content) - count_tokens(first_text)) / (shown[-1].at - shown[0].at)


def summary(label: str, times: list[float], before_text: int) -> str:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"{label}: median {statistics.median(ordered):.3f} s, p90 {p90:.3f} s, worst {ordered[-1]:.3f} s "
        f"over {len(ordered)} (a status line came first in {before_text})"
    )


async def run(args: argparse.Namespace, directory: Path) -> bool:
    reference = await engine_first_tokens(args.threads, 8)
    print(
        f"engine alone, time to first token: median {statistics.median(reference):.3f} s, "
        f"worst {max(reference):.3f} s over {len(reference)} (reference, no Discord)"
    )
    engine_rates = await engine_stream_rates(args.threads, args.stream_tokens, args.streams)
    print(
        f"engine alone, a {args.stream_tokens}-token reply: "
        + " ".join(f"{r:.1f}" for r in engine_rates)
        + " tokens/s (reference, no Discord)"
    )
    count_tokens = token_counter()
    async with FakeDiscord() as fake:
        warm, *serial = fake.add_text_channels(1 + args.mentions)
        streamed = fake.add_text_channels(args.streams)
        together = fake.add_text_channels(args.together)
        long_channel, *chatters = fake.add_text_channels(1 + args.chatters)
        (fresh,) = fake.add_text_channels(1)
        # One user sends every mention: the per-user limit (10 a minute) would refuse some of them.
        engine = {} if args.threads is None else {"n_threads": args.threads}
        config = write_config(
            directory,
            fake,
            sampling={"max_tokens": args.max_tokens},
            discord={"user_messages_per_minute": 0},
            engine=engine,
        )
        bot = BotProcess(config, directory / "bot.log")
        await bot.start(fake)
        store = await open_store(directory / "llamarelay.sqlite3")
        try:
            mentioned = time.monotonic()
            await fake.message_create("Hello! Who are you?", channel_id=warm)
            warm_up, _ = await first_content(fake, warm, mentioned)
            await wait_answered(store, [warm], fake)
            print(f"warm-up mention (not counted): {warm_up:.3f} s")

            times, status_first = [], 0
            for number, channel_id in enumerate(serial):
                await asyncio.sleep(0.5)  # the engine and the typing indicator settle
                mentioned = time.monotonic()
                await fake.message_create(question(number), channel_id=channel_id)
                seconds, after_status = await first_content(fake, channel_id, mentioned)
                times.append(seconds)
                status_first += after_status
                await wait_answered(store, [channel_id], fake)
                if args.verbose:
                    print(
                        f"  mention {number}:",
                        ", ".join(
                            f"{w.at - mentioned:.3f} {w.method} {(w.body or {}).get('content', '')[:30]!r}"
                            for w in writes(fake, channel_id)
                        ),
                    )
            print("one at a time:", " ".join(f"{t:.3f}" for t in times))
            print(summary("idle engine, one mention at a time", times, status_first))

            stream_rates = []
            for number, channel_id in enumerate(streamed):
                await asyncio.sleep(0.5)
                stream_rates.append(
                    await discord_stream_rate(fake, store, channel_id, number, args.stream_tokens, count_tokens)
                )
            stream_ratio = statistics.median(stream_rates) / statistics.median(engine_rates)
            print(
                f"through Discord, a {args.stream_tokens}-token reply: "
                + " ".join(f"{r:.1f}" for r in stream_rates)
                + f" tokens/s ({stream_ratio:.2f}x the engine alone, medians)"
            )

            await asyncio.sleep(0.5)
            started = []
            for number, channel_id in enumerate(together):
                started.append(time.monotonic())
                await fake.message_create(
                    f"Question {number}: name an animal and say where it lives.", channel_id=channel_id
                )
            results = await asyncio.gather(*(first_content(fake, c, t) for c, t in zip(together, started)))
            await wait_answered(store, together, fake)
            print(
                summary(
                    f"{len(together)} channels mentioned at once", [r[0] for r in results], sum(r[1] for r in results)
                )
            )
            firsts_together = [r[0] for r in results]
            turns = await long_conversation(fake, store, long_channel, chatters, args.turns)
            print(
                "a conversation whose history overflows the window, while "
                f"{len(chatters)} other channels chat: " + " ".join(f"{t:.3f}" for t in turns)
            )
            # For reference: its next turns with nobody else chatting, the same depth and message length.
            alone = await long_conversation(fake, store, long_channel, [], 3, first_turn=args.turns + 1)
            print(
                f"its next {len(alone)} turns with the other channels quiet: "
                + " ".join(f"{t:.3f}" for t in alone)
                + f" (the busy turns took {statistics.median(turns) / statistics.median(alone):.2f}x, median)"
            )
            await asyncio.sleep(0.5)
            mentioned = time.monotonic()
            await fake.message_create(notes(1), channel_id=fresh)
            idle_long, _ = await first_content(fake, fresh, mentioned, LONG_TURN_TIMEOUT_SECONDS)
            await replies_stored(store, fresh, 1, timeout=LONG_TURN_TIMEOUT_SECONDS)
            print(f"the same length of message in a new channel, the bot idle: {idle_long:.3f} s")
        finally:
            await store.close()
            code = await bot.terminate()
            if args.log:
                args.log.write_text(bot.log())
        if code != 0:
            print(f"the bot exited with {code} on SIGTERM; the end of its log:\n{bot.log()[-3000:]}")
            return False
    median = statistics.median(times)
    checks = [
        (f"median first content {median:.3f} s <= {TARGET_MEDIAN_SECONDS} s", median <= TARGET_MEDIAN_SECONDS),
        (
            f"{len(together)} at once: median {statistics.median(firsts_together):.3f} s <= 1.0 s",
            statistics.median(firsts_together) <= 1.0,
        ),
        (
            f"stream rate through Discord {stream_ratio:.2f}x the engine's >= {TARGET_STREAM_RATE}x",
            stream_ratio >= TARGET_STREAM_RATE,
        ),
        (f"{len(together)} at once: worst {max(firsts_together):.3f} s <= 2.0 s", max(firsts_together) <= 2.0),
        (
            f"long conversation: worst busy turn {max(turns):.3f} s <= 2 x the same turns with the others quiet "
            f"(median {statistics.median(alone):.3f} s)",
            max(turns) <= 2 * statistics.median(alone),
        ),
        (
            f"long conversation: worst busy turn {max(turns):.3f} s <= 3 x an idle mention of its length "
            f"({idle_long:.3f} s)",
            max(turns) <= 3 * idle_long,
        ),
    ]
    for label, ok in checks:
        print(f"check: {label}: {'ok' if ok else 'FAILED'}")
    return all(ok for _, ok in checks)


def notes(turn: int) -> str:
    """A long message (about 450 tokens, under Discord's 2,000 characters): the history soon fills the window."""
    words = ["telescope", "nebula", "eyepiece", "aperture", "mount", "filter", "galaxy", "comet", "orbit", "lens"]
    return f"Turn {turn}. My observing notes: " + " ".join(words[(turn + i) % 10] + str(i) for i in range(190))


async def replies_stored(store: Store, channel_id: int, count: int, timeout: float = REPLY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = [m for m in await store.messages(channel_key(channel_id)) if m.role == "assistant"]
        if len(replies) >= count and all(m.status != Status.GENERATING for m in replies):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"reply {count} in channel {channel_id} not stored within {timeout:.0f} s")


async def long_conversation(
    fake: FakeDiscord, store: Store, channel_id: int, chatters: list[int], turns: int, first_turn: int = 1
) -> list[float]:
    """Each turn's first content in a conversation of long messages while the other channels keep chatting."""
    done = asyncio.Event()

    async def chat(other: int) -> None:
        number = 0
        while not done.is_set():
            number += 1
            await fake.message_create(f"Chat {number}: tell me a fun fact about the sea.", channel_id=other)
            await replies_stored(store, other, number)

    chatting = [asyncio.create_task(chat(other)) for other in chatters]
    firsts = []
    try:
        await asyncio.sleep(1.0)  # they are all generating
        for turn in range(first_turn, first_turn + turns):
            mentioned = time.monotonic()
            await fake.message_create(notes(turn), channel_id=channel_id)
            seconds, _ = await first_content(fake, channel_id, mentioned, LONG_TURN_TIMEOUT_SECONDS)
            firsts.append(seconds)
            await replies_stored(store, channel_id, turn, timeout=LONG_TURN_TIMEOUT_SECONDS)
            while writes(fake, channel_id, time.monotonic() - 1.5):  # its last edits are out, none is taken
                await asyncio.sleep(0.1)  # for the next turn's first words
    finally:
        done.set()
        await asyncio.gather(*chatting)
    return firsts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mentions", type=int, default=15, help="mentions one at a time, each in its channel")
    parser.add_argument("--together", type=int, default=8, help="channels mentioned at once afterwards")
    parser.add_argument("--chatters", type=int, default=7, help="channels chatting beside the long conversation")
    parser.add_argument("--turns", type=int, default=10, help="turns of the long conversation")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=384, help="length of the stream-rate replies")
    parser.add_argument("--streams", type=int, default=3, help="stream-rate replies, each in its channel")
    parser.add_argument("--threads", type=int, default=None, help="[engine] n_threads (default: the config's)")
    parser.add_argument("--verbose", action="store_true", help="print every write of each serial reply")
    parser.add_argument("--log", type=Path, help="keep the bot's log in this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llamarelay-bench-") as directory:
        ok = asyncio.run(run(args, Path(directory)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
