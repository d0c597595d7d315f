"""Which tools a place may use: ``[[tools.allow]]`` grants by session-key pattern, user and tool name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.config import Settings, ToolGrant
from bot.tools import ToolAccess, ToolSpec
from bot.types import SessionKey

GUILD_CHANNEL = SessionKey.for_channel("discord", "g1", "c1")
GUILD_THREAD = SessionKey.for_channel("discord", "g1", "c1", "t1")
OTHER_GUILD = SessionKey.for_channel("discord", "g2", "c1")
SLACK = SessionKey.for_channel("slack", "T1", "C1")
TOOLS = [ToolSpec("add", "s", "", {}, "Adding"), ToolSpec("delete_file", "s", "", {}, "Deleting")]


def names(access: ToolAccess, key: SessionKey, user: str = "u1") -> list[str]:
    return [tool.name for tool in access.offered(key, user, TOOLS)]


def test_no_grant_means_no_tools_anywhere() -> None:
    access = ToolAccess([])
    assert names(access, GUILD_CHANNEL) == [] and names(access, SessionKey.for_dm("web", "b1")) == []


def test_grants_match_places_users_and_tool_names() -> None:
    access = ToolAccess([ToolGrant(places=["discord/ch/g1/c1*"], tools=["add"]),
                         ToolGrant(places=["slack/ch/T1/*"], users=["admin"])])
    assert names(access, GUILD_CHANNEL) == ["add"] and names(access, GUILD_THREAD) == ["add"]
    assert names(access, OTHER_GUILD) == []
    assert names(access, SLACK, "someone") == [] and names(access, SLACK, "admin") == ["add", "delete_file"]
    assert names(access, SLACK, "") == []  # a Regenerate (no asking user) passes only grants open to everyone


def test_a_place_that_is_not_a_key_pattern_is_refused_with_its_value() -> None:
    with pytest.raises(ValidationError, match="'general' is not a session-key pattern"):
        Settings.model_validate({"tools": {"allow": [{"places": ["general"]}]}})
