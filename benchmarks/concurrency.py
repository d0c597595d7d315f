"""Engine throughput with many conversations: continuous batching and KV reuse between turns.

Run: .venv/bin/python benchmarks/concurrency.py [--tokens 128]
Prints single-stream rate and TTFT; for 1, 2, 4, 8 concurrent sessions the aggregate rate, median and worst
TTFT and the worst stream's p99 gap between tokens; a 10-turn conversation among 7 others (turn-1 vs turn-10
TTFT); and peak RSS against model + KV cache + state budget.
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

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import EngineSettings, SamplingSettings  # noqa: E402
from bot.engine import Engine, QueuePosition  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["a lighthouse keeper", "a lost robot", "a dragon who bakes", "two rival chess players",
          "a city under the sea", "a time-travelling cat", "the last tree on Mars", "a haunted violin"]


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
    return engine.chat_tokens([
        {"role": "system", "content": f"Take {take}. You are a creative writer. Write vivid, detailed stories."},
        {"role": "user", "content": f"Please write a long, detailed story about {topic}. Take your time."}])


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


async def concurrent(engine: Engine, n: int, sampling: SamplingSettings) -> tuple[float, float]:
    prompts = [story_prompt(engine, TOPICS[i % len(TOPICS)], take=100 * n + i) for i in range(n)]
    started = time.perf_counter()
    streams = await asyncio.gather(*(run_stream(engine, p, sampling) for p in prompts))
    elapsed = time.perf_counter() - started
    tokens = sum(len(s.token_times) for s in streams)
    ttfts = [s.ttft for s in streams]
    gap_ratios = [percentile(s.gaps, 0.99) / statistics.median(s.gaps) for s in streams if len(s.gaps) > 2]
    worst_p99 = max(percentile(s.gaps, 0.99) for s in streams if s.gaps)
    print(f"{n:>2} sessions: {tokens / elapsed:6.1f} tok/s aggregate ({tokens} tokens in {elapsed:5.1f} s), "
          f"TTFT median {statistics.median(ttfts) * 1000:6.0f} ms, worst {max(ttfts) * 1000:6.0f} ms, "
          f"p99 token gap {worst_p99 * 1000:5.0f} ms (worst p99/median {max(gap_ratios):.2f}x)")
    return tokens / elapsed, statistics.median(ttfts)


async def conversation(engine: Engine, turns: int, others: int, sampling: SamplingSettings) -> None:
    """One session talks for ``turns`` turns; each turn, ``others`` sessions take a turn of their own at once."""
    history = [{"role": "system", "content": "You are a creative writer."}]
    other_histories = [[{"role": "system", "content": f"You are assistant {i}."}] for i in range(others)]
    ttfts = []
    for turn in range(1, turns + 1):
        history.append({"role": "user", "content": f"Continue the story, part {turn}, about {TOPICS[0]}."})
        prompt = engine.chat_tokens(history)
        main = asyncio.create_task(_turn(engine, prompt, sampling, "main"))
        await asyncio.sleep(0)  # the main turn is submitted first, then the others arrive
        side = [asyncio.create_task(_turn(engine, engine.chat_tokens(h + [{"role": "user", "content": "Go on."}]),
                                          sampling, f"other{i}")) for i, h in enumerate(other_histories)]
        (stream, reply, reused), *rest = await asyncio.gather(main, *side)
        for h, (_, other_reply, _) in zip(other_histories, rest):
            h += [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": other_reply}]
        history.append({"role": "assistant", "content": reply})
        ttfts.append(stream.ttft)
        print(f"  turn {turn:>2}: prompt {len(prompt):5} tokens, {reused:5} reused from cache, "
              f"TTFT {stream.ttft * 1000:6.0f} ms")
    print(f"turn-{turns} TTFT / turn-1 TTFT: {ttfts[-1] / ttfts[0]:.2f}x (target <= 1.5)")


async def _turn(engine: Engine, prompt: list[int], sampling: SamplingSettings,
                session: str) -> tuple[Stream, str, int]:
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
    parser.add_argument("--prefill-chunk", type=int, default=EngineSettings().prefill_chunk)
    args = parser.parse_args()
    sampling = SamplingSettings(max_tokens=args.tokens, temperature=0.7, seed=7)
    threads = os.cpu_count()
    settings = EngineSettings(model_path=MODEL, n_ctx=2048, parallel=8, state_cache_mb=256,
                              prefill_chunk=args.prefill_chunk)
    engine = Engine(settings)
    print(f"model {engine.model_name}, {threads} threads, {settings.parallel} slots x {settings.n_ctx} tokens, "
          f"prefill chunk {settings.prefill_chunk}, {args.tokens} tokens per reply")

    ceiling = raw_batch_ceiling(threads or 1)
    print(f"raw llama.cpp decode steps: 1 sequence {ceiling[1]:.1f} tok/s, 8 sequences {ceiling[8]:.1f} tok/s "
          f"({ceiling[8] / ceiling[1]:.2f}x: the most batching can give on this machine)")
    single = asyncio.run(run_stream(engine, story_prompt(engine, TOPICS[0], take=0), sampling))
    single_rate = (len(single.token_times) - 1) / (single.token_times[-1] - single.token_times[0])
    print(f"single stream: {single_rate:.1f} tok/s, TTFT {single.ttft * 1000:.0f} ms")
    results = {n: asyncio.run(concurrent(engine, n, sampling)) for n in (1, 2, 4, 8)}
    print(f"8 sessions vs single stream: {results[8][0] / single_rate:.2f}x aggregate (target >= 1.6), "
          f"median TTFT {results[8][1] * 1000:.0f} ms (target <= 1000)")
    kv_bytes, model_bytes = engine.kv_cache_bytes, engine.model_size  # the larger of the two engines here
    engine.close()

    # Fewer slots than sessions, so slots change hands and idle conversations' KV goes to the RAM cache.
    conversation_settings = settings.model_copy(update={"parallel": 4})
    engine = Engine(conversation_settings)
    print(f"10-turn conversation with 7 others, {conversation_settings.parallel} slots:")
    asyncio.run(conversation(engine, args.turns, 7, sampling))
    engine.close()

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    allowed = model_bytes + kv_bytes + (settings.state_cache_mb + 200) * 2**20
    print(f"peak RSS {peak_rss / 2**20:.0f} MB (target <= model {model_bytes / 2**20:.0f} MB + KV cache "
          f"{kv_bytes / 2**20:.0f} MB + state budget {settings.state_cache_mb} MB + 200 MB = "
          f"{allowed / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
