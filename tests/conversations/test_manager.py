"""ConversationManager's lifecycle with the real engine and a real SQLite store: order, stop, reset, status,
shutdown, restarts and failures."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.conversations import ConversationManager, State
from bot.engine import Engine
from bot.errors import StoreError
from bot.prompt import ChatTemplate
from bot.store import Status, Store
from bot.types import Controls, Incoming, SessionKey
from bot.wording import EMPTY_MESSAGE, RESET_NOTE, SHUTTING_DOWN, STOPPED_NOTE, WAITING_FOR_PREVIOUS
from tests.conversations.helpers import CHANNEL, LONG_GRAMMAR, Target, message


async def test_reply_is_streamed_and_both_sides_are_stored(manager: ConversationManager) -> None:
    target = Target()
    result = await manager.respond(message("What is the capital of France?"), target)
    assert result.status == Status.COMPLETE and result.text.strip()
    assert target.calls[0][0] == "post"
    assert target.messages == [result.text]
    history = await manager.history(CHANNEL)
    assert [(m.role, m.status) for m in history] == [("user", Status.COMPLETE), ("assistant", Status.COMPLETE)]
    assert history[0].content == "What is the capital of France?" and history[1].content == result.text


async def test_sessions_are_separate_and_run_concurrently(manager: ConversationManager) -> None:
    other = SessionKey.for_channel("test", "guild1", "chan2")
    dm = SessionKey.for_dm("test", "u1")
    results = await asyncio.gather(*(manager.respond(message("Hello!", key), Target()) for key in (CHANNEL, other, dm)))
    assert all(r.status == Status.COMPLETE for r in results)
    for key in (CHANNEL, other, dm):
        assert len(await manager.history(key)) == 2


def test_dm_key_never_equals_channel_key() -> None:
    dm = SessionKey.for_dm("discord", "123")
    channel = SessionKey.for_channel("discord", "", "123")
    assert dm != channel and str(dm) != str(channel)
    assert dm.is_private and not channel.is_private
    with pytest.raises(ValueError):
        SessionKey.for_channel("discord", "g", "a/b")


async def test_messages_in_one_session_are_answered_in_order(manager: ConversationManager) -> None:
    class SlowFirstPost(Target):
        async def post(self, text: str, controls: Controls | None = None) -> int:
            await asyncio.sleep(0.3)  # the platform is slow to show A's placeholder
            return await super().post(text)

    await manager.set_sampling(CHANNEL, max_tokens=120, grammar=LONG_GRAMMAR)  # A takes a while
    first_target, second_target = SlowFirstPost(), Target()
    first = asyncio.create_task(manager.respond(message("The password is SWORDFISH."), first_target))
    await asyncio.sleep(0)
    second = asyncio.create_task(manager.respond(message("What is the password?"), second_target))
    async with asyncio.timeout(10):
        while not second_target.messages:
            await asyncio.sleep(0.01)
    assert second_target.messages == [WAITING_FOR_PREVIOUS]  # B shows it waits for A
    done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {first}  # A's slow placeholder did not let B overtake it
    await second
    history = await manager.history(CHANNEL)
    assert [(m.role, m.status) for m in history] == [("user", Status.COMPLETE), ("assistant", Status.COMPLETE)] * 2
    assert history[0].content == "The password is SWORDFISH." and history[2].content == "What is the password?"
    assert second_target.messages[-1].startswith(history[3].content.rstrip())  # the waiting line gave way


async def test_stop_keeps_the_partial_reply_marked_stopped(manager: ConversationManager) -> None:
    await manager.set_sampling(CHANNEL, max_tokens=300, grammar=LONG_GRAMMAR)
    target = Target()
    task = asyncio.create_task(manager.respond(message("sing"), target))
    await target.first_text.wait()
    assert manager.status(CHANNEL).position == 0
    assert manager.stop(CHANNEL)
    result = await task
    assert result.status == Status.STOPPED
    assert target.messages[-1].endswith(STOPPED_NOTE)
    stored = (await manager.history(CHANNEL))[-1]
    assert stored.status == Status.STOPPED and stored.content.startswith("l") and stored.content == result.text
    assert stored.notes == STOPPED_NOTE and STOPPED_NOTE not in stored.content
    # The model reads back exactly what it wrote, never the bot's notes.
    prompt, _ = manager.window.build_prompt("sys", await manager.history(CHANNEL), "next", 24)
    rendered = manager.engine.detokenize(prompt.tokens)
    assert stored.content.strip() in rendered and "Stopped" not in rendered and "cut short" not in rendered
    assert not manager.stop(CHANNEL)


@pytest.mark.parametrize("text", ["", "   \n\t ", "\u200b\u200b", "\x00\x07"])
async def test_empty_message_gets_a_clear_answer_and_nothing_is_stored(manager: ConversationManager, text: str) -> None:
    target = Target()
    result = await manager.respond(message(text), target)
    assert target.messages == [EMPTY_MESSAGE] and result.status == Status.FAILED
    assert await manager.history(CHANNEL) == []


async def test_reset_clears_history_but_keeps_the_system_prompt(manager: ConversationManager) -> None:
    await manager.set_system_prompt(CHANNEL, "You are a pirate.")
    await manager.respond(message("Hello"), Target())
    await manager.reset(CHANNEL)
    assert await manager.history(CHANNEL) == []
    assert await manager.system_prompt(CHANNEL) == "You are a pirate."
    await manager.set_system_prompt(CHANNEL, None)
    assert await manager.system_prompt(CHANNEL) == manager.settings.conversation.system_prompt


async def test_sessions_survive_a_restart(engine: Engine, settings: Settings) -> None:
    store = await Store.open(settings.store.path)
    first = ConversationManager(engine, store, settings)
    await first.set_system_prompt(CHANNEL, "Be terse.")
    await first.respond(message("Remember the number 42."), Target())
    await store.close()

    store = await Store.open(settings.store.path)
    second = ConversationManager(engine, store, settings)
    history = await second.history(CHANNEL)
    assert [m.content for m in history][0] == "Remember the number 42." and len(history) == 2
    assert await second.system_prompt(CHANNEL) == "Be terse."
    await store.close()


async def test_reply_cut_by_a_crash_is_marked_interrupted_on_restart(settings: Settings) -> None:
    store = await Store.open(settings.store.path)
    await store.add_message(str(CHANNEL), "user", "hi", Status.COMPLETE)
    await store.add_message(str(CHANNEL), "assistant", "half a rep", Status.GENERATING)
    await store.close()  # the process "dies" here, before the reply is finished
    store = await Store.open(settings.store.path)
    assert [m.status for m in await store.messages(str(CHANNEL))] == [Status.COMPLETE, Status.INTERRUPTED]
    await store.close()


async def test_full_queue_ends_the_reply_with_a_clear_line(engine: Engine, store: Store, settings: Settings) -> None:
    small = Engine(settings.engine.model_copy(update={"n_ctx": 512, "n_threads": 1, "parallel": 1, "max_queue": 1}))
    manager = ConversationManager(small, store, settings)
    try:
        keys = [SessionKey.for_channel("test", "g", f"c{i}") for i in range(3)]
        for key in keys:
            await manager.set_sampling(key, max_tokens=300, grammar=LONG_GRAMMAR)
        targets = [Target() for _ in keys]
        tasks = [
            asyncio.create_task(manager.respond(message("sing", key), target)) for key, target in zip(keys, targets)
        ]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        refused = done.pop().result()
        assert refused.status == Status.FAILED and "try again" in refused.notes[0]
        for key in keys:
            manager.stop(key)
        await asyncio.gather(*tasks)
    finally:
        small.close()


async def test_shutdown_stores_running_replies_as_stopped(manager: ConversationManager) -> None:
    await manager.set_sampling(CHANNEL, max_tokens=300, grammar=LONG_GRAMMAR)
    target = Target()
    task = asyncio.create_task(manager.respond(message("sing"), target))
    await target.first_text.wait()
    await manager.shutdown()
    assert task.done() and (await task).status == Status.STOPPED
    assert "shutting down" in target.messages[-1]
    late = Target()
    assert (await manager.respond(message("anyone there?"), late)).status == Status.FAILED
    assert "shutting down" in late.messages[-1]


async def test_unwritable_database_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the database"):
        await Store.open(blocker / "llamarelay.sqlite3")


async def test_duplicate_event_ids_are_claimed_once(manager: ConversationManager) -> None:
    assert await manager.claim_event("Ev1")
    assert not await manager.claim_event("Ev1")
    assert await manager.claim_event("Ev2")


async def start_singing(manager: ConversationManager, texts: list[str]) -> tuple[list[Target], list[asyncio.Task[Any]]]:
    """One long reply running in CHANNEL and ``texts[1:]`` waiting behind it."""
    await manager.set_sampling(CHANNEL, max_tokens=300, grammar=LONG_GRAMMAR)
    targets = [Target() for _ in texts]
    tasks = [asyncio.create_task(manager.respond(message(text), target)) for text, target in zip(texts, targets)]
    await targets[0].first_text.wait()
    return targets, tasks


async def test_stop_ends_the_running_reply_and_those_waiting(manager: ConversationManager) -> None:
    targets, tasks = await start_singing(manager, ["sing", "and again", "once more"])
    status = manager.status(CHANNEL)
    assert status.state is State.GENERATING and status.waiting == 2
    assert dict(status.lines())["This conversation"] == "generating now, 2 more messages waiting"
    assert manager.stop(CHANNEL) == 3
    results = await asyncio.gather(*tasks)
    assert [r.status for r in results] == [Status.STOPPED] * 3
    assert results[1].text == "" and all(t.messages[-1].endswith(STOPPED_NOTE) for t in targets)
    assert [m.status for m in await manager.history(CHANNEL)][1::2] == [Status.STOPPED] * 3


async def test_status_tells_a_message_waiting_behind_another(manager: ConversationManager) -> None:
    _, tasks = await start_singing(manager, ["sing", "next"])
    other = Target()
    # The second message waits for the first: /status must not say "nothing queued".
    assert manager.status(CHANNEL).waiting == 1
    assert "1 more message waiting" in dict(manager.status(CHANNEL).lines())["This conversation"]
    manager.stop(CHANNEL)
    await asyncio.gather(*tasks)
    assert dict(manager.status(CHANNEL).lines())["This conversation"] == "nothing queued"
    del other


async def test_reset_cancels_waiting_messages_instead_of_answering_them(manager: ConversationManager) -> None:
    targets, tasks = await start_singing(manager, ["sing", "who reads this?"])
    await manager.reset(CHANNEL)
    results = await asyncio.gather(*tasks)
    assert results[1].status == Status.STOPPED and results[1].text == ""
    assert targets[1].messages[-1] == RESET_NOTE
    assert await manager.history(CHANNEL) == []  # nothing answered into the cleared history


async def test_waiting_messages_are_capped_per_conversation(manager: ConversationManager) -> None:
    manager.settings.conversation.max_waiting = 2
    targets, tasks = await start_singing(manager, ["sing", "w1", "w2"])
    extra = Target()
    refused = await manager.respond(message("w3"), extra)
    assert refused.status == Status.FAILED and "2 messages are already waiting" in extra.messages[-1]
    assert len(await manager.history(CHANNEL)) == 6  # the refused message is not stored unanswered
    manager.stop(CHANNEL)
    await asyncio.gather(*tasks)


async def test_shutdown_ends_requests_in_every_state(manager: ConversationManager) -> None:
    targets, tasks = await start_singing(manager, ["sing", "waiting"])
    other = SessionKey.for_channel("test", "guild1", "queued")
    await manager.set_sampling(other, max_tokens=300, grammar=LONG_GRAMMAR)
    more = [Target() for _ in range(3)]  # the test engine has 2 slots: the third of these queues
    more_tasks = [
        asyncio.create_task(manager.respond(message("sing", SessionKey.for_channel("test", "g", f"c{i}")), t))
        for i, t in enumerate(more)
    ]
    async with asyncio.timeout(10):
        while manager.engine.status().queue_length == 0:
            await asyncio.sleep(0.01)
    async with asyncio.timeout(10):
        await manager.shutdown()
    assert all(task.done() for task in tasks + more_tasks)
    for target in targets + more:
        assert target.messages[-1].endswith(SHUTTING_DOWN)
    assert manager.engine.status().running == 0 and manager.engine.status().queue_length == 0


async def test_a_template_error_ends_the_reply_with_a_line(manager: ConversationManager, engine: Engine) -> None:
    original = engine.chat_template
    engine.chat_template = ChatTemplate("{{ raise_exception('This template needs something else') }}")
    try:
        target = Target()
        result = await manager.respond(message("hello"), target)
    finally:
        engine.chat_template = original
    assert result.status == Status.FAILED and target.messages[-1].startswith("⚠️")
    assert (await manager.history(CHANNEL))[-1].status == Status.FAILED


async def test_a_database_read_error_ends_the_reply_with_a_line(
    manager: ConversationManager, settings: Settings
) -> None:
    import sqlite3

    await manager.respond(message("hello"), Target())
    with sqlite3.connect(settings.store.path) as db:  # another program breaks the table under the bot
        db.execute("ALTER TABLE sessions RENAME COLUMN sampling TO broken")
    target = Target()
    result = await manager.respond(message("still there?"), target)
    assert result.status == Status.FAILED and "database" in target.messages[-1]
    assert [m.content for m in await manager.history(CHANNEL)][-2] == "still there?"  # the message is kept


async def test_lone_surrogates_are_stored_not_refused(manager: ConversationManager) -> None:
    result = await manager.respond(Incoming(CHANNEL, "u1", "name\ud800", "hi \udfff there"), Target())
    assert result.status == Status.COMPLETE
    history = await manager.history(CHANNEL)
    assert history[0].content == "hi \ufffd there" and history[0].author_name == "name\ufffd"


async def test_attached_files_are_read_into_the_message(manager: ConversationManager) -> None:
    from bot.files import read_attachment

    files = (
        read_attachment("todo.txt", "text/plain", b"buy milk", 1000),
        read_attachment("cat.jpg", "image/jpeg", b"\xff\xd8", 1000),
    )
    target = Target()
    result = await manager.respond(Incoming(CHANNEL, "u1", "Ana", "Summarize this", attachments=files), target)
    assert result.status == Status.COMPLETE and "📎 I skipped cat.jpg: not a text file." in target.messages[-1]
    stored_message = (await manager.history(CHANNEL))[0]
    assert stored_message.content == "Summarize this\n\nFile todo.txt:\n```\nbuy milk\n```"
    only_files = await manager.respond(Incoming(CHANNEL, "u1", "Ana", "", attachments=files[:1]), Target())
    assert only_files.status == Status.COMPLETE


async def test_a_message_sent_while_a_reset_runs_is_kept(manager: ConversationManager) -> None:
    _, tasks = await start_singing(manager, ["sing"])
    reset = asyncio.create_task(manager.reset(CHANNEL))
    await asyncio.sleep(0)
    later = await manager.respond(message("a fresh start"), Target())
    await reset
    await asyncio.gather(*tasks)
    history = await manager.history(CHANNEL)
    assert [m.content for m in history] == ["a fresh start", later.text]  # answered and remembered


async def test_shutdown_past_its_deadline_leaves_nothing_generating(manager: ConversationManager) -> None:
    _, tasks = await start_singing(manager, ["sing"])
    manager.engine.scheduler.cond.acquire()  # the engine is stuck in a long decode step: it cannot end the reply
    try:
        await manager.shutdown(timeout=0.2)
        stuck = (await manager.history(CHANNEL))[-1]
        assert stuck.status == Status.INTERRUPTED and stuck.content.startswith("l")
    finally:
        manager.engine.scheduler.cond.release()
    await asyncio.gather(*tasks)
