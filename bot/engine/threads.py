"""How llama.cpp's CPU threads run: how long they spin before they sleep, and how many each decode step gets.

llama.cpp's CPU threads (OpenMP, in the llama-cpp-python builds) meet at a barrier after every operation of a
decode step, hundreds of times per token. How long a waiting thread spins before it sleeps is libgomp's
``GOMP_SPINCOUNT``, read once, when the library loads: `configure_openmp` sets it where llama.cpp is loaded
(`bot.app.open_engine`, the benchmarks, the tests), never as a side effect of an import. A short spin keeps a quiet
machine's threads in step (passive waiting, which sleeps at once, more than halved the speed of two threads),
and spends little when another process holds a core, where libgomp's own default (300,000 rounds) crawled.

How many threads a step gets is measured, not set: `ThreadTuner` times the steps at each candidate count and
keeps the fastest, trying the others now and then, so when another process takes a core (and two threads wait
on each other) the engine drops to one within seconds, and comes back when the core is free.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SPIN_COUNT", "ThreadTuner", "configure_openmp", "physical_cores", "thread_candidates"]

log = logging.getLogger(__name__)

SPIN_COUNT = 10_000  # libgomp's rounds of spinning at a barrier before a thread sleeps (see benchmarks/shared_machine.py)
EXPLORE_EVERY = 24  # of a kind's steps, one in this many tries another thread count
SMOOTHING = 0.5  # weight of a new step time in a thread count's running figure: a few tries tell a change


def configure_openmp() -> None:
    """Have OpenMP threads spin briefly at barriers, then sleep, unless the environment already says how.

    libgomp reads this when llama.cpp's library is loaded: call before anything imports llama_cpp. Set
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment to choose otherwise.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if "llama_cpp" in sys.modules:
        log.debug("llama.cpp is already loaded: its threads keep libgomp's default spin")
        return
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":"
                      + (topology / "core_id").read_text().strip())
        except OSError:  # no sysfs (macOS, some containers): count logical CPUs
            cores.add(str(cpu))
    return max(1, len(cores))


def thread_candidates(cores: int) -> list[int]:
    """Thread counts worth timing on ``cores`` physical cores, most first: all of them, one less (a core left to
    whatever else runs), and half (memory bandwidth, not cores, bounds a one-token step on many-core machines)."""
    return sorted({cores, max(1, cores - 1), max(1, cores // 2)}, reverse=True)


class ThreadTuner:
    """Chooses the thread count of each decode step from how long earlier steps of its kind took at each count.

    A kind is the step's size class (1 token, 2-3, 4-7, …): one- and many-token steps differ in how well they
    spread over threads. Mostly the fastest count so far is used; one step in ``explore_every`` of a kind tries
    the count tried least recently, so the figures follow the machine as other work comes and goes. Used by the
    engine's worker thread only.
    """

    def __init__(self, candidates: Sequence[int], explore_every: int = EXPLORE_EVERY) -> None:
        self.candidates = list(candidates)
        self.explore_every = explore_every
        # per kind: seconds per step at each count (smoothed), the steps taken, and when each count was last tried
        self._seconds: dict[int, dict[int, float]] = {}
        self._steps: dict[int, int] = {}
        self._tried: dict[int, dict[int, int]] = {}

    @staticmethod
    def kind(n_tokens: int) -> int:
        return n_tokens.bit_length()

    def choose(self, n_tokens: int) -> int:
        """The thread count for a step of ``n_tokens`` tokens."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        kind = self.kind(n_tokens)
        seconds = self._seconds.get(kind, {})
        untried = [count for count in self.candidates if count not in seconds]
        if untried:
            return untried[0]
        step = self._steps.get(kind, 0)
        if step % self.explore_every == self.explore_every - 1:
            tried = self._tried[kind]
            return min(self.candidates, key=lambda count: tried[count])
        return min(self.candidates, key=lambda count: seconds[count])

    def record(self, n_tokens: int, threads: int, seconds: float) -> None:
        """How long a step of ``n_tokens`` tokens took with ``threads`` threads."""
        kind = self.kind(n_tokens)
        figures = self._seconds.setdefault(kind, {})
        previous = figures.get(threads)
        figures[threads] = seconds if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * seconds
        step = self._steps.get(kind, 0) + 1
        self._steps[kind] = step
        self._tried.setdefault(kind, {})[threads] = step

    def best(self, n_tokens: int = 1) -> int:
        """The count a step of ``n_tokens`` tokens gets now, exploration aside (for /status and logs)."""
        seconds = self._seconds.get(self.kind(n_tokens), {})
        known = [count for count in self.candidates if count in seconds]
        return min(known, key=lambda count: seconds[count]) if known else self.candidates[0]
