"""The fair queue: one waiting line per session, served in turn, and admission while the KV pool has room."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

from bot.engine.base import FinishReason
from bot.engine.generation import Generation
from bot.errors import QueueFull

__all__ = ["Scheduler"]


def _queue_key(generation: Generation) -> str:
    """The waiting line a request joins: its session's, or one of its own when it names none."""
    return f"s:{generation.session}" if generation.session else f"r:{id(generation)}"


class Scheduler:
    """Waiting requests by session, and the one lock (``cond``) that the event loop and the worker share.

    Waiting requests start one per session in turn, so no session's pile delays another's by more than a round.
    Methods whose docstring says so expect the caller to hold ``cond``.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.closing = False
        self.n_waiting = 0
        self._queues: OrderedDict[str, deque[Generation]] = OrderedDict()  # by session, served in turn

    @property
    def has_waiting(self) -> bool:
        return bool(self._queues)

    def enqueue(self, generation: Generation, max_queue: int) -> None:
        """Add a request at the end of its session's line and wake the worker (caller holds the lock); raises
        `QueueFull` when ``max_queue`` requests wait already."""
        if self.n_waiting >= max_queue:
            raise QueueFull(f"Too many requests are waiting ({self.n_waiting}); please try again shortly.")
        self._queues.setdefault(_queue_key(generation), deque()).append(generation)
        self.n_waiting += 1
        for place, waiting in enumerate(self.waiting_in_order(), start=1):
            waiting._position = place  # announced by the worker, which wakes up now
        self.cond.notify()

    def cancel(self, generation: Generation) -> None:
        """Mark the request cancelled; a waiting one leaves its line and ends at once, a running one is ended by
        the worker within a step."""
        with self.cond:
            generation._cancel_requested = True
            queue = self._queues.get(_queue_key(generation))
            if queue is not None and generation in queue:
                queue.remove(generation)
                if not queue:
                    del self._queues[_queue_key(generation)]
                self.n_waiting -= 1
                generation._end(FinishReason.CANCELLED)  # a waiting request has no sampler yet
                self.renumber_waiting()
            self.cond.notify()

    def close(self) -> bool:
        """Tell the worker to stop; False when that was already asked."""
        with self.cond:
            if self.closing:
                return False
            self.closing = True
            self.cond.notify()
            return True

    def waiting_in_order(self) -> list[Generation]:
        """The waiting requests in the order they will start: the first of each session's line in turn, then
        the second of each, and so on."""
        lines = [list(queue) for queue in self._queues.values()]
        return [line[r] for r in range(max(map(len, lines), default=0)) for line in lines if r < len(line)]

    def renumber_waiting(self) -> None:
        for place, generation in enumerate(self.waiting_in_order(), start=1):
            generation._position = place
            generation._announce_position()

    def take_admitted(
        self, running: int, parallel: int, room: Callable[[], int], need: Callable[[Generation], int]
    ) -> list[Generation]:
        """Take waiting requests, one session at a time in turn, while fewer than ``parallel`` generate and the
        KV pool has ``room()`` for all that each may ``need`` (caller holds the lock)."""
        if not self._queues:
            return []  # every step asks: nothing to renumber either
        admitted: list[Generation] = []
        left: int | None = None
        while self._queues and running + len(admitted) < parallel:
            key, queue = next(iter(self._queues.items()))
            generation = queue[0]
            size = need(generation)
            if left is None:
                left = room()
            if size > left and (running or admitted):
                break  # the lines behind wait too, so a long prompt is not passed over for ever
            left -= size
            queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # this session's next request waits for the others' turn
            else:
                del self._queues[key]
            self.n_waiting -= 1
            generation._position = 0
            admitted.append(generation)
        self.renumber_waiting()
        return admitted

    def drain(self) -> None:
        """End every waiting request as cancelled (caller holds the lock): the engine is closing."""
        for generation in self.waiting_in_order():
            generation._end(FinishReason.CANCELLED)
        self._queues.clear()
        self.n_waiting = 0
