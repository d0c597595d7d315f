"""``/settings``: this conversation's temperature, max_tokens and top_p, within [sampling]'s bounds. Server
managers (or admins) set them in a server, anyone in a DM; a thread inherits its channel's settings and
system prompt. Real discord.py against tests/fake_discord/.
"""

from __future__ import annotations

from typing import Any

from bot.conversations import ConversationManager
from tests.fake_discord import BOB_ID, EPHEMERAL_FLAG, THREAD_ID, FakeDiscord, FakeInteraction
from tests.test_discord import ALICE_DM_KEY, CHANNEL_KEY, THREAD_KEY, StartBot, dsettings, fake, start_bot  # noqa: F401


async def answer(fake: FakeDiscord, inter: FakeInteraction) -> dict[str, Any]:
    await fake.wait_for(lambda: inter.original_id, "the answer")
    [message] = fake.interaction_messages(inter)
    return message


async def test_settings_are_shown_set_checked_and_inherited_by_threads(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    options = {o["name"]: o for o in fake.commands["settings"]["options"]}
    assert (
        options["temperature"]["type"],
        options["temperature"]["min_value"],
        options["temperature"]["max_value"],
    ) == (10, 0.0, 5.0)  # Discord shows the bounds of [sampling]
    assert (options["max_tokens"]["type"], options["max_tokens"]["max_value"]) == (4, 32768)

    shown = await answer(fake, await fake.slash("settings", user_id=BOB_ID))
    assert shown["flags"] & EPHEMERAL_FLAG
    assert "**Temperature:** 0.0" in shown["content"] and "**Max tokens:** 24" in shown["content"]

    refused = await answer(fake, await fake.slash("settings", {"temperature": 0.5}, user_id=BOB_ID))
    assert refused["flags"] & EPHEMERAL_FLAG and "Manage Server" in refused["content"]
    for bad, why in (
        ({"temperature": 9.0}, "temperature: input should be less than or equal to 5"),
        ({"top_p": 0.0}, "top_p: input should be greater than 0"),
        ({"max_tokens": 4096}, "max_tokens must be below the 2048-token context window"),
    ):
        error = await answer(fake, await fake.slash("settings", bad, manage_guild=True))
        assert error["flags"] & EPHEMERAL_FLAG and why in error["content"], error["content"]
    assert (await manager.sampling(CHANNEL_KEY)).temperature == 0.0  # nothing was changed

    changed = await answer(
        fake, await fake.slash("settings", {"temperature": 0.5, "max_tokens": 64}, manage_guild=True)
    )
    assert not changed["flags"] & EPHEMERAL_FLAG and "changed by Alice" in changed["content"]
    sampling = await manager.sampling(CHANNEL_KEY)
    assert (sampling.temperature, sampling.max_tokens, sampling.top_p) == (0.5, 64, 0.95)

    await answer(fake, await fake.slash("system", {"prompt": "You are terse."}, manage_guild=True))
    in_thread = await answer(fake, await fake.slash("settings", channel_id=THREAD_ID, user_id=BOB_ID))
    assert "**Temperature:** 0.5" in in_thread["content"] and "**Max tokens:** 64" in in_thread["content"]
    prompt = await answer(fake, await fake.slash("system", channel_id=THREAD_ID, user_id=BOB_ID))
    assert "You are terse." in prompt["content"]
    await answer(fake, await fake.slash("settings", {"top_p": 0.5}, channel_id=THREAD_ID, manage_guild=True))
    assert (await manager.sampling(THREAD_KEY)).top_p == 0.5 and (await manager.sampling(CHANNEL_KEY)).top_p == 0.95


async def test_anyone_may_change_the_settings_of_their_dm(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    changed = await answer(fake, await fake.slash("settings", {"top_p": 0.5}, dm=True))
    assert "**Top p:** 0.5" in changed["content"]
    assert (await manager.sampling(ALICE_DM_KEY)).top_p == 0.5
    assert (await manager.sampling(CHANNEL_KEY)).top_p == 0.95
