"""Saved KV states of idle conversations: in RAM within a budget, and on disk so they outlive a restart.

A conversation whose slot goes to another keeps its KV state in `StateCache`; its next turn restores it
instead of re-reading its history. With a `StateFiles` behind it, a state the RAM budget has no room for goes
to disk (written by a thread of its own, so no decode step waits), the states of recent conversations are also
written there when the engine has been idle a while and at shutdown, and after a restart a conversation's
next turn restores its file. A file names the model it belongs to (file name and size, a hash of the GGUF
metadata, the context size, the llama.cpp build), its conversation and tokens; one that does not match this
engine, or is truncated or corrupt, is deleted and never used. Only the engine's worker thread (or its
``close()``) and the cache's own writer thread call in here: file IO never touches the event loop.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import struct
import tempfile
import threading
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp

if TYPE_CHECKING:
    from bot.engine.kv import Slot

__all__ = ["Candidate", "StateCache", "StateFiles", "model_identity", "unwritable"]

log = logging.getLogger(__name__)

_MAGIC = b"LRKV\x00\x00\x00\x01"
# magic, model identity (sha256), session bytes, tokens, state bytes, crc32 of all that follows the header
_HEADER = struct.Struct("<8s32sIIQI")
_SUFFIX = ".kv"

SavedKV = tuple[list[int], Any]  # a saved state: (tokens whose KV it holds, the bytes of llama_state_seq_get_data)


def model_identity(model_path: Path, metadata: Mapping[str, str], *settings: object) -> bytes:
    """What a saved state must match to be restored: the model file (name and size), its GGUF metadata (chat
    template included), the llama.cpp build, this machine's architecture, and ``settings`` (the context size
    and whatever else shapes a saved sequence, such as llama.cpp's number of KV streams)."""
    digest = hashlib.sha256()
    parts = [
        model_path.name,
        model_path.stat().st_size,
        json.dumps(sorted(metadata.items())),
        llama_cpp.__version__,
        platform.machine(),
        *settings,
    ]
    for part in parts:
        digest.update(str(part).encode("utf-8", "replace") + b"\0")
    return digest.digest()


@dataclass
class Candidate:
    """A state that may be written: newest first within the budget."""

    session: str
    tokens: list[int]
    saved_at: float  # wall-clock time of its last use
    size: int  # bytes of state data
    read: Callable[[], Any]  # the state bytes, read only if the state is written


@dataclass
class _File:
    size: int
    mtime: float
    written: int | None = None  # hash of the tokens this process wrote there, to skip rewriting the same state


def unwritable(directory: Path) -> str | None:
    """Why no file can be written in ``directory`` (made if missing), or None when one can: checked once at
    start-up, so a bad path is told then rather than at the first save."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class StateFiles:
    """One file per conversation in ``directory``, at most ``budget`` bytes in all, the most recent kept."""

    def __init__(self, directory: Path, budget: int, identity: bytes) -> None:
        self.directory = directory
        self.budget = budget
        self.identity = identity
        self._index: dict[str, _File] | None = None  # file name -> entry; read on first use, headers only
        self.lock = threading.RLock()
        """Held while the folder is read or written (the engine's worker and the cache's writer both come here);
        re-entrant, so a caller may hold it across a check and the `save` that depends on it."""

    def load(self, session: str) -> SavedKV | None:
        """The saved state of ``session``, taken off the disk; None when there is none this engine can use."""
        with self.lock:
            return self._load(session)

    def save(self, candidates: Iterable[Candidate], stop: Callable[[], bool] = lambda: False) -> None:
        """Write the newest states that fit the budget (unchanged ones are not rewritten) and delete the files
        that no longer fit, oldest first. ``stop()`` is asked between files: the rest waits for the next save."""
        with self.lock:
            self._save(candidates, stop)

    def _load(self, session: str) -> SavedKV | None:
        index = self._scan()
        name = _file_name(session)
        if index.pop(name, None) is None:
            return None
        path = self.directory / name
        try:
            with open(path, "rb") as f:
                header = _read_header(f, os.fstat(f.fileno()).st_size, self.identity)
                if header is None:
                    log.info("ignoring saved KV state %s: made for another model or settings, or damaged", name)
                    return None
                n_session, n_tokens, n_data, crc = header
                their_session, token_bytes = f.read(n_session), f.read(4 * n_tokens)
                data = (ctypes.c_uint8 * n_data)()
                if f.readinto(data) != n_data or zlib.crc32(data, zlib.crc32(their_session + token_bytes)) != crc:
                    log.warning("ignoring saved KV state %s: corrupt", name)
                    return None
                if their_session != session.encode():  # two conversations whose names share a hash prefix
                    return None
                tokens = array("i")
                tokens.frombytes(token_bytes)
                return tokens.tolist(), data
        except OSError as exc:
            log.warning("cannot read saved KV state %s: %s", name, exc)
            return None
        finally:
            _unlink(path)  # taken: used now, or of no use

    def _save(self, candidates: Iterable[Candidate], stop: Callable[[], bool]) -> None:
        index = self._scan()
        used, keep = 0, set()
        seen = set()
        for candidate in sorted(candidates, key=lambda c: -c.saved_at):
            if candidate.session in seen or stop():
                continue
            seen.add(candidate.session)
            name = _file_name(candidate.session)
            session = candidate.session.encode()
            size = _HEADER.size + len(session) + 4 * len(candidate.tokens) + candidate.size
            if used + size > self.budget:
                continue
            fingerprint = hash(tuple(candidate.tokens))
            entry = index.get(name)
            if entry is None or entry.written != fingerprint:
                try:
                    self._write(name, session, candidate)
                except OSError as exc:
                    log.warning("cannot save KV state %s: %s", name, exc)
                    continue
                index[name] = _File(size, candidate.saved_at, fingerprint)
            used += size
            keep.add(name)
        for name, entry in sorted(index.items(), key=lambda item: -item[1].mtime):
            if name in keep:
                continue
            if used + entry.size <= self.budget:
                used += entry.size
            else:
                del index[name]
                _unlink(self.directory / name)

    def _write(self, name: str, session: bytes, candidate: Candidate) -> None:
        """Write atomically: a temporary file, renamed over the old one once whole."""
        data = candidate.read()
        if data is None:
            raise OSError("llama.cpp gave no state")
        tokens = array("i", candidate.tokens).tobytes()
        header = _HEADER.pack(
            _MAGIC,
            self.identity,
            len(session),
            len(candidate.tokens),
            len(data),
            zlib.crc32(data, zlib.crc32(session + tokens)),
        )
        temporary = self.directory / f".{name}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as f:
                f.write(header + session + tokens)
                f.write(memoryview(data).cast("B"))
            os.utime(temporary, (candidate.saved_at, candidate.saved_at))
            os.replace(temporary, self.directory / name)
        except BaseException:
            _unlink(temporary)
            raise

    def _scan(self) -> dict[str, _File]:
        """The index of files this engine can use (headers only); others and leftovers are deleted."""
        if self._index is not None:
            return self._index
        self._index = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning("cannot use the KV state directory %s: %s", self.directory, exc)
            return self._index
        for entry in entries:
            if entry.name.endswith(".tmp"):  # an interrupted write
                _unlink(Path(entry.path))
            elif entry.name.endswith(_SUFFIX) and entry.is_file():
                try:
                    with open(entry.path, "rb") as f:
                        stat = os.fstat(f.fileno())
                        usable = _read_header(f, stat.st_size, self.identity) is not None
                except OSError:
                    usable = False
                if usable:
                    self._index[entry.name] = _File(stat.st_size, stat.st_mtime)
                else:
                    log.info("deleting saved KV state %s: made for another model or settings, or damaged", entry.name)
                    _unlink(Path(entry.path))
        return self._index


def _read_header(f: Any, file_size: int, identity: bytes) -> tuple[int, int, int, int] | None:
    """(session bytes, tokens, state bytes, crc) if the file is whole and made for ``identity``, else None."""
    raw = f.read(_HEADER.size)
    if len(raw) != _HEADER.size:
        return None
    magic, their_identity, n_session, n_tokens, n_data, crc = _HEADER.unpack(raw)
    if magic != _MAGIC or their_identity != identity:
        return None
    if file_size != _HEADER.size + n_session + 4 * n_tokens + n_data:  # truncated, or more than written
        return None
    return n_session, n_tokens, n_data, crc


def _file_name(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()[:32] + _SUFFIX


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc)


class StateCache:
    """KV states of conversations whose slot went to another, least recently saved first, within a byte budget.

    With ``disk``, the states RAM has no room for are written there (oldest out first), a state not in RAM is
    looked for there, and `persist` writes the recent states there too.
    """

    def __init__(self, budget_bytes: int, disk: StateFiles | None = None) -> None:
        self.budget = budget_bytes
        self.size = 0
        self.disk = disk
        self._states: OrderedDict[str, tuple[list[int], Any, float]] = OrderedDict()
        # Evicted states on their way to disk, by session: still restorable until written. Bytes: _spill_size.
        self._spilling: dict[str, tuple[list[int], Any, float]] = {}
        self._spill_size = 0
        self._spill_lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None

    def put(self, session: str, tokens: list[int], data: Any) -> None:
        self._drop(session)
        if len(data) > self.budget:
            return
        self._states[session] = (tokens, data, time.time())
        self.size += len(data)
        while self.size > self.budget:
            evicted = self._states.popitem(last=False)
            self.size -= len(evicted[1][1])
            self._spill(*evicted)

    def pop(self, session: str) -> SavedKV | None:
        """The saved state of ``session`` (from RAM, else on its way to disk, else from disk), taken out."""
        state = self._drop(session)
        if state is None and self.disk is not None and session:
            with self._spill_lock:
                spilled = self._spilling.pop(session, None)
                self._spill_size -= len(spilled[1]) if spilled else 0
            state = spilled[:2] if spilled else self.disk.load(session)
        return state

    def close(self) -> None:
        """Stop the writer: the write under way ends, the waiting ones are left to `persist`."""
        if self._writer is not None:
            self._writer.shutdown(wait=True, cancel_futures=True)
            self._writer = None

    def _spill(self, session: str, state: tuple[list[int], Any, float]) -> None:
        """Send a state RAM has no room for to disk. A thread writes it: ~0.1 s per 100 MB is longer than a decode
        step may wait. Should more than a quarter of the RAM budget wait already (a slow disk), the state is
        dropped: what waits is memory beyond the budget."""
        if self.disk is None or not session:
            return
        with self._spill_lock:
            if self._spill_size > self.budget // 4:
                return
            if (earlier := self._spilling.pop(session, None)) is not None:
                self._spill_size -= len(earlier[1])
            self._spilling[session] = state
            self._spill_size += len(state[1])
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamarelay-kv-writer")
        self._writer.submit(self._write_spilled, session, state)

    def _write_spilled(self, session: str, state: tuple[list[int], Any, float]) -> None:
        disk = self.disk
        assert disk is not None
        tokens, data, saved_at = state
        with disk.lock:
            with self._spill_lock:
                if self._spilling.get(session) is not state:  # restored meanwhile, or a newer one is on its way
                    return
            try:
                disk.save([Candidate(session, tokens, saved_at, len(data), lambda: data)])
            except Exception:
                log.exception("saving a KV state to %s failed", disk.directory)
        with self._spill_lock:
            if self._spilling.get(session) is state:
                del self._spilling[session]
                self._spill_size -= len(data)

    def persist(self, ctx: Any, slots: Sequence[Slot], stop: Callable[[], bool] = lambda: False) -> None:
        """Write the states of the slots' and the RAM cache's conversations to disk, newest first (worker thread
        only, or after it stopped). Never raises: a state that cannot be written is logged and left out."""
        if self.disk is None:
            return
        now, monotonic = time.time(), time.monotonic()
        with self._spill_lock:
            saved = [*self._spilling.items(), *self._states.items()]
        candidates = [
            Candidate(session, tokens, saved_at, len(data), functools.partial(lambda kept: kept, data))
            for session, (tokens, data, saved_at) in saved
        ]
        for slot in slots:
            if slot.session and slot.cached:
                size = llama_cpp.llama_state_seq_get_size(ctx, slot.seq_id)
                candidates.append(
                    Candidate(
                        slot.session,
                        list(slot.cached),
                        now - (monotonic - slot.last_used),
                        size,
                        functools.partial(_get, ctx, slot.seq_id, size),
                    )
                )
        try:
            self.disk.save(candidates, stop)
        except Exception:
            log.exception("saving KV states to %s failed", self.disk.directory)

    def _drop(self, session: str) -> SavedKV | None:
        state = self._states.pop(session, None)
        if state is None:
            return None
        self.size -= len(state[1])
        return state[0], state[1]


def _get(ctx: Any, seq_id: int, size: int) -> Any:
    data = (ctypes.c_uint8 * size)()
    return data if llama_cpp.llama_state_seq_get_data(ctx, data, size, seq_id) == size else None
