"""The fake Discord's world (ids of its one guild, channels, users) and the JSON objects discord.py reads."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

API_PREFIX = "/api/v10"
HEARTBEAT_INTERVAL_MS = 41250
EPHEMERAL_FLAG = 64
LOADING_FLAG = 128
MANAGE_GUILD = 1 << 5
EVERYONE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 31)  # view, send, history, app commands

APP_ID = 900000000000000001
BOT_ID = 900000000000000002
GUILD_ID = 800000000000000001
CHANNEL_ID = 800000000000000010
OTHER_CHANNEL_ID = 800000000000000011
THREAD_ID = 800000000000000012  # a thread in CHANNEL_ID
MEMBER_ROLE_ID = 800000000000000050
ALICE_ID = 700000000000000001  # role "member", owns the guild
BOB_ID = 700000000000000002  # role "member"
MALLORY_ID = 700000000000000003  # no role
EVE_ID = 700000000000000004  # not a member of the guild: she can only DM the bot
OTHER_BOT_ID = 700000000000000009
GUILD_CHANNELS = (CHANNEL_ID, OTHER_CHANNEL_ID, THREAD_ID)
EXTRA_CHANNEL_BASE = 800000000000000100  # `FakeRest.add_text_channels` numbers further channels from here


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def jresp(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response discord.py will parse: it does so only when Content-Type is exactly application/json."""
    return web.Response(
        status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )


def user_payload(uid: int, name: str, *, bot: bool = False, global_name: str | None = None) -> dict[str, Any]:
    return {
        "id": str(uid),
        "username": name,
        "discriminator": "0",
        "global_name": global_name,
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


def member_payload(user: dict[str, Any], roles: list[int], *, permissions: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "user": user,
        "roles": [str(r) for r in roles],
        "joined_at": now_iso(),
        "flags": 0,
        "deaf": False,
        "mute": False,
        "nick": None,
    }  # Member needs flags
    if permissions is not None:
        data["permissions"] = str(permissions)
    return data


def channel_payload(cid: int) -> dict[str, Any]:
    if cid == THREAD_ID:
        return {
            "id": str(cid),
            "type": 11,
            "guild_id": str(GUILD_ID),
            "parent_id": str(CHANNEL_ID),
            "owner_id": str(ALICE_ID),
            "name": "a thread",
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now_iso(),
                "locked": False,
            },
        }
    name = {CHANNEL_ID: "general", OTHER_CHANNEL_ID: "random"}.get(cid, f"channel-{cid - EXTRA_CHANNEL_BASE}")
    return {
        "id": str(cid),
        "type": 0,
        "guild_id": str(GUILD_ID),
        "name": name,
        "position": 0,
        "permission_overwrites": [],
        "nsfw": False,
        "parent_id": None,
    }


def guild_create_payload(
    members: list[dict[str, Any]], text_channels: tuple[int, ...] = (CHANNEL_ID, OTHER_CHANNEL_ID)
) -> dict[str, Any]:
    role = {"color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
    return {
        # member_count == len(members), or discord.py asks for member chunks and waits for them
        "id": str(GUILD_ID),
        "name": "Test Guild",
        "owner_id": str(ALICE_ID),
        "member_count": len(members),
        "roles": [
            dict(role, id=str(GUILD_ID), name="@everyone", position=0, permissions=str(EVERYONE_PERMISSIONS)),
            dict(role, id=str(MEMBER_ROLE_ID), name="member", position=1, permissions="0"),
        ],
        "channels": [channel_payload(cid) for cid in text_channels],
        "threads": [channel_payload(THREAD_ID)],
        "members": members,
        "voice_states": [],
        "presences": [],
        "emojis": [],
        "stickers": [],
        "features": [],
        "large": False,
        "unavailable": False,
        "joined_at": now_iso(),
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
        "premium_tier": 0,
        "preferred_locale": "en-US",
    }


def message_payload(
    mid: int, channel_id: int | str, author: dict[str, Any], content: str, **extra: Any
) -> dict[str, Any]:
    return {
        "id": str(mid),
        "type": 0,
        "content": content,
        "channel_id": str(channel_id),
        "author": author,
        "attachments": [],
        "embeds": [],
        "mentions": [],
        "mention_roles": [],
        "mention_everyone": False,
        "pinned": False,
        "tts": False,
        "timestamp": now_iso(),
        "edited_timestamp": None,
        "flags": 0,
        "components": [],
        **extra,
    }
