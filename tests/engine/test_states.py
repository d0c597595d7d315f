"""Warm restart with the real engine: KV states saved to disk (idle, at close), restored after a restart, and
never used when they do not fit (another model or settings, damaged files)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bot.engine.worker
from bot.config import EngineSettings, SamplingSettings
from bot.engine import Engine, FinishReason, Generation
from bot.engine.states import Candidate, StateCache, StateFiles
from tests.conftest import MODEL_PATH

GREEDY = SamplingSettings(max_tokens=8, temperature=0.0)
SYSTEM = {"role": "system", "content": "Be brief."}
# About 800 tokens with SmolLM2's tokenizer (two of the engine's 512-token batches): a long conversation's history.
STORY = "Here is a log. " + " ".join(f"Night {i}: the keeper lit the lamp and counted {i} ships." for i in range(48))
SHORT = "Name three colors."


def settings(kv: Path | None, **changes: object) -> EngineSettings:
    return EngineSettings(
        model_path=MODEL_PATH, n_ctx=2048, n_threads=1, parallel=1, state_dir=kv, state_disk_mb=256
    ).model_copy(update=changes)


async def turn(engine: Engine, messages: list[dict[str, str]], session: str) -> tuple[Generation, str]:
    generation = engine.submit(engine.chat_tokens(messages), GREEDY, session=session)
    text = ""
    async for event in generation:
        if isinstance(event, str):
            text += event
    assert generation.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    return generation, text


def next_turn(first: list[dict[str, str]], reply: str, question: str) -> list[dict[str, str]]:
    return [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": question}]


async def test_after_a_restart_a_long_conversation_reuses_its_whole_history(tmp_path: Path) -> None:
    kv = tmp_path / "kv"
    history = [SYSTEM, {"role": "user", "content": STORY}]
    engine = Engine(settings(kv))
    try:
        first, reply = await turn(engine, history, "long")
    finally:
        engine.close()
    assert len(first.prompt) > 700
    following = next_turn(history, reply, "Which night had the most ships?")

    restarted = Engine(settings(kv))
    try:
        second, text = await turn(restarted, following, "long")
    finally:
        restarted.close()
    assert second.n_prompt_reused >= len(first.prompt)

    # The restored state answers exactly as a full read of the history does.
    cold = Engine(settings(None))
    try:
        third, cold_text = await turn(cold, following, "long")
    finally:
        cold.close()
    assert third.n_prompt_reused == 0
    assert text == cold_text


async def test_an_idle_engine_saves_states_so_a_crash_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.engine.worker, "IDLE_SAVE_SECONDS", 0.3)
    kv = tmp_path / "kv"
    history = [SYSTEM, {"role": "user", "content": SHORT}]
    engine = Engine(settings(kv))
    try:
        first, reply = await turn(engine, history, "idle")
        for _ in range(100):  # written by the worker once idle, without close()
            if list(kv.glob("*.kv")):
                break
            await asyncio.sleep(0.1)
        # A second process on the same folder, as after a crash of the first.
        other = Engine(settings(kv))
        try:
            second, _ = await turn(other, next_turn(history, reply, "And a fourth?"), "idle")
        finally:
            other.close()
    finally:
        engine.close()
    assert second.n_prompt_reused >= len(first.prompt)


@pytest.fixture(scope="module")
def saved_short(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]], int]:
    """A folder with the saved state of one short conversation, the next turn's messages, the first prompt's length."""
    kv = tmp_path_factory.mktemp("saved") / "kv"
    history = [SYSTEM, {"role": "user", "content": SHORT}]
    engine = Engine(settings(kv))
    try:
        first, reply = asyncio.run(turn(engine, history, "short"))
    finally:
        engine.close()
    assert len(list(kv.glob("*.kv"))) == 1
    return kv, next_turn(history, reply, "And a fourth?"), len(first.prompt)


def corrupt(kv: Path) -> None:
    [path] = kv.glob("*.kv")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the KV data
    path.write_bytes(bytes(data))


def truncate(kv: Path) -> None:
    [path] = kv.glob("*.kv")
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize("case", ["n_ctx", "model", "corrupt", "truncated"])
async def test_a_state_that_does_not_fit_is_deleted_and_the_turn_still_answers(
    tmp_path: Path, saved_short: tuple[Path, list[dict[str, str]], int], case: str
) -> None:
    original, following, _ = saved_short
    kv = tmp_path / "kv"
    shutil.copytree(original, kv)
    changes: dict[str, object] = {}
    if case == "n_ctx":
        changes["n_ctx"] = 1024
    elif case == "model":  # the same weights under another name count as another model
        other = tmp_path / "other.gguf"
        other.symlink_to(MODEL_PATH)
        changes["model_path"] = other
    elif case == "corrupt":
        corrupt(kv)
    else:
        truncate(kv)
    engine = Engine(settings(kv, **changes))
    try:
        generation, text = await turn(engine, following, "short")
        assert list(kv.glob("*.kv")) == []  # deleted, not just skipped
    finally:
        engine.close()
    assert generation.n_prompt_reused == 0
    assert text.strip()


async def test_the_disk_budget_keeps_the_newest_conversations(tmp_path: Path) -> None:
    kv = tmp_path / "kv"
    # Each state is a few MB (about 23 kB a token for this model): a 5 MB budget holds one, not two.
    old_chat = [SYSTEM, {"role": "user", "content": STORY[:600]}]
    new_chat = [SYSTEM, {"role": "user", "content": STORY[600:1200]}]
    engine = Engine(settings(kv, parallel=2, state_disk_mb=5))
    try:
        _, old_reply = await turn(engine, old_chat, "old")
        new, new_reply = await turn(engine, new_chat, "new")
    finally:
        engine.close()
    assert len(list(kv.glob("*.kv"))) == 1
    restarted = Engine(settings(kv, parallel=2, state_disk_mb=5))
    try:
        old_next, _ = await turn(restarted, next_turn(old_chat, old_reply, "Why?"), "old")
        new_next, _ = await turn(restarted, next_turn(new_chat, new_reply, "Why?"), "new")
    finally:
        restarted.close()
    assert old_next.n_prompt_reused == 0
    assert new_next.n_prompt_reused >= len(new.prompt)


@hypothesis.settings(max_examples=60, deadline=None)
@given(position=st.integers(0, 10_000), truncate=st.booleans())
def test_any_damaged_state_file_is_refused_and_deleted(position: int, truncate: bool) -> None:
    identity = bytes(32)
    data = bytes(range(256))
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        StateFiles(directory, 1 << 20, identity).save([Candidate("channel-1", [5, 6, 7], 1.0, len(data), lambda: data)])
        [path] = directory.glob("*.kv")
        damaged = bytearray(path.read_bytes())
        if truncate:
            del damaged[position % len(damaged) :]
        else:
            damaged[position % len(damaged)] ^= 0x01
        path.write_bytes(bytes(damaged))
        assert StateFiles(directory, 1 << 20, identity).load("channel-1") is None
        assert list(directory.iterdir()) == []


def test_a_saved_file_round_trips_and_another_identity_refuses_it(tmp_path: Path) -> None:
    data = bytes(range(200))
    StateFiles(tmp_path, 1 << 20, b"a" * 32).save([Candidate("dm:7", [1, 2], 1.0, len(data), lambda: data)])
    tokens, restored = StateFiles(tmp_path, 1 << 20, b"a" * 32).load("dm:7")  # type: ignore[misc]
    assert tokens == [1, 2] and bytes(restored) == data
    assert list(tmp_path.iterdir()) == []  # taken off the disk
    StateFiles(tmp_path, 1 << 20, b"a" * 32).save([Candidate("dm:7", [1, 2], 1.0, len(data), lambda: data)])
    assert StateFiles(tmp_path, 1 << 20, b"b" * 32).load("dm:7") is None
    assert list(tmp_path.iterdir()) == []


def _state(n: int) -> tuple[list[int], bytes]:
    return [n, n + 1], bytes([n]) * 100


def _wait_for_files(folder: Path, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(list(folder.glob("*.kv"))) < count:
        assert time.monotonic() < deadline, f"{count} states should have been written to {folder}"
        time.sleep(0.01)


def test_states_ram_has_no_room_for_go_to_disk_and_are_restorable_all_the_while(tmp_path: Path) -> None:
    cache = StateCache(250, StateFiles(tmp_path, 1 << 20, bytes(32)))  # room in RAM for two states of 100 bytes
    try:
        for name, n in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
            with cache.disk.lock:  # type: ignore[union-attr]  # the writer waits: "a", then "b", on its way
                cache.put(name, *_state(n))
                if name == "c":
                    tokens, data = cache.pop("a")  # type: ignore[misc]  # from memory: it is not written yet
                    assert (tokens, bytes(data)) == _state(1)
        _wait_for_files(tmp_path, 1)  # "b"; not "a", restored meanwhile
        cache.close()
        assert len(list(tmp_path.glob("*.kv"))) == 1
        for name, n in (("b", 2), ("c", 3), ("d", 4)):
            tokens, data = cache.pop(name)  # type: ignore[misc]
            assert (tokens, bytes(data)) == _state(n)
        assert cache.pop("a") is None and list(tmp_path.iterdir()) == []
    finally:
        cache.close()


def test_a_slow_disk_holds_at_most_a_quarter_of_the_ram_budget_waiting_to_be_written(tmp_path: Path) -> None:
    cache = StateCache(250, StateFiles(tmp_path, 1 << 20, bytes(32)))
    try:
        with cache.disk.lock:  # type: ignore[union-attr]
            for n in range(8):  # 6 evicted: once more than a quarter of the RAM budget waits, the rest are dropped
                cache.put(f"s{n}", *_state(n))
        _wait_for_files(tmp_path, 1)
        cache.close()
        assert len(list(tmp_path.glob("*.kv"))) == 1
        assert [name for name in (f"s{n}" for n in range(8)) if cache.pop(name) is not None] == ["s0", "s6", "s7"]
    finally:
        cache.close()
