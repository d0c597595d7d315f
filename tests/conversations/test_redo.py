"""Regenerate and Continue, and the one rule (`bot.conversations.redo`) that says when they may act."""

from __future__ import annotations

import asyncio

import pytest

from bot.conversations import ConversationManager, RedoRefusal
from bot.conversations.redo import refusal
from bot.store import Status, StoredMessage
from bot.wording import LENGTH_NOTE
from tests.conversations.helpers import CHANNEL, LONG_GRAMMAR, Target, message


async def test_regenerate_replaces_the_last_answer(manager: ConversationManager) -> None:
    await manager.set_sampling(CHANNEL, grammar='root ::= "First try."')
    first = await manager.respond(message("Say something"), Target())
    assert first.reply_id is not None and not first.can_continue
    await manager.set_sampling(CHANNEL, grammar='root ::= "Second try."')
    target = Target()
    again = await manager.regenerate(CHANNEL, target, first.reply_id)
    assert again.text == "Second try." and again.reply_id == first.reply_id and target.messages == ["Second try."]
    history = await manager.history(CHANNEL)
    assert [m.content for m in history] == ["Say something", "Second try."]  # only the new answer is kept


async def test_regenerate_of_a_stale_reply_says_so(manager: ConversationManager) -> None:
    old = await manager.respond(message("one"), Target())
    await manager.respond(message("two"), Target())
    assert old.reply_id is not None
    target = Target()
    result = await manager.regenerate(CHANNEL, target, old.reply_id)
    assert result.status == Status.FAILED and "no longer the latest" in target.messages[-1]
    assert [m.content for m in await manager.history(CHANNEL)][:2] == ["one", old.text]


async def test_continue_extends_an_answer_cut_by_the_length_limit(manager: ConversationManager) -> None:
    await manager.set_sampling(CHANNEL, max_tokens=10, grammar=LONG_GRAMMAR)
    cut = await manager.respond(message("sing"), Target())
    assert cut.can_continue and cut.reply_id is not None
    latest = await manager.latest_reply(CHANNEL)
    assert latest is not None and latest.id == cut.reply_id
    target = Target()
    more = await manager.continue_reply(CHANNEL, target, cut.reply_id)
    assert more.text.startswith(cut.text) and len(more.text) > len(cut.text)
    assert target.messages[0].startswith(more.text[len(cut.text) :].strip()[:10])  # it shows what it adds
    stored_reply = (await manager.history(CHANNEL))[-1]
    assert stored_reply.content == more.text and len(await manager.history(CHANNEL)) == 2


def reply(status: str = Status.COMPLETE, notes: str = "", content: str = "An answer.", id: int = 7) -> StoredMessage:
    return StoredMessage(id, "assistant", content, status, "", 0.0, notes)


@pytest.mark.parametrize(
    ("latest", "answering", "continuing", "expected"),
    [
        (reply(), False, False, None),
        (reply(notes=LENGTH_NOTE), False, True, None),  # cut by the length limit: Continue goes on
        (reply(Status.STOPPED), False, True, None),
        (reply(Status.INTERRUPTED), False, True, None),
        (reply(), False, True, RedoRefusal.NOTHING_TO_CONTINUE),  # it ended on its own
        (reply(Status.STOPPED, content="  "), False, True, RedoRefusal.NOTHING_TO_CONTINUE),  # nothing to go on from
        (reply(id=8), False, False, RedoRefusal.STALE),  # a newer answer came since
        (None, False, False, RedoRefusal.STALE),  # the history was reset
        (None, True, False, RedoRefusal.BUSY),  # a newer message is being answered
        (reply(Status.GENERATING), False, False, RedoRefusal.BUSY),  # a second press (or another process) writes it
        (reply(), True, True, RedoRefusal.BUSY),
    ],
)
def test_the_redo_rule(
    latest: StoredMessage | None, answering: bool, continuing: bool, expected: RedoRefusal | None
) -> None:
    assert refusal(latest, 7, continuing=continuing, answering=answering) is expected


async def test_every_platform_asks_the_manager_the_same_question(manager: ConversationManager) -> None:
    await manager.set_sampling(CHANNEL, grammar='root ::= "Hi."')
    first = await manager.respond(message("Hello"), Target())
    assert first.reply_id is not None
    assert await manager.redo_refusal(CHANNEL, first.reply_id, continuing=False) is None
    assert await manager.redo_refusal(CHANNEL, first.reply_id, continuing=True) is RedoRefusal.NOTHING_TO_CONTINUE
    second = await manager.respond(message("Again"), Target())
    assert await manager.redo_refusal(CHANNEL, first.reply_id, continuing=False) is RedoRefusal.STALE
    await manager.set_sampling(CHANNEL, max_tokens=300, grammar=LONG_GRAMMAR)
    target = Target()
    running = asyncio.create_task(manager.respond(message("sing"), target))
    await target.first_text.wait()
    assert second.reply_id is not None
    assert await manager.redo_refusal(CHANNEL, second.reply_id, continuing=False) is RedoRefusal.STALE
    latest = await manager.latest_reply(CHANNEL)
    assert latest is not None and latest.status == Status.GENERATING
    assert await manager.redo_refusal(CHANNEL, latest.id, continuing=False) is RedoRefusal.BUSY
    manager.stop(CHANNEL)
    stopped = await running
    assert stopped.can_continue and stopped.reply_id == latest.id
    assert await manager.redo_refusal(CHANNEL, latest.id, continuing=True) is None
