"""Discord DMs under access lists: real discord.py against tests/fake_discord/, with the real engine.

With any allow-list set, a DM is answered only for a user the lists allow somewhere: named in
``allowed_user_ids``, or a member (looked up over REST) of an allowed guild with an allowed role and able to
see an allowed channel, where those are listed. Without lists the bot answers anyone who can DM it.
"""

from __future__ import annotations

from typing import Any

import pytest

from bot.config import Settings
from bot.conversations import ConversationManager
from bot.types import SessionKey
from tests.fake_discord import (
    ALICE_ID,
    BOB_ID,
    EPHEMERAL_FLAG,
    EVE_ID,
    GUILD_ID,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    OTHER_CHANNEL_ID,
    FakeDiscord,
)
from tests.test_discord import StartBot, dsettings, fake, force_reply, start_bot  # noqa: F401 (fixtures)

OTHER_GUILD_ID = 800000000000000099  # a guild the bot is not in


def dm_key(user_id: int) -> SessionKey:
    return SessionKey.for_dm("discord", str(user_id))


def member_lookups(fake: FakeDiscord, user_id: int) -> int:
    return len(fake.matching("GET", f"/guilds/{GUILD_ID}/members/{user_id}"))


@pytest.mark.parametrize(
    ("lists", "answered", "ignored"),
    [
        ({"allowed_guild_ids": [GUILD_ID]}, [ALICE_ID], [EVE_ID]),  # Eve is no member of the guild
        ({"allowed_role_ids": [MEMBER_ROLE_ID]}, [BOB_ID], [MALLORY_ID, EVE_ID]),  # Mallory has no role
        ({"allowed_channel_ids": [OTHER_CHANNEL_ID]}, [ALICE_ID], [EVE_ID]),
        ({"allowed_guild_ids": [OTHER_GUILD_ID], "allowed_user_ids": [EVE_ID]}, [EVE_ID], [ALICE_ID]),
    ],
    ids=["guilds", "roles", "channels", "users"],
)
async def test_dm_is_answered_only_for_users_the_lists_allow(
    fake: FakeDiscord,
    manager: ConversationManager,
    dsettings: Settings,
    start_bot: StartBot,  # noqa: F811
    lists: dict[str, Any],
    answered: list[int],
    ignored: list[int],
) -> None:
    for key, ids in lists.items():
        setattr(dsettings.discord, key, ids)
    for user_id in answered:
        await force_reply(manager, dm_key(user_id), f"Hello {user_id}.")
    await start_bot()
    refused = [
        await fake.message_create("let me in", author_id=user_id, dm=True, mention_bot=False) for user_id in ignored
    ]
    for user_id in answered:
        mid = await fake.message_create("hi", author_id=user_id, dm=True, mention_bot=False)
        await fake.final_reply(mid, f"Hello {user_id}.")
    assert all(not fake.replies_to(mid) for mid in refused)
    assert len(fake.bot_messages()) == len(answered)
    for user_id in ignored:
        assert await manager.history(dm_key(user_id)) == []


async def test_stranger_gets_a_private_refusal_to_a_dm_command_and_is_looked_up_once_a_minute(
    fake: FakeDiscord,
    manager: ConversationManager,
    dsettings: Settings,
    start_bot: StartBot,  # noqa: F811
) -> None:
    dsettings.discord.allowed_guild_ids = [GUILD_ID]
    await start_bot()
    inter = await fake.slash("status", user_id=EVE_ID, dm=True)
    await fake.wait_for(lambda: inter.original_id, "the /status refusal")
    [refusal] = fake.interaction_messages(inter)
    assert refusal["flags"] & EPHEMERAL_FLAG
    assert "direct messages only from people allowed" in refusal["content"]
    spam = [
        await fake.message_create(f"hello{'?' * n}", author_id=EVE_ID, dm=True, mention_bot=False) for n in range(3)
    ]
    await force_reply(manager, dm_key(ALICE_ID), "Hi Alice.")
    await fake.final_reply(await fake.message_create("hi", dm=True, mention_bot=False), "Hi Alice.")
    assert all(not fake.replies_to(mid) for mid in spam)
    assert member_lookups(fake, EVE_ID) == 1  # the answer is kept a minute: DM spam costs no REST calls


async def test_without_allow_lists_anyone_may_dm_the_bot(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:  # noqa: F811
    await force_reply(manager, dm_key(EVE_ID), "Hi stranger.")
    await start_bot()
    await fake.final_reply(
        await fake.message_create("hi", author_id=EVE_ID, dm=True, mention_bot=False), "Hi stranger."
    )
    assert member_lookups(fake, EVE_ID) == 0
