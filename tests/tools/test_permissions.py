"""Which tools a place may use: the core's access policy matches ``[[tools.allow]]`` grants by session-key
pattern, user, role and tool name (`AccessPolicy.tools_for`); a bad grant is one line naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.access import AccessPolicy, Actor, Place
from bot.config import Settings, ToolGrant, load_settings
from bot.errors import ConfigError
from bot.tools import ToolSpec
from bot.types import SessionKey

GUILD_CHANNEL = SessionKey.for_channel("discord", "g1", "c1")
GUILD_THREAD = SessionKey.for_channel("discord", "g1", "c1", "t1")
OTHER_GUILD = SessionKey.for_channel("discord", "g2", "c1")
SLACK = SessionKey.for_channel("slack", "T1", "C1")
TOOLS = [ToolSpec("add", "s", "", {}, "Adding"), ToolSpec("delete_file", "s", "", {}, "Deleting")]


def names(policy: AccessPolicy, key: SessionKey, user: str = "u1", roles: frozenset[str] = frozenset()) -> list[str]:
    return [tool.name for tool in policy.tools_for(Actor(user, roles=roles), Place.of(key), TOOLS)]


def test_no_grant_means_no_tools_anywhere_even_for_an_admin() -> None:
    policy = AccessPolicy(admins=["boss"])
    assert names(policy, GUILD_CHANNEL) == [] and names(policy, SessionKey.for_channel("web", "b1", "c1")) == []
    assert names(policy, GUILD_CHANNEL, "boss") == []  # tools are opt-in per place, for admins too


def test_grants_match_places_users_and_tool_names() -> None:
    policy = AccessPolicy(
        tool_grants=[
            ToolGrant(places=["discord/ch/g1/c1*"], tools=["add"]),
            ToolGrant(places=["slack/ch/T1/*"], users=["admin"]),
        ]
    )
    assert names(policy, GUILD_CHANNEL) == ["add"] and names(policy, GUILD_THREAD) == ["add"]
    assert names(policy, OTHER_GUILD) == []
    assert names(policy, SLACK, "someone") == [] and names(policy, SLACK, "admin") == ["add", "delete_file"]
    assert names(policy, SLACK, "") == []  # a Regenerate (no asking user) passes only grants open to everyone


def test_a_role_grant_admits_members_with_the_role_or_the_listed_users() -> None:
    policy = AccessPolicy(
        tool_grants=[ToolGrant(places=["discord/ch/g1/*"], roles=["42"], users=["u9"], tools=["delete_*"])]
    )
    assert names(policy, GUILD_THREAD, "u1", frozenset({"42", "7"})) == ["delete_file"]
    assert names(policy, GUILD_THREAD, "u1", frozenset({"7"})) == []
    assert names(policy, GUILD_THREAD, "u9") == ["delete_file"]  # a listed user needs no role
    assert names(policy, OTHER_GUILD, "u1", frozenset({"42"})) == []  # the role, but another server
    assert names(policy, GUILD_CHANNEL, "", frozenset()) == []


def test_a_place_without_its_key_matches_no_grant() -> None:
    policy = AccessPolicy(tool_grants=[ToolGrant(places=["*"])])
    assert policy.tools_for(Actor("u1"), Place(dm=True), TOOLS) == []
    assert policy.tools_for(Actor("u1"), Place.of("web/ch/b1/c1"), TOOLS) == TOOLS


def test_a_place_that_is_not_a_key_pattern_is_refused_with_its_value() -> None:
    with pytest.raises(ValidationError, match="'general' is not a session-key pattern"):
        Settings.model_validate({"tools": {"allow": [{"places": ["general"]}]}})


def test_role_ids_may_be_toml_integers_and_a_role_name_is_one_line_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[tools.allow]]\nplaces = ["discord/ch/1/*"]\nroles = [123456789012345678]\nusers = [5]\n')
    [grant] = load_settings(config).tools.allow
    assert (grant.roles, grant.users) == (["123456789012345678"], ["5"])
    config.write_text('[[tools.allow]]\nplaces = ["discord/ch/1/*"]\nroles = ["Moderators"]\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    message = str(error.value)
    assert "tools.allow" in message and "roles" in message and "'Moderators' is not a role id" in message
    assert "\n" not in message
    config.write_text('[[tools.allow]]\nplaces = ["discord/ch/1/*"]\nrole = ["1"]\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'tools\.allow.*role'") as misspelt:
        load_settings(config)
    assert "\n" not in str(misspelt.value)
