"""How many CPU threads llama.cpp gets, and how they wait, so that a machine shared with other work stays usable.

llama.cpp's CPU threads (OpenMP, in the llama-cpp-python wheels) meet at a barrier after every operation of a
decode step, hundreds of times per token. By default libgomp spins there for ~300,000 rounds before sleeping:
when another process takes one core, the thread that was descheduled holds up the others, which burn their
time slices spinning, and generation crawls (9 tokens in 30 s on 2 cores). Hence the defaults here: let
waiting threads sleep rather than spin, and leave one core to the rest of the machine (the bot's event loop,
its database, other services) for steps that decode one token. Such a step has too little work per operation
to pay back waking more threads (2 sleeping threads took 26 ms a token where 1 took 11); a step with several
tokens (a prompt, several replies at once) has enough, so it gets every core (a prompt read 1.75x as fast).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_batch_threads", "default_threads", "prefer_sleeping_threads"]


def prefer_sleeping_threads() -> None:
    """Make OpenMP threads sleep at barriers instead of spinning, unless the environment already says how.

    libgomp reads these variables once, when llama.cpp's library is loaded: call before importing llama_cpp.
    Set ``OMP_WAIT_POLICY=active`` (or ``GOMP_SPINCOUNT``) in the environment to get spinning back.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "passive"


def default_threads() -> int:
    """Threads of a one-token step for ``n_threads = 0``: the physical cores this process may use, less one, and
    at least one."""
    return max(1, physical_cores() - 1)


def default_batch_threads() -> int:
    """Threads of a step with several tokens for ``n_threads = 0``: every physical core this process may use."""
    return physical_cores()


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
