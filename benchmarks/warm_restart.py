"""A long conversation's next turn after a restart: time to first token with the KV state restored from disk,
against the same turn in an engine that never stopped (target: within 1.5x), and a cold read of the history.

Run: .venv/bin/python benchmarks/warm_restart.py [--runs 3] [--lines 88]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

from bot.config import EngineSettings, SamplingSettings  # noqa: E402
from bot.engine import Engine  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLING = SamplingSettings(max_tokens=16, temperature=0.0)


async def turn(engine: Engine, messages: list[dict[str, str]], session: str) -> tuple[float, str, int, int]:
    """(seconds to the first text, reply, prompt tokens, prompt tokens reused)."""
    started = time.perf_counter()
    generation = engine.submit(engine.chat_tokens(messages), SAMPLING, session=session)
    first, text = None, ""
    async for event in generation:
        if isinstance(event, str):
            text += event
            if first is None:
                first = time.perf_counter() - started
    assert first is not None
    return first, text, len(generation.prompt), generation.n_prompt_reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lines", type=int, default=88, help="lines in the history (88: ~1,500 tokens)")
    parser.add_argument("--threads", type=int, default=0, help="0 = the engine's default")
    args = parser.parse_args()
    log = " ".join(f"Night {i}: the keeper lit the lamp and counted {i} ships." for i in range(args.lines))
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Here is a log. {log} Which night had the most ships?"},
    ]
    results: dict[str, list[float]] = {"same engine": [], "after restart": [], "cold": []}
    saves, sizes = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            settings = EngineSettings(
                model_path=MODEL,
                n_ctx=2048,
                n_threads=args.threads,
                parallel=1,
                state_dir=Path(folder) / "kv",
                state_disk_mb=512,
            )
            engine = Engine(settings)
            _, reply, n_prompt, _ = asyncio.run(turn(engine, history, "c"))
            following = [
                *history,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "And the last one?"},
            ]
            started = time.perf_counter()
            engine.close()  # writes the state
            saves.append(time.perf_counter() - started)
            sizes.append(sum(p.stat().st_size for p in (Path(folder) / "kv").glob("*.kv")))

            restarted = Engine(settings)
            ttft, _, n_next, reused = asyncio.run(turn(restarted, following, "c"))
            restarted.close()
            results["after restart"].append(ttft)
            assert reused >= n_prompt, f"the restart reused {reused} of {n_prompt} tokens"

            # The same two turns in an engine that keeps running, and the next turn in a new engine with no state.
            same = Engine(settings.model_copy(update={"state_dir": None}))
            asyncio.run(turn(same, history, "c"))
            results["same engine"].append(asyncio.run(turn(same, following, "c"))[0])
            same.close()
            cold = Engine(settings.model_copy(update={"state_dir": None}))
            results["cold"].append(asyncio.run(turn(cold, following, "c"))[0])
            cold.close()
        if run == 0:
            print(
                f"history {n_prompt} tokens, next turn {n_next} tokens ({reused} reused after the restart); "
                f"threads {restarted.threads.best()}; median of {args.runs} runs"
            )
    print(
        f"state file: {statistics.median(sizes) / 2**20:.1f} MB, written at close in {statistics.median(saves):.2f} s"
    )
    for label, values in results.items():
        print(f"next turn, time to first token, {label:>14}: {statistics.median(values):.3f} s")
    ratio = statistics.median(results["after restart"]) / statistics.median(results["same engine"])
    print(f"after restart / same engine: {ratio:.2f}x (target <= 1.5x)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bound = restarted.model_size + restarted.kv_cache_bytes + settings.state_cache_mb * 2**20 + 200 * 2**20
    print(f"peak RSS {peak / 2**20:.0f} MB (bound: model + KV pool + state_cache_mb + 200 MB = {bound / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
