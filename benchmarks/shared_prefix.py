"""A new conversation's first token with a long system prompt against a short one.

Run: .venv/bin/python benchmarks/shared_prefix.py [--conversations 6]

The shipped config's engine. For a 20-token and a 500-token system prompt in turn: one conversation reads the
system prompt first (not counted), then new conversations (each a different question, in a session of its own)
start one at a time; prints their median time to first token and prompt tokens reused, and the ratio between
the two system prompts (target: <= 1.2, the system prompt's prefix being shared, not read again).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

from bot.config import SamplingSettings, load_settings  # noqa: E402
from bot.engine import Engine, QueuePosition  # noqa: E402

SHORT = "You are a helpful assistant. Answer briefly and kindly."
LONG = "You are the assistant of a community of hobby astronomers. " + " ".join(
    f"Rule {n}: be precise about telescopes, eyepieces, mounts, filters and the night sky, and say when unsure."
    for n in range(1, 25)
)
SAMPLING = SamplingSettings(max_tokens=4, temperature=0.0)


async def first_token(engine: Engine, system: str, question: str, session: str) -> tuple[float, int]:
    prompt = engine.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": question}])
    started = time.perf_counter()
    generation = engine.submit(prompt, SAMPLING, session=session)
    first = None
    async for event in generation:
        if not isinstance(event, QueuePosition) and first is None:
            first = time.perf_counter() - started
    return (first if first is not None else float("nan")), generation.n_prompt_reused


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=6)
    args = parser.parse_args()
    settings = load_settings(ROOT / "config.toml")
    settings.engine.state_dir = None  # no KV states of an earlier run restored from disk: new conversations only
    engine = await asyncio.to_thread(Engine, settings.engine)
    try:
        medians = {}
        for label, system in (("20-token", SHORT), ("500-token", LONG)):
            size = len(engine.chat_tokens([{"role": "system", "content": system}, {"role": "user", "content": ""}]))
            await first_token(engine, system, "Hello!", f"{label}-first")
            times, reused = [], []
            for n in range(args.conversations):
                took, kept = await first_token(
                    engine, system, f"Question {n}: what is {n} plus {n * 3}?", f"{label}-{n}"
                )
                times.append(took)
                reused.append(kept)
            medians[label] = statistics.median(times)
            print(
                f"{label} system prompt ({size} tokens with the template): new conversation's first token "
                f"median {medians[label]:.3f} s, worst {max(times):.3f} s; prompt tokens reused median "
                f"{statistics.median(reused):.0f}"
            )
        ratio = medians["500-token"] / medians["20-token"]
        print(f"ratio 500-token / 20-token: {ratio:.2f} (target <= 1.2: {'ok' if ratio <= 1.2 else 'NOT MET'})")
    finally:
        await asyncio.to_thread(engine.close)


if __name__ == "__main__":
    asyncio.run(main())
