"""Streaming a reply (`bot.conversations.streaming`): checkpoints, platform failures, reasoning, what is shown."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.config import Settings
from bot.conversations import ConversationManager
from bot.conversations.streaming import CHECKPOINT_SECONDS
from bot.errors import MessageGone
from bot.store import Status, Store
from bot.types import Controls
from tests.conversations.helpers import CHANNEL, LONG_GRAMMAR, Target, message


async def test_a_crash_mid_stream_keeps_what_was_shown(manager: ConversationManager, settings: Settings) -> None:
    await manager.set_sampling(CHANNEL, max_tokens=1000, grammar=LONG_GRAMMAR)
    target = Target()
    task = asyncio.create_task(manager.respond(message("sing"), target))
    await asyncio.sleep(CHECKPOINT_SECONDS + 1.5)
    shown = target.messages[-1]
    # What a restart after `kill -9` finds: a second process opening the same database right now.
    survivor = await Store.open(settings.store.path)
    try:
        reply = (await survivor.messages(str(CHANNEL)))[-1]
        assert reply.status == Status.INTERRUPTED and len(reply.content) > 100
        assert shown.startswith(reply.content[:100])
    finally:
        await survivor.close()
        manager.stop(CHANNEL)
        await task


async def test_platform_failure_mid_stream_frees_the_engine_and_keeps_the_text(manager: ConversationManager) -> None:
    class BrokenTarget(Target):
        max_length = 50

        async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
            raise MessageGone("the channel was deleted")

    await manager.set_sampling(CHANNEL, max_tokens=300, grammar=LONG_GRAMMAR)
    target = BrokenTarget()
    result = await manager.respond(message("sing"), target)
    assert not result.delivered and result.status == Status.INTERRUPTED
    async with asyncio.timeout(2):  # the generation was cancelled (freed within a decode step), not left running
        while manager.status(CHANNEL).engine.running:
            await asyncio.sleep(0.01)
    stored = (await manager.history(CHANNEL))[-1]
    assert stored.status == Status.INTERRUPTED and stored.content.startswith("l") and stored.content == result.text


async def test_reasoning_is_shown_as_a_status_and_never_stored(manager: ConversationManager) -> None:
    await manager.set_sampling(
        CHANNEL, max_tokens=120, grammar='root ::= "<think>" [a-z ]{40,60} "</think>" " The answer is yes."'
    )
    target = Target()
    seen: list[str] = []
    original_edit = target.edit

    async def edit(handle: Any, text: str, controls: Controls | None = None) -> None:
        seen.append(text)
        await original_edit(handle, text, controls)

    target.edit = edit  # type: ignore[method-assign]
    result = await manager.respond(message("Is it?"), target)
    assert result.text == "The answer is yes." and target.messages == ["The answer is yes."]
    assert all("<think>" not in text for text in target.messages + seen)
    assert (await manager.history(CHANNEL))[-1].content == "The answer is yes."


async def test_reasoning_can_be_quoted_above_the_answer(manager: ConversationManager) -> None:
    manager.settings.conversation.show_reasoning = "quoted"
    await manager.set_sampling(CHANNEL, max_tokens=80, grammar='root ::= "<think>weigh it</think>" "Yes."')
    target = Target()
    result = await manager.respond(message("Is it?"), target)
    assert target.messages == ["> weigh it\n\nYes."] and result.text == "Yes."


async def test_a_reply_cut_inside_a_character_never_ends_with_a_replacement(manager: ConversationManager) -> None:
    family = "👨\u200d👩\u200d👧\u200d👦"
    for max_tokens in range(2, 12):
        await manager.set_sampling(CHANNEL, max_tokens=max_tokens, grammar=f'root ::= "Hi {family} there"')
        result = await manager.respond(message("greet"), Target())
        assert "\ufffd" not in result.text and f"Hi {family} there".startswith(result.text)
