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
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SPIN_COUNT", "ThreadTuner", "configure_openmp", "physical_cores", "thread_candidates"]

log = logging.getLogger(__name__)

SPIN_COUNT = 1_000  # libgomp's rounds of spinning at a barrier before a thread sleeps (benchmarks/shared_machine.py)
EXPLORE_SECONDS = 1.0  # each kind of step tries another thread count at most this often (x how much slower)...
EXPLORE_SHARE = 0.03  # ... and no more often than keeps the tries' extra time under this share of the time...
EXPLORE_MAX_SECONDS = 10.0  # ... but at least this often, so the figures follow the machine...
TRIES_APART_STEPS = 50  # ... if that kind of step came this many times since: a rare kind does not try at each
TRIAL_STEPS = 4  # steps of a try, the first not counted
BIG_STEP_BITS = 6  # a kind of over 63 tokens (compute-bound: all cores) tries fewer only after TRIES_APART_STEPS
RETRY_SECONDS = 0.5  # a count that lost first place by its own steps gets one early try this much later...
LEADER_SECONDS = 2.0  # ... when it had held that place this long (not a slower count a lucky try put there)
RECENT_STEPS = 7  # a thread count's figure is the median of its last this many steps: one stalled step (another
# process took the core a moment) does not make it look slower, four in a row (it keeps the core) do


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
            cores.add(
                (topology / "physical_package_id").read_text().strip()
                + ":"
                + (topology / "core_id").read_text().strip()
            )
        except OSError:  # no sysfs (macOS, some containers): count logical CPUs
            cores.add(str(cpu))
    return max(1, len(cores))


def thread_candidates(cores: int) -> list[int]:
    """Thread counts worth timing on ``cores`` physical cores, most first: all of them, one less (a core left to
    whatever else runs), and half (memory bandwidth, not cores, bounds a one-token step on many-core machines)."""
    return sorted({cores, max(1, cores - 1), max(1, cores // 2)}, reverse=True)


@dataclass
class _Kind:
    """One kind of step's figures: recent seconds per step at each count, when each count was last tried (or
    lost first place by its own steps), and the try under way (count, steps left)."""

    recent: dict[int, deque[float]] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    """The median of each count's recent steps, kept as they come: the tuner reads it every step."""
    tried_at: dict[int, float] = field(default_factory=dict)
    tried_step: dict[int, int] = field(default_factory=dict)  # ``steps`` when each count was last tried
    steps: int = 0
    demoted_at: dict[int, float] = field(default_factory=dict)
    leader: tuple[int, float] | None = None  # the fastest count and since when
    trial: tuple[int, int] | None = None

    def add(self, count: int, seconds: float) -> None:
        times = self.recent.setdefault(count, deque(maxlen=RECENT_STEPS))
        times.append(seconds)
        self.seconds[count] = statistics.median(times)

    def forget(self, count: int) -> None:
        """Drop the count's steps: a try's own steps alone tell how it does now."""
        self.recent.pop(count, None)
        self.seconds.pop(count, None)


class ThreadTuner:
    """Chooses the thread count of each decode step from how long earlier steps of its kind took at each count.

    A kind is the step's size class (1 token, 2-3, 4-7, …, and how deep its prompt rows reach: under 1,024 cells,
    1,024-2,047, 2,048-4,095, …): one- and many-token steps differ in how well they spread over threads, and a
    prompt chunk read deep into a long conversation costs several times one read at its start. Mostly the fastest
    count so far is used. A new kind of up to 63 tokens tries every count at once; one of more (compute-bound, so
    every core rarely loses, and often rare: a long prompt's chunks) runs at every core until it has come
    `TRIES_APART_STEPS` times. Another count gets a try of `TRIAL_STEPS` steps now and then, so the figures follow the
    machine as other work comes and goes: as often as keeps what the tries cost beyond the fastest count under
    `EXPLORE_SHARE` of the time (one 70 ms a step slower every 9 s), never more often than every
    ``explore_seconds`` times how much slower it was (1.4 s for a count 1.4x slower), nor rarer than
    `EXPLORE_MAX_SECONDS`, and only after `TRIES_APART_STEPS` steps of that kind (a kind that comes now and then,
    between many others, would otherwise find a try due at each of its steps). A count that held first place
    `LEADER_SECONDS` and lost it by its own steps gets one early try `RETRY_SECONDS` later: a stall of a few steps
    (a burst of other work) costs half a second at the slower count, not the seconds a regular try waits; when the
    slowness stays (another process keeps the core), that try shows it and the regular waits follow. A step right
    after the count changed is not counted: it pays for waking threads that slept, which the steps after it do
    not; but a try's last step counts if none of its steps did (each followed a step of another kind at another
    count), so every try ends. Used by the engine's worker thread only.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        explore_seconds: float = EXPLORE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.candidates = list(candidates)
        self.explore_seconds = explore_seconds
        self._clock = clock
        self._kinds: dict[tuple[int, int], _Kind] = {}
        self._last: int | None = None  # the count of the step before

    @staticmethod
    def kind(n_tokens: int, reach: int = 0) -> tuple[int, int]:
        """The kind of a step of ``n_tokens`` tokens whose prompt rows attend to up to ``reach`` cells."""
        return n_tokens.bit_length(), (reach >> 10).bit_length()

    def choose(self, n_tokens: int, reach: int = 0) -> int:
        """The thread count for a step of ``n_tokens`` tokens, prompt rows reaching ``reach`` cells."""
        if len(self.candidates) == 1:
            return self.candidates[0]
        size, depth = self.kind(n_tokens, reach)
        kind = self._kinds.setdefault((size, depth), _Kind())
        if kind.trial is None:
            kind.trial = self._next_trial(kind, big=size > BIG_STEP_BITS)
        return kind.trial[0] if kind.trial is not None else self._best(kind)

    def _next_trial(self, kind: _Kind, big: bool) -> tuple[int, int] | None:
        now = self._clock()
        seconds = kind.seconds
        untried = [count for count in self.candidates if count not in seconds]
        if untried and (not big or kind.steps >= TRIES_APART_STEPS):
            kind.tried_at[untried[0]] = now
            kind.tried_step[untried[0]] = kind.steps
            return untried[0], TRIAL_STEPS
        best = self._best(kind)
        for count in sorted(self.candidates, key=lambda count: kind.tried_at.get(count, 0.0)):
            if count == best:
                continue
            if count in kind.demoted_at:
                since, wait = kind.demoted_at[count], RETRY_SECONDS
            elif kind.steps - kind.tried_step.get(count, 0) < TRIES_APART_STEPS:
                continue
            else:
                cost = TRIAL_STEPS * (seconds[count] - seconds[best])
                since = kind.tried_at.get(count, 0.0)
                wait = min(
                    EXPLORE_MAX_SECONDS,
                    max(self.explore_seconds * seconds[count] / seconds[best], cost / EXPLORE_SHARE),
                )
            if now - since >= wait:
                kind.demoted_at.pop(count, None)
                kind.tried_at[count] = now
                kind.tried_step[count] = kind.steps
                kind.forget(count)
                return count, TRIAL_STEPS
        return None

    def record(self, n_tokens: int, threads: int, seconds: float, reach: int = 0) -> None:
        """How long a step of ``n_tokens`` tokens (prompt rows reaching ``reach`` cells) took with ``threads``."""
        if len(self.candidates) == 1:
            return
        kind = self._kinds.setdefault(self.kind(n_tokens, reach), _Kind())
        kind.steps += 1
        trial_ends = kind.trial is not None and kind.trial == (threads, 1)
        if threads == self._last or (trial_ends and threads not in kind.seconds):
            kind.add(threads, seconds)  # a try's last step counts even after a change: it has to end
        self._last = threads
        best, now = self._best(kind), self._clock()
        if kind.leader is None or kind.leader[0] != best:
            if kind.leader is not None and kind.leader[0] == threads and now - kind.leader[1] >= LEADER_SECONDS:
                kind.demoted_at[threads] = now  # its own steps, not another count's try, took its place
            kind.leader = (best, now)
        if kind.trial is not None and kind.trial[0] == threads:
            left = kind.trial[1] - 1
            kind.trial = (threads, left) if left > 0 else None

    def _best(self, kind: _Kind) -> int:
        seconds = kind.seconds
        known = [count for count in self.candidates if count in seconds]
        return min(known, key=lambda count: seconds[count]) if known else self.candidates[0]

    def timings(self, n_tokens: int = 1, reach: int = 0) -> dict[int, float]:
        """Seconds a step of ``n_tokens`` tokens takes at each count timed so far (medians of recent steps)."""
        return dict(self._kinds.get(self.kind(n_tokens, reach), _Kind()).seconds)

    def best(self, n_tokens: int = 1, reach: int = 0) -> int:
        """The count a step of ``n_tokens`` tokens gets now, tries aside (for /status, logs, benchmarks, and the
        worker, which sizes a long prompt's steps only by steps at this count)."""
        return self._best(self._kinds.get(self.kind(n_tokens, reach), _Kind()))
