"""How llama.cpp's threads wait and how many each step gets: set by the entry point, chosen by timing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bot.config import EngineSettings, SamplingSettings
from bot.engine.threads import SPIN_COUNT, ThreadTuner, physical_cores, thread_candidates
from bot.engine import Engine
from tests.conftest import MODEL_PATH

ROOT = Path(__file__).resolve().parent.parent


def spin_settings(script: str, **environment: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    report = "; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    return subprocess.run([sys.executable, "-c", "import os; " + script + report], env={**base, **environment},
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def test_importing_the_bot_leaves_the_environment_alone() -> None:
    # Benchmarks and library users measure what they run: no import sets how llama.cpp's threads wait.
    assert spin_settings("import bot.app, bot.engine") == ["None", "None"]


def test_a_short_spin_is_set_before_llama_cpp_loads_unless_the_environment_says_otherwise() -> None:
    # What the bot does: open_engine sets it, then loads llama.cpp (and llama.cpp was not loaded before).
    opened = ("import asyncio, sys; from bot.app import open_engine; from bot.config import Secrets, Settings; "
              f"settings = Settings(); settings.engine.model_path = {str(MODEL_PATH)!r}; "
              "assert 'llama_cpp' not in sys.modules; engine = asyncio.run(open_engine(settings, Secrets())); "
              "assert 'llama_cpp' in sys.modules; engine.close()")
    assert spin_settings(opened) == ["None", str(SPIN_COUNT)]
    configure = "from bot.engine.threads import configure_openmp; configure_openmp(); import bot.engine"
    assert spin_settings(configure) == ["None", str(SPIN_COUNT)]
    assert spin_settings(configure, OMP_WAIT_POLICY="active") == ["active", "None"]
    assert spin_settings(configure, GOMP_SPINCOUNT="1000") == ["None", "1000"]
    # Too late once llama.cpp is loaded: it is left alone rather than set to no effect.
    late = "import llama_cpp; from bot.engine.threads import configure_openmp; configure_openmp()"
    assert spin_settings(late) == ["None", "None"]


def test_candidates_are_all_cores_one_less_and_half() -> None:
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [2, 1]
    assert thread_candidates(16) == [16, 15, 8]


def run(tuner: ThreadTuner, steps: int, seconds: dict[int, float], n_tokens: int = 1) -> list[int]:
    """``steps`` steps whose time at each thread count is ``seconds``; the counts the tuner chose."""
    chosen = []
    for _ in range(steps):
        threads = tuner.choose(n_tokens)
        tuner.record(n_tokens, threads, seconds[threads])
        chosen.append(threads)
    return chosen


def test_the_tuner_keeps_the_fastest_count_and_follows_the_machine() -> None:
    tuner = ThreadTuner([2, 1], explore_every=8)
    quiet = {2: 0.010, 1: 0.014}
    busy = {2: 0.030, 1: 0.015}  # another process took a core: two threads wait on each other
    chosen = run(tuner, 80, quiet)
    assert chosen[:2] == [2, 1] and chosen[-48:].count(2) == 42  # tried each, then the faster but 1 in 8
    chosen = run(tuner, 80, busy)
    assert chosen[-48:].count(1) == 42 and chosen.index(1) < 4  # it moved to one thread within a few steps
    chosen = run(tuner, 80, quiet)
    assert chosen[-48:].count(2) == 42 and chosen[24:].count(1) <= 7  # and back within 3 tries of two
    assert tuner.best() == 2


def test_the_tuner_times_each_kind_of_step_apart() -> None:
    tuner = ThreadTuner([2, 1], explore_every=8)
    run(tuner, 40, {2: 0.010, 1: 0.014}, n_tokens=1)  # one-token steps: two threads win
    run(tuner, 40, {2: 0.200, 1: 0.150}, n_tokens=300)  # long prompt chunks (say): one wins
    assert tuner.best(1) == 2 and tuner.best(300) == 1 and tuner.best(256) == 1


def test_a_fixed_thread_count_is_never_tuned() -> None:
    tuner = ThreadTuner([3])
    assert run(tuner, 10, {3: 0.01}) == [3] * 10


def test_the_engine_times_its_steps_at_each_candidate(tmp_path: Path) -> None:
    engine = Engine(EngineSettings(model_path=MODEL_PATH, n_ctx=256, parallel=1, n_threads=0))
    try:
        assert engine.threads.candidates == thread_candidates(physical_cores())
        sampling = SamplingSettings(max_tokens=48, temperature=0.0, ignore_eos=True)

        async def generate() -> None:
            async for _ in engine.submit(engine.chat_tokens([{"role": "user", "content": "Count."}]), sampling):
                pass

        asyncio.run(generate())
        timed = engine.threads._seconds[ThreadTuner.kind(1)]  # one-token steps, timed at every candidate
        assert sorted(timed) == sorted(engine.threads.candidates) and all(s > 0 for s in timed.values())
    finally:
        engine.close()
    fixed = Engine(EngineSettings(model_path=MODEL_PATH, n_ctx=256, parallel=1, n_threads=1))
    try:
        assert fixed.threads.candidates == [1]
    finally:
        fixed.close()
