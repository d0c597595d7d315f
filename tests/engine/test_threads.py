"""How llama.cpp's threads wait and how many each step gets: set by the entry point, chosen by timing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bot.config import EngineSettings, SamplingSettings
from bot.engine import Engine
from bot.engine.threads import (
    SPIN_COUNT,
    TRIAL_STEPS,
    TRIES_APART_STEPS,
    ThreadTuner,
    physical_cores,
    thread_candidates,
)
from tests.conftest import MODEL_PATH

ROOT = Path(__file__).resolve().parents[2]


def spin_settings(script: str, **environment: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    report = "; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    return subprocess.run(
        [sys.executable, "-c", "import os; " + script + report],
        env={**base, **environment},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def test_importing_the_bot_leaves_the_environment_alone() -> None:
    # Benchmarks and library users measure what they run: no import sets how llama.cpp's threads wait.
    assert spin_settings("import bot.app, bot.engine") == ["None", "None"]


def test_a_short_spin_is_set_before_llama_cpp_loads_unless_the_environment_says_otherwise() -> None:
    # What the bot does: open_engine sets it, then loads llama.cpp (and llama.cpp was not loaded before).
    opened = (
        "import asyncio, sys; from bot.app import open_engine; from bot.config import Secrets, Settings; "
        f"settings = Settings(); settings.engine.model_path = {str(MODEL_PATH)!r}; "
        "assert 'llama_cpp' not in sys.modules; engine = asyncio.run(open_engine(settings, Secrets())); "
        "assert 'llama_cpp' in sys.modules; engine.close()"
    )
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


class Machine:
    """Steps whose time at each thread count is set by the test; the first step after a change of count
    costs double (threads waking up), as on a real machine. Its clock is the steps' time."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.last: int | None = None

    def run(self, tuner: ThreadTuner, steps: int, n_tokens: int = 1, reach: int = 0) -> list[int]:
        """``steps`` steps; the counts the tuner chose."""
        chosen = []
        for _ in range(steps):
            threads = tuner.choose(n_tokens, reach)
            took = self.seconds[threads] * (2 if threads != self.last else 1)
            self.now += took
            self.last = threads
            tuner.record(n_tokens, threads, took, reach)
            chosen.append(threads)
        return chosen


def test_the_tuner_keeps_the_fastest_count_and_follows_the_machine() -> None:
    machine = Machine({2: 0.010, 1: 0.014})
    tuner = ThreadTuner([2, 1], clock=lambda: machine.now)
    chosen = machine.run(tuner, 300)  # 3 s of steps
    assert chosen[:8] == [2] * 4 + [1] * 4  # a try of each, the first step of a try not counted
    assert chosen[-200:].count(2) >= 190 and tuner.best() == 2  # then the faster, other tries rare
    machine.seconds = {2: 0.030, 1: 0.015}  # another process took a core: two threads wait on each other
    chosen = machine.run(tuner, 300)
    assert chosen.index(1) < 10 and chosen[-200:].count(1) >= 190  # moved to one thread within a few steps
    machine.seconds = {2: 0.010, 1: 0.014}  # the core is free again
    started = machine.now
    chosen = machine.run(tuner, 400)
    back = chosen.index(2) + 4  # after its try
    assert chosen[back : back + 100].count(2) >= 95  # back to two threads...
    assert sum(machine.seconds[c] for c in chosen[:back]) + started <= started + 3.0  # ...within seconds


def test_one_stalled_step_does_not_move_the_tuner_off_the_fastest_count() -> None:
    machine = Machine({2: 0.008, 1: 0.012})
    tuner = ThreadTuner([2, 1], clock=lambda: machine.now)
    machine.run(tuner, 100)
    assert tuner.best() == 2
    for _ in range(2):  # twice, apart: another process took the core for a moment
        machine.seconds = {2: 0.035, 1: 0.012}
        assert machine.run(tuner, 1) == [2]
        machine.seconds = {2: 0.008, 1: 0.012}
        assert machine.run(tuner, 20).count(2) >= 16  # a try of one thread at most, not a move to it
    assert tuner.best() == 2


def test_a_stall_of_a_few_steps_costs_half_a_second_at_the_slower_count_not_seconds() -> None:
    machine = Machine({2: 0.008, 1: 0.012})
    tuner = ThreadTuner([2, 1], clock=lambda: machine.now)
    machine.run(tuner, 400)  # over 3 s in first place
    assert tuner.best() == 2
    machine.seconds = {2: 0.035, 1: 0.012}  # a burst of other work: four steps in a row crawl
    assert machine.run(tuner, 4) == [2] * 4 and tuner.best() == 1
    machine.seconds = {2: 0.008, 1: 0.012}  # the burst is over
    chosen = machine.run(tuner, 200)
    back = chosen.index(2) + TRIAL_STEPS
    assert sum(machine.seconds[c] for c in chosen[:back]) <= 0.6  # tried again half a second later...
    assert chosen[back:].count(1) <= TRIAL_STEPS and tuner.best() == 2  # ...and kept (a regular try of one aside)


def test_a_much_slower_count_is_tried_less_often() -> None:
    machine = Machine({2: 0.080, 1: 0.012})  # two threads crawl beside another busy process
    tuner = ThreadTuner([2, 1], clock=lambda: machine.now)
    chosen = machine.run(tuner, 1000)  # 12 s or so
    tries = sum(1 for a, b in zip(chosen, chosen[1:]) if a == 1 and b == 2)
    assert 1 <= tries <= 2  # every 9 s (4 tries' 68 ms more are 3% of that), not every second


def test_the_tuner_times_each_kind_of_step_apart() -> None:
    one, prompt = Machine({2: 0.010, 1: 0.014}), Machine({2: 0.200, 1: 0.150})
    tuner = ThreadTuner([2, 1], clock=lambda: one.now + prompt.now)
    for _ in range(10):  # bursts of each: a reply's one-token steps, then a long prompt's chunks
        one.run(tuner, 20, n_tokens=1)  # two threads win these
        prompt.last = one.last
        prompt.run(tuner, 10, n_tokens=300)  # one wins these (say)
        one.last = prompt.last
    assert tuner.best(1) == 2 and tuner.best(300) == 1 and tuner.best(256) == 1


def test_a_prompt_chunk_deep_in_a_long_conversation_is_timed_apart_from_one_near_its_start() -> None:
    # 65 prompt tokens beside 7 streams: near a conversation's start one thread does (say), at 3,000 cells of
    # attention two do. Timed as one kind, the cheap shallow steps at one thread made one thread look fastest.
    shallow, deep = Machine({2: 0.150, 1: 0.140}), Machine({2: 0.500, 1: 0.800})
    tuner = ThreadTuner([2, 1], clock=lambda: shallow.now + deep.now)
    for _ in range(30):
        shallow.run(tuner, 3, n_tokens=72)
        deep.last = shallow.last
        deep.run(tuner, 3, n_tokens=72, reach=3000)
        shallow.last = deep.last
    assert tuner.best(72) == 1 and tuner.best(72, reach=3000) == 2


def test_a_fixed_thread_count_is_never_tuned() -> None:
    machine = Machine({3: 0.01})
    assert machine.run(ThreadTuner([3]), 10) == [3] * 10


def test_the_engine_times_its_steps_at_each_candidate(tmp_path: Path) -> None:
    engine = Engine(EngineSettings(model_path=MODEL_PATH, n_ctx=256, parallel=1, n_threads=0))
    try:
        assert engine.threads.candidates == thread_candidates(physical_cores())
        sampling = SamplingSettings(max_tokens=48, temperature=0.0, ignore_eos=True)

        async def generate() -> None:
            async for _ in engine.submit(engine.chat_tokens([{"role": "user", "content": "Count."}]), sampling):
                pass

        asyncio.run(generate())
        timed = engine.threads.timings(1)  # one-token steps, timed at every candidate
        assert sorted(timed) == sorted(engine.threads.candidates) and all(s > 0 for s in timed.values())
    finally:
        engine.close()
    fixed = Engine(EngineSettings(model_path=MODEL_PATH, n_ctx=256, parallel=1, n_threads=1))
    try:
        assert fixed.threads.candidates == [1]
    finally:
        fixed.close()


def test_a_kind_of_step_that_comes_between_others_neither_sticks_in_a_try_nor_tries_at_each_step() -> None:
    # A long prompt read 65 tokens at a time: one such step after every three one-token steps, which run at two
    # threads. Its try of one thread follows a change of count at every step, so none of them was counted, and the
    # try never ended (83 of 100 steps at one thread); once it ends, tries a wall-clock wait apart still came at
    # every few of its steps (41 of 100).
    gen, chunk = Machine({2: 0.050, 1: 0.200}), Machine({2: 0.500, 1: 0.700})
    tuner = ThreadTuner([2, 1], clock=lambda: gen.now + chunk.now)
    at_one = 0
    for _ in range(100):  # some 80 s
        gen.run(tuner, 3, n_tokens=7)
        chunk.last = gen.last
        at_one += chunk.run(tuner, 1, n_tokens=72).count(1)
        gen.last = chunk.last
    assert tuner.best(72) == 2 and at_one <= 3 * TRIAL_STEPS, at_one


def test_a_rare_kind_of_many_tokens_runs_at_every_core_until_it_has_come_often() -> None:
    # A long prompt's chunk beside streams: a step of about a second now and then, at a depth no other step has.
    # Such a step is compute-bound, so every core rarely loses; yet a new kind tried one thread at once, four of
    # its first steps at up to twice the time, at every new depth. It tries once it has come as often as any
    # kind waits between tries, and keeps a count that wins.
    gen, chunk = Machine({2: 0.050, 1: 0.200}), Machine({2: 1.0, 1: 0.9})  # one thread wins these, say
    tuner = ThreadTuner([2, 1], clock=lambda: gen.now + chunk.now)
    counts = []
    for _ in range(100):
        gen.run(tuner, 3, n_tokens=7)
        chunk.last = gen.last
        counts += chunk.run(tuner, 1, n_tokens=136, reach=3000)
        gen.last = chunk.last
    assert counts[:TRIES_APART_STEPS] == [2] * TRIES_APART_STEPS, counts
    assert tuner.best(136, reach=3000) == 1 and counts[-1] == 1
