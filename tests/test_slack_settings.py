"""/settings on Slack: shows and sets a conversation's temperature, max_tokens and top_p within the config's
bounds; threads use their channel's. Plus the pure parser of its ``name=value`` line."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.slack.commands import parse_settings
from bot.tunables import tunable
from bot.types import SessionKey
from bot.wording import LENGTH_NOTE
from tests.slack_helpers import ADMIN, answered, channel_key, command, fake, mention, running_bot

__all__ = ["fake"]

ADMINS_ONLY = (
    "🚫 Only admins (`admin_user_ids` under `[slack]` in config.toml) can change a channel's system "
    "prompt; in a DM with me it is yours to change."
)
SETTINGS_ADMINS_ONLY = (
    "🚫 Only admins (`admin_user_ids` under `[slack]` in config.toml) can change a channel's "
    "settings; in a DM with me they are yours to change."
)
SETTINGS = {"temperature": float, "max_tokens": int, "top_p": float}


async def test_settings_are_shown_set_by_admins_and_used_by_the_channels_threads(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= (" word"){20}', repeat_penalty=1.0)
    async with running_bot(manager, settings, fake) as bot:
        shown = await command(fake, "/settings", user="U1")
        refused = await command(fake, "/settings", "temperature=0.2", user="U1")
        out_of_bounds = await command(fake, "/settings", "temperature=9", user=ADMIN)
        too_long = await command(fake, "/settings", "max_tokens=5000", user=ADMIN)
        nonsense = await command(fake, "/settings", "temperature=warm", user=ADMIN)
        changed = await command(fake, "/settings", "temperature=0.2, max_tokens=4 top_p=0.5", user=ADMIN)

        question = mention("C1", "count words")
        await fake.push_event(question)
        [reply] = await answered(bot, fake, "C1", thread_ts=question["ts"])

    assert "`temperature` = 0  (0 to 5)" in shown and "`max_tokens` = 24  (1 to 2047)" in shown
    assert "`top_p` = 0.95  (above 0, up to 1)" in shown
    assert refused == SETTINGS_ADMINS_ONLY
    assert out_of_bounds.startswith("⚠️ Not changed: `temperature`: input should be less than or equal to 5")
    assert too_long.startswith("⚠️ Not changed: max_tokens must be below the 2048-token context window")
    assert nonsense.startswith("⚠️ Not changed: `temperature` needs a number, not `warm`")
    assert changed.startswith("✅ Set.") and "`max_tokens` = 4 " in changed and "`top_p` = 0.5 " in changed
    thread = await manager.sampling(channel_key("C1", question["ts"]))
    assert (thread.temperature, thread.max_tokens, thread.top_p) == (0.2, 4, 0.5)  # inherited from the channel
    assert LENGTH_NOTE in reply.text  # the reply in the thread was cut at the channel's 4 tokens


async def test_anyone_sets_their_own_dm_settings(manager, settings, fake):
    async with running_bot(manager, settings, fake):
        changed = await command(fake, "/settings", "top_p=0.8", user="U5", channel="D5", channel_name="directmessage")

    assert changed.startswith("✅ Set. *Settings for your DM with me:*")
    assert (await manager.sampling(SessionKey.for_dm("slack", "U5"))).top_p == 0.8
    assert (await manager.sampling(channel_key("D5"))).top_p == settings.sampling.top_p


async def test_anyone_sets_their_own_dm_system_prompt_as_any_other_setting(manager, settings, fake):
    # One rule for /system and /settings (bot.access): a DM is the user's own, a channel needs an admin.
    async with running_bot(manager, settings, fake):
        mine = await command(
            fake, "/system", "Answer in French.", user="U5", channel="D5", channel_name="directmessage"
        )
        refused = await command(fake, "/system", "Answer in French.", user="U5", channel="C1")

    assert mine.startswith("✅") and refused == ADMINS_ONLY
    assert await manager.system_prompt(SessionKey.for_dm("slack", "U5")) == "Answer in French."
    assert await manager.system_prompt(channel_key("C1")) == settings.conversation.system_prompt


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("temperature=0.3", {"temperature": 0.3}),
        ("Max_Tokens = 200, top_p=1", {"max_tokens": 200, "top_p": 1.0}),
    ],
)
def test_parse_settings_reads_name_value_pairs(line: str, expected: dict[str, float]) -> None:
    assert parse_settings(line) == expected


@pytest.mark.parametrize(
    "line", ["", "temperature", "temperature=0.3 please", "seed=3", "max_tokens=2.5", "top_p=nan", "temperature=inf"]
)
def test_parse_settings_refuses_anything_else(line: str) -> None:
    with pytest.raises(ValueError):
        parse_settings(line)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_settings_of_any_text_is_known_finite_numbers_or_a_reason(line: str) -> None:
    try:
        changes = parse_settings(line)
    except ValueError as exc:
        assert str(exc)
        return
    assert changes and set(changes) <= set(SETTINGS)
    assert all(isinstance(value, SETTINGS[name]) and math.isfinite(value) for name, value in changes.items())
    assert all(tunable(name) is not None for name in changes)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(SETTINGS)), st.integers(0, 5000), min_size=1))
def test_parse_settings_reads_back_what_was_written(values: dict[str, int]) -> None:
    line = " ".join(f"{name}={value}" for name, value in values.items())
    assert parse_settings(line) == values
