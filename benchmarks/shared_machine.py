"""Generation speed on a quiet machine vs with one core kept busy by another process, per thread policy.

Each configuration runs in its own process (libgomp reads its spin settings when llama.cpp is loaded):
single-stream tokens/s, and 8 streams' aggregate tokens/s, quiet, then with a competing CPU-bound process
(a Python loop), and the child's peak RSS against model + KV pool + RAM state budget + 200 MB.
The fixed configurations show what each waiting policy costs; the last is llamarelay's own: its spin
(`bot.engine.threads.SPIN_COUNT`) and thread counts timed online (``n_threads = 0``).

Run: .venv/bin/python benchmarks/shared_machine.py [--tokens 96] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
STREAMS = 8
CORES = os.cpu_count() or 1
# A process spinning on one core for as long as the one that started it lives (never left behind by a kill).
HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
# (label, n_threads (0 = timed, the engine's default), environment for libgomp; None = llamarelay's own)
CONFIGS: list[tuple[str, int, dict[str, str] | None]] = [
    ("libgomp's own spin (300k), all cores", CORES, {"GOMP_SPINCOUNT": "300000"}),
    ("passive (sleep at once), all cores", CORES, {"OMP_WAIT_POLICY": "passive"}),
    ("passive, 1 thread (the shipped policy before)", 1, {"OMP_WAIT_POLICY": "passive"}),
    ("spin 1k, all cores", CORES, {"GOMP_SPINCOUNT": "1000"}),
    ("spin 10k, all cores", CORES, {"GOMP_SPINCOUNT": "10000"}),
    ("spin 100k, all cores", CORES, {"GOMP_SPINCOUNT": "100000"}),
    ("spin 10k, 1 thread", 1, {"GOMP_SPINCOUNT": "10000"}),
    ("llamarelay's default: threads timed, its spin", 0, None),
]


async def generate(engine: object, prompt: list[int], n_tokens: int, streams: int = 1) -> float:
    """Tokens/s after the first token, for ``streams`` greedy requests of up to ``n_tokens`` tokens at once."""
    from bot.config import SamplingSettings
    from bot.engine import QueuePosition

    sampling = SamplingSettings(max_tokens=n_tokens, temperature=0.0, repeat_penalty=1.0, ignore_eos=True)
    first = None
    count = 0

    async def one(session: str) -> None:
        nonlocal first, count
        async for event in engine.submit(prompt, sampling, session=session):  # type: ignore[attr-defined]
            if isinstance(event, QueuePosition):
                continue
            count += 1
            if first is None:
                first = time.perf_counter()

    await asyncio.gather(*(one(f"s{i}") for i in range(streams)))
    assert first is not None and count > 1
    return (count - 1) / (time.perf_counter() - first)


def child(n_threads: int, n_tokens: int, runs: int, busy_seconds: float) -> None:
    """Measure one configuration in this process; print one JSON line."""
    from bot.engine.threads import configure_openmp

    configure_openmp()  # a no-op where the configuration set the environment itself
    from bot.config import EngineSettings
    from bot.engine import Engine

    settings = EngineSettings(model_path=MODEL, n_ctx=1024, n_threads=n_threads, parallel=STREAMS)
    engine = Engine(settings)
    prompt = engine.chat_tokens(PROMPT)
    asyncio.run(generate(engine, prompt, 8))  # warm-up
    figures: dict[str, list[float]] = {"quiet": [], "busy": [], "quiet8": [], "busy8": []}
    for _ in range(runs):  # interleaved, so drift in the machine's speed hits both alike
        for streams, suffix in ((1, ""), (STREAMS, "8")):
            figures["quiet" + suffix].append(asyncio.run(generate(engine, prompt, n_tokens, streams)))
            hog = subprocess.Popen([sys.executable, "-c", HOG])
            try:
                time.sleep(0.2)  # let the scheduler see it
                started = time.perf_counter()
                # A cut-off, so that a stalled configuration still ends (and counts as 0 tokens/s).
                rate = asyncio.run(asyncio.wait_for(generate(engine, prompt, n_tokens, streams), busy_seconds))
            except TimeoutError:
                rate = 0.0
                print(
                    f"  (stalled: no {n_tokens} tokens within {time.perf_counter() - started:.0f} s)", file=sys.stderr
                )
            finally:
                hog.kill()
                hog.wait()
            figures["busy" + suffix].append(rate)
    engine.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bound = engine.model_size + engine.kv_cache_bytes + settings.state_cache_mb * 2**20 + 200 * 2**20
    threads = (
        "/".join(map(str, engine.threads.candidates))
        if len(engine.threads.candidates) > 1
        else str(engine.threads.candidates[0])
    )
    print(
        json.dumps(
            {
                "threads": threads,
                "peak_rss": peak,
                "rss_bound": bound,
                **{k: statistics.median(v) for k, v in figures.items()},
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--busy-seconds", type=float, default=30.0, help="give up on a busy run after this")
    parser.add_argument(
        "--configs",
        default="",
        help="comma-separated numbers of the configurations to run (1 = the first; default: all)",
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.tokens, args.runs, args.busy_seconds)
        return
    print(
        f"{os.cpu_count()} CPUs, {args.tokens} tokens per run, median of {args.runs} runs; "
        "busy = one other process spinning on a core"
    )
    print(
        f"{'configuration':44} {'threads':>7} {'quiet t/s':>10} {'busy t/s':>9} {'kept':>6} "
        f"{'8 quiet':>8} {'8 busy':>7} {'kept':>6} {'peak RSS':>9} {'bound':>9}",
        flush=True,
    )
    chosen = [CONFIGS[int(n) - 1] for n in args.configs.split(",")] if args.configs else CONFIGS
    for label, threads, env in chosen:
        environ = dict(os.environ)
        if env is not None:
            environ.update(env)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(threads),
                "--tokens",
                str(args.tokens),
                "--runs",
                str(args.runs),
                "--busy-seconds",
                str(args.busy_seconds),
            ],
            env=environ,
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        kept = result["busy"] / result["quiet"] if result["quiet"] else 0.0
        kept8 = result["busy8"] / result["quiet8"] if result["quiet8"] else 0.0
        print(
            f"{label:44} {result['threads']:>7} {result['quiet']:>10.1f} {result['busy']:>9.1f} {kept:>6.0%} "
            f"{result['quiet8']:>8.1f} {result['busy8']:>7.1f} {kept8:>6.0%} "
            f"{result['peak_rss'] / 2**20:>7.0f}MB {result['rss_bound'] / 2**20:>7.0f}MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
