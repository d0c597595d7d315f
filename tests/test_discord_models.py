"""``/model`` on Discord: autocomplete offers the configured models, no name shows the current one and the list,
a name switches the channel (server managers or admins; anyone in a DM); the channel's next reply comes from that
model, another channel keeps its own, and both survive a restart. Real discord.py against tests/fake_discord/,
real llama.cpp as the default model and a real recording server process as the second."""

from __future__ import annotations

from typing import Any

from bot.config import Settings
from bot.conversations import ConversationManager
from bot.engine import Engine
from bot.store import Store
from bot.wording import answered_by, model_changed
from tests.fake_discord import BOB_ID, CHANNEL_ID, EPHEMERAL_FLAG, OTHER_CHANNEL_ID, FakeDiscord
from tests.helper_model import DEFAULT, server, settings  # noqa: F401
from tests.recording_server import REPLY, RecordingServer
from tests.test_discord import CHANNEL_KEY, OTHER_KEY, StartBot, _stop, dsettings, fake, force_reply, start_bot, stored  # noqa: F401


async def answer(fake: FakeDiscord, inter: Any) -> dict[str, Any]:
    await fake.wait_for(lambda: inter.original_id, "the answer")
    [message] = fake.interaction_messages(inter)
    return message


async def test_a_channel_switched_with_slash_model_is_answered_by_that_model_and_keeps_it_after_a_restart(
    fake: FakeDiscord,
    manager: ConversationManager,
    start_bot: StartBot,
    engine: Engine,
    store: Store,
    dsettings: Settings,
    server: RecordingServer,
) -> None:  # noqa: F811
    await force_reply(manager, CHANNEL_KEY, "Default here.")
    await force_reply(manager, OTHER_KEY, "Default there.")
    bot = await start_bot()
    [name_option] = fake.commands["model"]["options"]
    assert name_option["name"] == "name" and name_option["autocomplete"] is True

    # Autocomplete: discord.py answers with the models matching what was typed.
    typed = await fake._interact(
        4,
        {
            "id": fake.commands["model"]["id"],
            "name": "model",
            "type": 1,
            "options": [{"name": "name", "type": 3, "value": "hel", "focused": True}],
        },
        user_id=BOB_ID,
        channel_id=CHANNEL_ID,
        dm=False,
    )
    await fake.wait_for(lambda: typed.callbacks, "the autocomplete answer")
    assert typed.callbacks[0]["type"] == 8
    assert typed.callbacks[0]["data"]["choices"] == [{"name": "helper — the recording server", "value": "helper"}]

    shown = await answer(fake, await fake.slash("model", user_id=BOB_ID))
    assert shown["flags"] & EPHEMERAL_FLAG
    assert f"uses `{DEFAULT}`" in shown["content"] and "`helper` — the recording server" in shown["content"]

    refused = await answer(fake, await fake.slash("model", {"name": "helper"}, user_id=BOB_ID))
    assert refused["flags"] & EPHEMERAL_FLAG and "Only" in refused["content"] and "model" in refused["content"]
    unknown = await answer(fake, await fake.slash("model", {"name": "gpt-9"}, manage_guild=True))
    assert unknown["flags"] & EPHEMERAL_FLAG and "no model called 'gpt-9'" in unknown["content"]
    assert await manager.model_name(CHANNEL_KEY) == DEFAULT  # neither was changed

    changed = await answer(fake, await fake.slash("model", {"name": "helper"}, manage_guild=True))
    assert changed["content"] == model_changed("helper", "Alice") and not changed["flags"] & EPHEMERAL_FLAG

    asked = await fake.message_create("who answers?")
    await fake.final_reply(asked, f"{REPLY}\n\n{answered_by('helper')}")
    assert server.requests()[-1]["body"]["model"] == "remote-id"
    other = await fake.message_create("and here?", channel_id=OTHER_CHANNEL_ID)
    await fake.final_reply(other, "Default there.")  # the other channel keeps the default
    assert [m.model for m in await stored(manager, CHANNEL_KEY)] == ["", "helper"]
    status = await answer(fake, await fake.slash("status"))
    assert "**Model:** helper" in status["content"]

    # A restart: a new process, the same database.
    await manager.shutdown()
    await _stop(bot)
    restarted = ConversationManager(engine, store, dsettings)
    try:
        await start_bot(restarted)
        again = await fake.message_create("still you?")
        await fake.final_reply(again, f"{REPLY}\n\n{answered_by('helper')}")
        there = await fake.message_create("and you?", channel_id=OTHER_CHANNEL_ID)
        await fake.final_reply(there, "Default there.")
    finally:
        await restarted.shutdown()
    assert len(server.requests()) == 2


async def test_anyone_may_pick_the_model_of_their_dm(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:  # noqa: F811
    await start_bot()
    changed = await answer(fake, await fake.slash("model", {"name": "HELPER"}, user_id=BOB_ID, dm=True))
    assert changed["content"] == model_changed("helper", "Bob")
    assert await manager.model_name(CHANNEL_KEY) == DEFAULT
    await fake.wait_for(lambda: manager.platforms.status().get("discord"), "the bot to be ready")  # no late event
