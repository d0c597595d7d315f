"""A fake Discord (REST v10 + gateway websocket) on 127.0.0.1, for driving the real discord.py client.

`FakeDiscord` serves what a bot uses: login, command sync, member lookups, messages (with components),
channel history, threads started from messages, attachments over HTTP, typing, interaction callbacks (messages,
updates, modals) and webhooks, and a gateway that identifies, resumes and replays. It records every request;
tests push MESSAGE_CREATE / INTERACTION_CREATE (slash and message commands, button presses, modal submissions),
script 429s, enforce rate-limit buckets and send op 7 RECONNECT, then wait on conditions. Its one guild, the channels
and the users are described in `payloads`.
"""

from tests.fake_discord.payloads import (
    ALICE_ID,
    APP_ID,
    BOB_ID,
    BOT_ID,
    CHANNEL_ID,
    EPHEMERAL_FLAG,
    EVE_ID,
    GUILD_ID,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    OTHER_BOT_ID,
    OTHER_CHANNEL_ID,
    THREAD_ID,
)
from tests.fake_discord.rest import FakeInteraction, Recorded
from tests.fake_discord.server import FakeDiscord

__all__ = [
    "FakeDiscord",
    "FakeInteraction",
    "Recorded",
    "ALICE_ID",
    "APP_ID",
    "BOB_ID",
    "BOT_ID",
    "CHANNEL_ID",
    "EPHEMERAL_FLAG",
    "EVE_ID",
    "GUILD_ID",
    "MALLORY_ID",
    "MEMBER_ROLE_ID",
    "OTHER_BOT_ID",
    "OTHER_CHANNEL_ID",
    "THREAD_ID",
]
