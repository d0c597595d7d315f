"""Buttons under Discord replies: real discord.py against tests/fake_discord/, with the real engine.

Stop shows while a reply is written; Regenerate (and Continue, for an answer cut short) once it is stored.
The answer to a press streams as a new message replying to the pressed one, which loses its buttons. Buttons
keep working after a restart (dynamic items), only allowed people may press them, and a press on an answer
that is no longer the latest gets an explanation only the presser sees.
"""

from __future__ import annotations

from typing import Any

from bot.config import Settings
from bot.conversations import ConversationManager
from bot.store import Status
from bot.wording import LENGTH_NOTE, STALE_REPLY, STOPPED_NOTE
from tests.fake_discord import (
    BOB_ID,
    CHANNEL_ID,
    EPHEMERAL_FLAG,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    FakeDiscord,
    FakeInteraction,
)
from tests.test_discord import CHANNEL_KEY, FOX, StartBot, _stop, dsettings, fake, force_reply, start_bot, stored  # noqa: F401

DEFERRED_UPDATE, UPDATE_MESSAGE = 6, 7  # interaction callback types


def labels(fake: FakeDiscord, message_id: int) -> list[str]:
    return sorted(fake.buttons(message_id))


async def ephemeral_answer(fake: FakeDiscord, inter: FakeInteraction) -> str:
    await fake.wait_for(lambda: inter.original_id, "the ephemeral answer")
    [answer] = fake.interaction_messages(inter)
    assert answer["flags"] & EPHEMERAL_FLAG, answer
    return str(answer["content"])


def answer_to(fake: FakeDiscord, message_id: int, text: str) -> dict[str, Any] | None:
    """The bot's reply to ``message_id`` once it reads ``text`` and shows its final buttons."""
    replies = [m for m in fake.replies_to(message_id) if m["content"].strip() == text]
    return replies[0] if replies and "Stop" not in fake.buttons(int(replies[0]["id"])) else None


async def test_regenerate_replaces_the_answer_and_stale_presses_are_explained(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, "First try.")
    await start_bot()
    question = await fake.message_create("say something")
    first = await fake.wait_for(lambda: answer_to(fake, question, "First try."), "the first answer")
    first_id = int(first["id"])
    [reply_id] = [m.id for m in await stored(manager, CHANNEL_KEY) if m.role == "assistant"]
    assert fake.buttons(first_id) == {"Regenerate": f"llamarelay:regenerate:{reply_id}"}
    # While it was written the same message carried Stop, and only Stop.
    sent = [
        r.body
        for r in fake.requests
        if r.method in ("POST", "PATCH")
        and r.path.startswith(f"/channels/{CHANNEL_ID}/messages")
        and isinstance(r.body, dict)
        and r.body.get("components")
    ]
    assert sent[0]["components"][0]["components"][0]["custom_id"] == "llamarelay:stop"

    await force_reply(manager, CHANNEL_KEY, "Second try.")
    press = await fake.press(first_id, "Regenerate", user_id=BOB_ID)
    second = await fake.wait_for(lambda: answer_to(fake, first_id, "Second try."), "the regenerated answer")
    assert [c["type"] for c in press.callbacks] == [UPDATE_MESSAGE]
    assert fake.buttons(first_id) == {} and first["content"] == "First try."  # the old answer stays, bare
    assert fake.buttons(int(second["id"])) == {"Regenerate": f"llamarelay:regenerate:{reply_id}"}
    history = await stored(manager, CHANNEL_KEY)
    assert [(m.role, m.content) for m in history] == [("user", "say something"), ("assistant", "Second try.")]

    # A newer question makes this answer stale: its buttons stay, but a press only explains.
    await force_reply(manager, CHANNEL_KEY, "Third.")
    newer = await fake.message_create("and now?")
    await fake.wait_for(lambda: answer_to(fake, newer, "Third."), "the newer answer")
    stale = await fake.press(int(second["id"]), "Regenerate")
    assert await ephemeral_answer(fake, stale) == STALE_REPLY
    assert len(await stored(manager, CHANNEL_KEY)) == 4 and fake.buttons(int(second["id"]))
    assert fake.pinging_writes() == []


async def test_only_allowed_people_may_press(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.discord.allowed_role_ids = [MEMBER_ROLE_ID]
    await force_reply(manager, CHANNEL_KEY, "Members only.")
    await start_bot()
    question = await fake.message_create("hello")
    answer = await fake.wait_for(lambda: answer_to(fake, question, "Members only."), "the answer")
    refused = await fake.press(int(answer["id"]), "Regenerate", user_id=MALLORY_ID)
    assert "not on the list" in await ephemeral_answer(fake, refused)
    assert fake.buttons(int(answer["id"])) and len(fake.bot_messages()) == 2  # the answer and the refusal
    assert [m.status for m in await stored(manager, CHANNEL_KEY)] == [Status.COMPLETE, Status.COMPLETE]


async def test_continue_extends_an_answer_cut_by_the_length_limit(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, FOX * 10, max_tokens=8)
    await start_bot()
    question = await fake.message_create("talk")
    cut = await fake.wait_for(
        lambda: (
            (r := fake.replies_to(question))
            and LENGTH_NOTE in r[0]["content"]
            and "Stop" not in fake.buttons(int(r[0]["id"]))
            and r[0]
        ),
        "the cut answer",
    )
    [_, reply] = await stored(manager, CHANNEL_KEY)
    assert labels(fake, int(cut["id"])) == ["Continue", "Regenerate"]
    assert fake.buttons(int(cut["id"]))["Continue"] == f"llamarelay:continue:{reply.id}"

    await manager.set_sampling(CHANNEL_KEY, grammar='root ::= " And that is all."', max_tokens=40)
    await fake.press(int(cut["id"]), "Continue")
    more = await fake.wait_for(lambda: answer_to(fake, int(cut["id"]), "And that is all."), "the continuation")
    assert labels(fake, int(more["id"])) == ["Regenerate"] and fake.buttons(int(cut["id"])) == {}
    history = await stored(manager, CHANNEL_KEY)
    assert [m.content for m in history] == ["talk", reply.content + " And that is all."]
    assert history[-1].id == reply.id and history[-1].status == Status.COMPLETE


async def test_stop_button_ends_the_reply_which_can_then_continue(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, FOX * 40, max_tokens=1200)
    await start_bot()
    question = await fake.message_create("write a lot")
    streaming = await fake.wait_for(
        lambda: (r := fake.replies_to(question)) and r[0]["content"].startswith("The") and r[0], "the reply to stream"
    )
    assert labels(fake, int(streaming["id"])) == ["Stop"]
    press = await fake.press(int(streaming["id"]), "Stop", user_id=BOB_ID)
    stopped = await fake.wait_for(
        lambda: (
            (r := fake.replies_to(question))
            and STOPPED_NOTE in r[0]["content"]
            and "Stop" not in fake.buttons(int(r[0]["id"]))
            and r[0]
        ),
        "the stopped reply",
    )
    assert [c["type"] for c in press.callbacks] == [DEFERRED_UPDATE]  # the reply itself says it stopped
    assert labels(fake, int(stopped["id"])) == ["Continue", "Regenerate"]
    assert (await stored(manager, CHANNEL_KEY))[-1].status == Status.STOPPED


async def test_buttons_keep_working_after_a_restart(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, "Before.")
    first_run = await start_bot()
    question = await fake.message_create("hi")
    answer = await fake.wait_for(lambda: answer_to(fake, question, "Before."), "the answer")
    # What a bot that crashed mid-reply leaves behind: a Stop button with nothing running.
    left_over = fake.add_bot_message(
        CHANNEL_ID,
        "Half an answ",
        components=[
            {"type": 1, "components": [{"type": 2, "style": 2, "label": "Stop", "custom_id": "llamarelay:stop"}]}
        ],
    )
    await _stop(first_run)

    await force_reply(manager, CHANNEL_KEY, "After.")
    await start_bot()
    await fake.press(int(answer["id"]), "Regenerate")
    await fake.wait_for(lambda: answer_to(fake, int(answer["id"]), "After."), "the regenerated answer")
    idle = await fake.press(int(left_over["id"]), "Stop")
    assert await ephemeral_answer(fake, idle) == "Nothing is being generated in this conversation."
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["hi", "After."]


async def test_an_ask_answer_carries_the_buttons_too(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, "Asked.")
    await start_bot()
    inter = await fake.slash("ask", {"prompt": "a question"})
    await fake.wait_for(
        lambda: (
            inter.original_id
            and fake.messages[inter.original_id]["content"] == "Asked."
            and labels(fake, inter.original_id) == ["Regenerate"]
        ),
        "the /ask answer and its button",
    )
    await force_reply(manager, CHANNEL_KEY, "Asked again.")
    assert inter.original_id is not None
    await fake.press(inter.original_id, "Regenerate")
    again = await fake.wait_for(lambda: answer_to(fake, inter.original_id or 0, "Asked again."), "the new answer")
    assert "webhook_id" not in again and fake.buttons(inter.original_id) == {}
    assert [m.content for m in await stored(manager, CHANNEL_KEY)] == ["a question", "Asked again."]
