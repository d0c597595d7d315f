"""The KV cache's bookkeeping: llama.cpp sequences (slots), the cells they hold, prefix copies, context shifts,
and eviction of idle conversations' caches to the state cache (RAM, then disk). Two layouts:

- `KVStreams`: a KV stream per sequence (llama.cpp ``kv_unified = false``), each a whole context window. A step's
  attention walks only each sequence's own cells, so idle and long conversations cost the others nothing; a
  stream's window is fixed, so the number of streams (and of replies generated at once) is what the memory
  budget holds.
- `KVPool`: one unified pool every sequence draws its cells from: any number of short conversations fit, but
  every token's attention walks every sequence's cells, so idle caches are trimmed while others run.

A cell is named when it is written and counted by the sequences holding it (a copy in the unified pool shares
names), so the cache's use is known without asking llama.cpp. Used by the engine's worker thread only (and
`Engine.status`, under the scheduler's lock).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llama_cpp

from bot.engine.states import StateCache

if TYPE_CHECKING:
    from bot.engine.generation import Generation

__all__ = ["COPY_MIN_TOKENS", "SHIFT_MIN_TOKENS", "KVCache", "KVPool", "KVStreams", "Slot", "common_prefix"]

SHIFT_MIN_TOKENS = 32  # a context shift must keep at least this many tokens to be worth it
COPY_MIN_TOKENS = 8  # shorter shared prefixes are read again rather than copied
IDLE_WINDOW_SHARE = 4  # while requests run, idle caches keep n_ctx / this many KV cells in the pool (shared prefixes)


@dataclass
class Slot:
    """One llama.cpp sequence. Between requests it keeps its KV cache for the session's next turn, and as a
    prefix new sequences may copy, until the cache needs the room."""

    seq_id: int
    cached: list[int]  # tokens whose KV is in this sequence now, at positions 0, 1, ...
    cells: list[int] = field(default_factory=list)  # a name for each of those KV cells: copies share names
    generation: Generation | None = None
    pending: list[int] | None = None  # prompt tokens still to decode
    next_token: int | None = None  # sampled, not decoded yet
    long_read_at: float = 0.0  # when it last read a long prompt's chunk beside streams (see `Worker._plan_chunks`)
    logits_index: int = -1  # batch index of this slot's logits in the current step
    decoder: Any = None
    last_used: float = 0.0
    session: str = ""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KVCache(ABC):
    """The slots of one llama.cpp context, the KV cells they hold, and the state cache idle ones go to: what
    both layouts share."""

    layout = ""
    """"streams" or "pool", for the logs and /status."""

    def __init__(self, ctx: Any, model: Any, n_ctx: int, saved: StateCache) -> None:
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = n_ctx
        self.pool_tokens = llama_cpp.llama_n_ctx(ctx)
        """KV cells of the whole cache (llama.cpp rounds a pool, or each stream, up to a multiple of 256)."""
        self.slots = [Slot(seq_id=i, cached=[]) for i in range(llama_cpp.llama_n_seq_max(ctx))]
        self.saved = saved
        self._refs: dict[int, int] = {}  # KV cell name -> sequences holding it; len() = cells in use
        self._next_cell = 0
        # A recurrent state is one whole: neither a prefix of it can be shared nor its positions shifted.
        self._can_copy = not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))
        self._can_shift = self._can_copy and bool(llama_cpp.llama_memory_can_shift(self._memory))
        self.trim_due = False  # a request ended: its cache may be more than the pool should keep idle

    @property
    def cells_in_use(self) -> int:
        return len(self._refs)

    @property
    def free_cells(self) -> int:
        return self.pool_tokens - len(self._refs)

    def active(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.generation is not None]

    def final_size(self, generation: Generation) -> int:
        """KV cells the request's sequence may hold at its end."""
        return min(self.n_ctx, len(generation.prompt) + generation.sampling.max_tokens)

    def pick_slot(self, generation: Generation) -> Slot:
        """The session's own idle sequence, else an empty one, else the least recently used idle one."""
        idle = [slot for slot in self.slots if slot.generation is None]
        own = [slot for slot in idle if generation.session and slot.session == generation.session]
        if own:
            return own[0]
        slot = min(idle, key=lambda s: (bool(s.cells), s.last_used, s.seq_id))
        self.evict(slot)
        return slot

    @abstractmethod
    def room(self) -> int:
        """KV cells left for new requests once running requests hold or grow into theirs."""

    @abstractmethod
    def make_room(self, n: int) -> bool:
        """Make room for ``n`` more cells among the running sequences; False when there is none to be had."""

    def trim_idle(self) -> None:
        """Keep idle caches from slowing the running requests (due after a request ended: ``trim_due``)."""
        self.trim_due = False

    @abstractmethod
    def settle(self) -> None:
        """Arrange the running sequences for the next step, once new ones were placed."""

    @abstractmethod
    def _copy(self, source: Slot, slot: Slot, n: int) -> None:
        """Give ``slot`` the first ``n`` cells of ``source``'s cache."""

    def place(self, slot: Slot, generation: Generation) -> None:
        """Give the request's sequence as much of its prompt as can be had: its own cache (shifted past dropped
        turns where the model allows), the session's saved state, or a prefix another sequence holds (copied,
        sharing its cells); at least the prompt's last token is left to read, for fresh logits."""
        prompt = generation.prompt
        slot.generation = generation  # from here the sequence is busy: never evicted, never a copy's source
        own_reuse = self._reusable(slot, prompt)
        saved = (
            self.saved.pop(generation.session) if generation.session and slot.session != generation.session else None
        )
        saved_reuse = self._reusable(Slot(seq_id=-1, cached=saved[0]), prompt) if saved else 0
        donors = [s for s in self.slots if s is not slot and s.cells] if self._can_copy else []
        donor = max(donors, key=lambda s: common_prefix(s.cached, prompt), default=None)
        copy_reuse = common_prefix(donor.cached, prompt) if donor else 0
        limit = len(prompt) - 1  # decode at least one token, for fresh logits
        if saved and saved_reuse > max(own_reuse, copy_reuse):
            self._restore(slot, *saved)
        elif donor and copy_reuse > own_reuse and copy_reuse >= COPY_MIN_TOKENS:
            self._copy(donor, slot, min(copy_reuse, limit))
        own = common_prefix(slot.cached, prompt)
        if shift := self.shift_plan(slot, prompt, own):  # the session's own cache, restored or not
            self._shift(slot, own, *shift)
        keep = min(common_prefix(slot.cached, prompt), limit)
        self.truncate(slot, keep)
        slot.session = generation.session

    def _reusable(self, slot: Slot, prompt: list[int]) -> int:
        """Tokens of the prompt the slot's cache gives: its common prefix, plus what a context shift keeps."""
        own = common_prefix(slot.cached, prompt)
        shift = self.shift_plan(slot, prompt, own)
        return own + (shift[1] if shift else 0)

    def shift_plan(self, slot: Slot, prompt: list[int], start: int) -> tuple[int, int] | None:
        """(drop, keep) when the cache is P + D + R... and the prompt P + R...: the conversation dropped its
        oldest turns D, and R can be kept by shifting it left past them (llama.cpp's context shift)."""
        cached, rest = slot.cached, prompt[start : len(prompt) - 1]
        if not self._can_shift or len(rest) < SHIFT_MIN_TOKENS or len(cached) - start < 2 * SHIFT_MIN_TOKENS:
            return None
        needle = rest[:SHIFT_MIN_TOKENS]
        best: tuple[int, int] | None = None
        for at in range(start + 1, len(cached) - SHIFT_MIN_TOKENS + 1):
            if cached[at] == needle[0] and cached[at : at + SHIFT_MIN_TOKENS] == needle:
                keep = common_prefix(cached[at:], rest)
                if best is None or keep > best[1]:
                    best = (at - start, keep)
        if best is None:
            return None
        drop, keep = best
        # A cell another sequence shares would move for it too: those prefixes are left as they are.
        if any(self._refs[cell] > 1 for cell in slot.cells[start + drop : start + drop + keep]):
            return None
        return best

    def _shift(self, slot: Slot, start: int, drop: int, keep: int) -> None:
        """Remove the cache's tokens [start, start + drop) and move the ``keep`` after them left into their place."""
        self.truncate(slot, start + drop + keep)
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, start, start + drop)
        llama_cpp.llama_memory_seq_add(self._memory, slot.seq_id, start + drop, -1, -drop)
        self._release(slot.cells[start : start + drop])
        del slot.cells[start : start + drop], slot.cached[start : start + drop]

    def _restore(self, slot: Slot, tokens: list[int], data: Any) -> None:
        self.truncate(slot, 0)
        if self.make_room(len(tokens)) and llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data), slot.seq_id):
            slot.cached = list(tokens)
            slot.cells = self._new_cells(len(tokens))
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)

    def _save(self, slot: Slot) -> bool:
        """Keep the slot's KV cache in RAM for its conversation's next turn before another takes the slot;
        False when it is not kept (no conversation, or more than the RAM budget)."""
        if not slot.session or not slot.cached:
            return False
        data = self._state(slot, self.saved.budget)
        if data is None:
            return False
        self.saved.put(slot.session, list(slot.cached), data)
        return True

    def _state(self, slot: Slot, budget: int | None = None) -> Any:
        """The bytes of the sequence's KV state (`llama_state_seq_get_data`), or None when llama.cpp gives none
        or they are more than ``budget``."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        if budget is not None and size > budget:
            return None
        data = (ctypes.c_uint8 * size)()
        return data if llama_cpp.llama_state_seq_get_data(self._ctx, data, size, slot.seq_id) == size else None

    def evict(self, slot: Slot) -> None:
        """Free an idle sequence's cells, its conversation's state kept in RAM (or on disk) for its next turn."""
        if slot.cells:
            self._save(slot)
            self.truncate(slot, 0)
        slot.session = ""

    def truncate(self, slot: Slot, keep: int) -> None:
        """Drop the sequence's cache from token ``keep`` on."""
        if keep >= len(slot.cached):
            return
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)  # a recurrent state: all or nothing
            keep = 0
        self._release(slot.cells[keep:])
        del slot.cells[keep:], slot.cached[keep:]

    def append(self, slot: Slot, token: int) -> None:
        """Record a token decoded into the slot's sequence (one new cell)."""
        slot.cached.append(token)
        slot.cells += self._new_cells(1)

    def forget(self, slot: Slot) -> None:
        """Drop a slot's KV cache after a failure, so nothing half-written is reused."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        self._release(slot.cells)
        slot.cached.clear()
        slot.cells.clear()

    def persist(self, stop: Callable[[], bool]) -> None:
        """Write the idle conversations' KV states to disk (see `StateCache.persist`)."""
        self.saved.persist(self._ctx, self.slots, stop=stop)

    def _new_cells(self, n: int) -> list[int]:
        cells = list(range(self._next_cell, self._next_cell + n))
        self._next_cell += n
        self._refs.update(dict.fromkeys(cells, 1))
        return cells

    def _release(self, cells: Iterable[int]) -> None:
        for cell in cells:
            if self._refs[cell] == 1:
                del self._refs[cell]
            else:
                self._refs[cell] -= 1


class KVPool(KVCache):
    """One unified pool of KV cells every sequence draws from (llama.cpp ``kv_unified = true``)."""

    layout = "pool"

    def room(self) -> int:
        """KV cells left once running requests hold or grow into theirs (idle sequences' cells can be evicted)."""
        active = self.active()
        pinned = len(set().union(*(slot.cells for slot in active)))
        return (
            self.pool_tokens
            - pinned
            - sum(
                max(0, self.final_size(slot.generation) - len(slot.cached))
                for slot in active
                if slot.generation is not None
            )
        )

    def _copy(self, source: Slot, slot: Slot, n: int) -> None:
        """Share the first ``n`` cells of ``source`` with ``slot``: in a unified pool nothing is copied."""
        self.truncate(slot, 0)
        llama_cpp.llama_memory_seq_cp(self._memory, source.seq_id, slot.seq_id, 0, n)
        slot.cached, slot.cells = source.cached[:n], source.cells[:n]
        for cell in slot.cells:
            self._refs[cell] += 1

    def settle(self) -> None:
        """Nothing to arrange: one pool takes any sequence ids in one ubatch."""

    def trim_idle(self) -> None:
        """Keep idle caches from slowing the running requests. llama.cpp's attention walks every KV cell up to
        the highest in use, masking out other sequences' cells one by one: with the pool full of idle caches a
        step took 1.9x as long. So idle sequences keep a quarter window of cells in all (room for the shared
        system prompt), the most recently used first; the rest goes to the state cache (RAM, then disk), whence
        the conversation's next turn copies it back (milliseconds, where re-reading its history takes seconds).
        A cache too large for the RAM budget stays in the pool."""
        active = self.active()
        if not active:
            return  # nothing runs that idle cells could slow: a lone conversation keeps its cache where it is
        self.trim_due = False
        allowance = self.n_ctx // IDLE_WINDOW_SHARE
        plan = []
        for slot in sorted(self.slots, key=lambda s: s.last_used, reverse=True):
            if slot.generation is None and slot.cells:
                if len(slot.cells) > allowance:
                    plan.append((slot, allowance))
                allowance = max(0, allowance - len(slot.cells))
        for slot, keep in reversed(plan):  # oldest first: when the RAM cache overflows, it keeps the newest
            if self._save(slot) or not slot.session:
                self.truncate(slot, keep if keep >= COPY_MIN_TOKENS else 0)
                slot.session = ""  # its whole cache is in the state cache now; what stays is a prefix to share

    def make_room(self, n: int) -> bool:
        """Evict idle sequences, least recently used first, until ``n`` more cells fit in the pool."""
        while self.pool_tokens - len(self._refs) < n:
            idle = [slot for slot in self.slots if slot.generation is None and slot.cells]
            if not idle:
                return False
            self.evict(min(idle, key=lambda s: s.last_used))
        return True


class KVStreams(KVCache):
    """A KV stream per sequence (llama.cpp ``kv_unified = false``), each holding a whole context window.

    Across streams llama.cpp copies only whole streams, and later (at the next decode): a partial
    `llama_memory_seq_cp` aborts the process, and a copy still pending when a state is written into its source
    would carry the new state. So nothing here calls it: a prefix or a running sequence moves to another stream
    as a state (`llama_state_seq_get_data`, then `_set_data`: done at once, and only the cells in use).
    """

    layout = "streams"

    def room(self) -> int:
        """A window for each stream no running request holds: every request fits one by construction."""
        return self.n_ctx * sum(1 for slot in self.slots if slot.generation is None)

    def make_room(self, n: int) -> bool:
        return True  # each running sequence has its whole window to itself, and never needs more

    def _copy(self, source: Slot, slot: Slot, n: int) -> None:
        """Give ``slot`` the first ``n`` cells of ``source``'s cache: the whole sequence moved over as a state,
        then its tail dropped."""
        self._transfer(source, slot)
        self.truncate(slot, n)

    def _transfer(self, source: Slot, slot: Slot) -> bool:
        """Make ``slot``'s stream hold a copy of ``source``'s cache; False (and ``slot`` empty) when it cannot."""
        self.truncate(slot, 0)
        data = self._state(source)
        if data is None or not llama_cpp.llama_state_seq_set_data(self._ctx, data, len(data), slot.seq_id):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            return False
        slot.cached, slot.cells = list(source.cached), self._new_cells(len(source.cached))
        return True

    def trim_idle(self) -> None:
        """Idle streams cost the running ones nothing; the gap a finished one left among them does, and so does
        a new conversation finding no empty stream: it would wait for an idle one's state to be saved. So once a
        request ends, the gap is closed and one stream kept empty, the least recently used idle cache going to
        the state cache (RAM, then disk) whence its next turn restores it."""
        self.trim_due = False
        self.settle()
        idle = [slot for slot in self.slots if slot.generation is None]
        if idle and all(slot.cells for slot in idle):
            self.evict(min(idle, key=lambda s: s.last_used))

    def settle(self) -> None:
        """Close gaps among the running sequence ids: llama.cpp decodes each run of consecutive ids as a ubatch of
        its own (the model's weights read once per run), so the highest running sequence moves into the gap."""
        while True:
            running = sorted(slot.seq_id for slot in self.active())
            if not running or running[-1] - running[0] + 1 == len(running):
                return
            top = self.slots[running[-1]]
            gap = next(slot for slot in self.slots[running[0] :] if slot.generation is None)
            self.evict(gap)
            if not self._transfer(top, gap):
                return
            gap.session, gap.last_used = top.session, top.last_used
            gap.generation, gap.pending, gap.next_token, gap.decoder = (
                top.generation,
                top.pending,
                top.next_token,
                top.decoder,
            )
            top.generation = top.pending = top.next_token = top.decoder = None
            self.truncate(top, 0)
            top.session = ""
