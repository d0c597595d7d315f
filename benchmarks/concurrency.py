"""Engine throughput with many conversations: KV streams or pool, continuous batching, KV reuse between turns.

Run: .venv/bin/python benchmarks/concurrency.py [--tokens 128] [--turns 10] [--phases all] [--layout streams|pool]
On the default engine config (n_ctx 2048 as in issue 13, parallel automatic) it prints the single-stream rate
and TTFT; for 1, 2, 4, 8 concurrent sessions the aggregate rate, median and worst TTFT, each stream's longest
gap between tokens and the longest decode step; a "no stalls" phase (4 long histories whose oldest turns were
dropped and 4 new conversations, all at once); 8 sessions again once idle caches fill the pool; a 10-turn
conversation among 7 others whose history overflows the window; a new conversation's TTFT with a long shared
system prompt vs a short one; and peak RSS against model + KV pool + state budget. The machine's other load
changes every figure: compare runs made in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

import llama_cpp  # noqa: E402

from bot.config import EngineSettings, SamplingSettings  # noqa: E402
from bot.engine import Engine, QueuePosition  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes",
    "two rival chess players",
    "a city under the sea",
    "a time-travelling cat",
    "the last tree on Mars",
    "a haunted violin",
]


@dataclass
class Stream:
    submitted: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.submitted

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def story_prompt(engine: Engine, topic: str, take: int) -> list[int]:
    # About 50 tokens. ``take`` opens the prompt, so no run reuses another run's KV cache.
    return engine.chat_tokens(
        [
            {"role": "system", "content": f"Take {take}. You are a creative writer. Write vivid, detailed stories."},
            {"role": "user", "content": f"Please write a long, detailed story about {topic}. Take your time."},
        ]
    )


async def run_stream(engine: Engine, prompt: list[int], sampling: SamplingSettings, session: str = "") -> Stream:
    stream = Stream(time.perf_counter())
    async for event in engine.submit(prompt, sampling, session=session):
        if not isinstance(event, QueuePosition):
            stream.token_times.append(time.perf_counter())
    return stream


def raw_batch_ceiling(n_threads: int) -> dict[int, float]:
    """Tokens/s of plain llama_decode steps with 1 and 8 sequences, one token each: what batching can give here."""
    model = llama_cpp.llama_model_load_from_file(str(MODEL).encode(), llama_cpp.llama_model_default_params())
    rates = {}
    for n_seq in (1, 8):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max = 512 * n_seq, n_seq
        params.n_threads = params.n_threads_batch = n_threads
        ctx = llama_cpp.llama_init_from_model(model, params)
        batch = llama_cpp.llama_batch_init(n_seq, 0, 1)
        batch.n_tokens = n_seq
        steps = 100
        for pos in range(steps + 20):
            if pos == 20:
                started = time.perf_counter()
            for seq in range(n_seq):
                batch.token[seq], batch.pos[seq], batch.n_seq_id[seq] = 100 + seq, pos, 1
                batch.seq_id[seq][0], batch.logits[seq] = seq, True
            llama_cpp.llama_decode(ctx, batch)
        rates[n_seq] = n_seq * steps / (time.perf_counter() - started)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return rates


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def steps_since(engine: Engine, mark: int) -> list[float]:
    """Decode step times recorded since ``mark`` (len of the history then); empty on an engine without them."""
    history = list(getattr(engine, "step_seconds", ()))
    return history[mark:] if mark <= len(history) else history


def gap_report(streams: list[Stream], steps: list[float]) -> str:
    longest = [max(s.gaps) for s in streams if s.gaps]
    step = (
        f", longest step {max(steps) * 1000:5.0f} ms (median {statistics.median(steps) * 1000:4.0f})" if steps else ""
    )
    return (
        f"longest gap between tokens per stream: median {statistics.median(longest) * 1000:5.0f} ms, "
        f"worst {max(longest) * 1000:5.0f} ms{step}"
    )


async def concurrent(engine: Engine, n: int, sampling: SamplingSettings, take: int = 0) -> tuple[float, float, float]:
    prompts = [story_prompt(engine, TOPICS[i % len(TOPICS)], take=take + 100 * n + i) for i in range(n)]
    mark = len(getattr(engine, "step_seconds", ()))
    started = time.perf_counter()
    streams = await asyncio.gather(
        *(run_stream(engine, p, sampling, session=f"c{n}-{i}") for i, p in enumerate(prompts))
    )
    elapsed = time.perf_counter() - started
    tokens = sum(len(s.token_times) for s in streams)
    ttfts = [s.ttft for s in streams]
    print(
        f"{n:>2} sessions: {tokens / elapsed:6.1f} tok/s aggregate ({tokens} tokens in {elapsed:5.1f} s), "
        f"TTFT median {statistics.median(ttfts) * 1000:6.0f} ms, worst {max(ttfts) * 1000:6.0f} ms"
    )
    print(f"             {gap_report(streams, steps_since(engine, mark))}")
    return tokens / elapsed, statistics.median(ttfts), max(ttfts)


async def idle_pool(engine: Engine, sampling: SamplingSettings) -> None:
    """8 sessions at once in an empty pool, then again once idle conversations' caches have filled it (a
    long-running bot): llama.cpp's attention walks every KV cell in use, so idle caches left in the pool would
    slow every step."""
    await concurrent(engine, 8, SamplingSettings(max_tokens=4), take=20_000)  # warm-up: caches, allocations
    empty = await concurrent(engine, 8, sampling)
    notes = " ".join(f"Note {i}: the keeper checks lamp {i} and logs the weather." for i in range(70))
    # One at a time, as separate channels would over an hour: about 1,000 tokens each, most of the pool.
    count = max(1, (engine.pool_tokens - 8 * (50 + sampling.max_tokens)) // 1000)
    for i in range(count):
        prompt = engine.chat_tokens(
            [
                {"role": "system", "content": f"You are assistant {i}."},
                {"role": "user", "content": f"Conversation {i}. {notes}"},
            ]
        )
        await run_stream(engine, prompt, SamplingSettings(max_tokens=4, temperature=0.0), session=f"idle{i}")
    status = engine.status()
    print(f"{count} idle conversations of ~1,000 tokens each: the pool holds {status.kv_cells} KV cells; 8 again:")
    full = await concurrent(engine, 8, sampling, take=10_000)
    print(
        f"idle caches cost the running streams: aggregate {full[0] / empty[0]:.2f}x, TTFT median "
        f"{full[1] / empty[1]:.2f}x of an empty pool's"
    )


async def no_stalls(engine: Engine, sampling: SamplingSettings) -> None:
    """Long histories whose oldest turns were just dropped, and new conversations, all at once: every stream's
    longest gap between tokens and the longest decode step say whether anyone stalled."""
    histories = []
    for i in range(4):  # each fills most of the window, then its first 3 turns drop out of the prompt
        turns = [{"role": "system", "content": f"You are storyteller {i}."}]
        for t in range(9):
            turns += [
                {"role": "user", "content": f"Part {t} of the story about {TOPICS[i]}, please. " * 4},
                {"role": "assistant", "content": f"In part {t}, {TOPICS[i]} " + "walked on and on. " * 25},
            ]
        histories.append(turns)
    long_prompts = [engine.chat_tokens(h + [{"role": "user", "content": "Go on."}]) for h in histories]
    warm = await asyncio.gather(
        *(
            run_stream(engine, p, SamplingSettings(max_tokens=4, temperature=0.0), session=f"long{i}")
            for i, p in enumerate(long_prompts)
        )
    )
    assert all(s.token_times for s in warm)
    dropped = [
        engine.chat_tokens(
            [h[0], *h[7:], {"role": "user", "content": "Go on."}, {"role": "user", "content": "And then?"}]
        )
        for h in histories
    ]
    fresh = [story_prompt(engine, TOPICS[4 + i], take=900 + i) for i in range(4)]
    mark = len(getattr(engine, "step_seconds", ()))
    results = await asyncio.gather(
        *(_turn(engine, p, sampling, f"long{i}") for i, p in enumerate(dropped)),
        *(_turn(engine, p, sampling, f"new{i}") for i, p in enumerate(fresh)),
    )
    streams = [stream for stream, _, _ in results]
    reused = [r for _, _, r in results[:4]]
    print(
        f"no stalls: 4 long histories ({statistics.mean(len(p) for p in dropped):.0f} tokens, oldest turns "
        f"dropped; {statistics.mean(reused):.0f} reused on average) + 4 new conversations: "
        f"TTFT median {statistics.median(s.ttft for s in streams) * 1000:.0f} ms, "
        f"worst {max(s.ttft for s in streams) * 1000:.0f} ms"
    )
    print(f"           {gap_report(streams, steps_since(engine, mark))}")


async def shared_prefix(engine: Engine, sampling: SamplingSettings) -> None:
    """A new conversation's first token with a ~500-token system prompt that an earlier one already read, vs
    with a ~20-token one (the issue's target: <= 1.2x)."""
    long_system = " ".join(f"Rule {i}: answer kindly and mention the number {i}." for i in range(40))
    ttfts = {}
    for name, system in (("20-token", "You are a helpful assistant. Be brief and kind."), ("500-token", long_system)):
        await run_stream(
            engine,
            engine.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": "Hello there."}]),
            sampling,
            session=f"{name}-first",
        )
        runs = []
        for i in range(3):
            prompt = engine.chat_tokens(
                [{"role": "system", "content": system}, {"role": "user", "content": f"Tell me about {TOPICS[i]}."}]
            )
            runs.append(
                (
                    await run_stream(
                        engine, prompt, SamplingSettings(max_tokens=4, temperature=0.0), session=f"{name}-{i}"
                    )
                ).ttft
            )
        ttfts[name] = statistics.median(runs)
    print(
        f"new conversation's TTFT: 20-token system prompt {ttfts['20-token'] * 1000:.0f} ms, 500-token one "
        f"{ttfts['500-token'] * 1000:.0f} ms ({ttfts['500-token'] / ttfts['20-token']:.2f}x, target <= 1.2)"
    )


async def conversation(engine: Engine, turns: int, others: int, sampling: SamplingSettings) -> None:
    """One session talks for ``turns`` turns; each turn, ``others`` sessions take a turn of their own at once."""
    history = [{"role": "system", "content": "You are a creative writer."}]
    other_histories = [[{"role": "system", "content": f"You are assistant {i}."}] for i in range(others)]
    ttfts = []
    notes = " ".join(f"Note {i}: the keeper checks lamp {i} and logs the weather." for i in range(40))  # ~500 tokens
    for turn in range(1, turns + 1):
        history.append({"role": "user", "content": f"Continue the story, part {turn}, about {TOPICS[0]}. {notes}"})
        prompt = engine.chat_tokens(history)
        while len(prompt) + sampling.max_tokens > engine.n_ctx:  # the window is full: the oldest turn goes
            del history[1:3]
            prompt = engine.chat_tokens(history)
        main = asyncio.create_task(_turn(engine, prompt, sampling, "main"))
        await asyncio.sleep(0)  # the main turn is submitted first, then the others arrive
        side = [
            asyncio.create_task(
                _turn(engine, engine.chat_tokens(h + [{"role": "user", "content": "Go on."}]), sampling, f"other{i}")
            )
            for i, h in enumerate(other_histories)
        ]
        (stream, reply, reused), *rest = await asyncio.gather(main, *side)
        for h, (_, other_reply, _) in zip(other_histories, rest):
            h += [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": other_reply}]
        history.append({"role": "assistant", "content": reply})
        ttfts.append(stream.ttft)
        print(
            f"  turn {turn:>2}: prompt {len(prompt):5} tokens, {reused:5} reused from cache, "
            f"TTFT {stream.ttft * 1000:6.0f} ms"
        )
    print(f"turn-{turns} TTFT / turn-1 TTFT: {ttfts[-1] / ttfts[0]:.2f}x (target <= 1.5)")


async def _turn(engine: Engine, prompt: list[int], sampling: SamplingSettings, session: str) -> tuple[Stream, str, int]:
    stream = Stream(time.perf_counter())
    generation = engine.submit(prompt, sampling, session=session)
    text = ""
    async for event in generation:
        if not isinstance(event, QueuePosition):
            stream.token_times.append(time.perf_counter())
            text += event
    return stream, text, generation.n_prompt_reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=EngineSettings().n_threads,
        help="[engine] n_threads (0: timed, the fastest kept; the config's default)",
    )
    parser.add_argument(
        "--layout",
        choices=["auto", "streams", "pool"],
        default="auto",
        help="[engine] kv_layout: a KV stream per conversation, one unified pool, or the automatic "
        "choice (the default)",
    )
    parser.add_argument("--kv-pool-mb", type=int, default=0, help="[engine] kv_pool_mb (0: the default budget)")
    parser.add_argument(
        "--phases",
        default="ceiling,single,concurrent,prefix,stalls,idle,conversation",
        help="comma-separated subset of: ceiling,single,concurrent,prefix,stalls,idle,conversation",
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    sampling = SamplingSettings(max_tokens=args.tokens, temperature=0.7, seed=7)
    threads = os.cpu_count()
    # The defaults otherwise: parallel automatic.
    settings = EngineSettings(
        model_path=MODEL, n_ctx=2048, n_threads=args.threads, kv_layout=args.layout, kv_pool_mb=args.kv_pool_mb
    )
    engine = Engine(settings)
    pool = getattr(engine, "pool_tokens", None)
    threads_shown = "/".join(map(str, engine.threads.candidates))
    layout = f"{len(engine.kv.slots)} KV streams" if engine.kv.layout == "streams" else "one KV pool"
    print(
        f"model {engine.model_name}, {threads_shown} threads, context {settings.n_ctx} tokens, "
        f"{layout} of {pool or '-'} tokens, up to {getattr(engine, 'parallel', settings.parallel)} at once, "
        f"{args.tokens} tokens per reply"
    )

    if "ceiling" in phases:
        ceiling = raw_batch_ceiling(settings.n_threads or threads or 1)
        print(
            f"raw llama.cpp decode steps: 1 sequence {ceiling[1]:.1f} tok/s, 8 sequences {ceiling[8]:.1f} tok/s "
            f"({ceiling[8] / ceiling[1]:.2f}x: the most batching can give on this machine)"
        )
    single_rate = None
    if "single" in phases:
        single = asyncio.run(run_stream(engine, story_prompt(engine, TOPICS[0], take=0), sampling))
        single_rate = (len(single.token_times) - 1) / (single.token_times[-1] - single.token_times[0])
        print(f"single stream: {single_rate:.1f} tok/s, TTFT {single.ttft * 1000:.0f} ms")
    if "concurrent" in phases:
        results = {n: asyncio.run(concurrent(engine, n, sampling)) for n in (1, 2, 4, 8)}
        ratio = f"{results[8][0] / single_rate:.2f}x aggregate (target >= 1.6), " if single_rate else ""
        print(
            f"8 sessions vs single stream: {ratio}median TTFT {results[8][1] * 1000:.0f} ms (target <= 1000), "
            f"worst {results[8][2] * 1000:.0f} ms (target <= 2000)"
        )
    if "prefix" in phases:
        asyncio.run(shared_prefix(engine, sampling))
    if "stalls" in phases:
        asyncio.run(no_stalls(engine, sampling))
    if "idle" in phases:
        asyncio.run(idle_pool(engine, sampling))
    if "conversation" in phases:
        print(f"{args.turns}-turn conversation with 7 others (its history overflows the window):")
        asyncio.run(conversation(engine, args.turns, 7, sampling))
    kv_bytes, model_bytes = engine.kv_cache_bytes, engine.model_size
    engine.close()

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    allowed = model_bytes + kv_bytes + (settings.state_cache_mb + 200) * 2**20
    print(
        f"peak RSS {peak_rss / 2**20:.0f} MB with {layout} (target <= model {model_bytes / 2**20:.0f} MB + KV "
        f"{kv_bytes / 2**20:.0f} MB + state budget {settings.state_cache_mb} MB + 200 MB = "
        f"{allowed / 2**20:.0f} MB)"
    )


if __name__ == "__main__":
    main()
