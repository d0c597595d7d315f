"""The one access policy every adapter asks (`bot.access`): allow-lists, admins, DMs, the rate limit with its
admin bypass, who may change a channel's settings, and the words of each refusal."""

from __future__ import annotations

from bot.access import AccessPolicy, Action, Actor, Decision, Place, Refusal
from bot.ratelimit import RateLimiter
from bot.types import SessionKey
from bot.wording import refusal_text

CHANNEL = Place(dm=False, server="G1", channels=frozenset({"C1"}))
THREAD = Place.of(SessionKey.for_channel("discord", "G1", "C1", "T1"))
DM = Place.of(SessionKey.for_dm("discord", "U1"))


async def test_empty_lists_let_everyone_in_everywhere() -> None:
    policy = AccessPolicy()
    for place in (CHANNEL, THREAD, DM):
        assert (await policy.check(Actor("anyone"), place)).allowed


async def test_server_channel_and_user_lists_each_refuse_in_their_own_words() -> None:
    policy = AccessPolicy(servers=[1], channels=["C1"], users=["U1"], roles=["R1"])
    assert (
        await policy.check(Actor("U1"), Place(dm=False, server="G9", channels=frozenset({"C1"})))
    ).refusal is Refusal.SERVER_NOT_ALLOWED
    policy = AccessPolicy(channels=["C1"], users=["U1"], roles=["R1"])
    assert (
        await policy.check(Actor("U1"), Place(dm=False, channels=frozenset({"C9"})))
    ).refusal is Refusal.CHANNEL_NOT_ALLOWED
    assert (await policy.check(Actor("U2"), CHANNEL)).refusal is Refusal.NOT_LISTED
    assert (await policy.check(Actor("U2", roles=frozenset({"R1"})), CHANNEL)).allowed  # listed by a role
    assert (await policy.check(Actor("U1"), THREAD)).allowed  # a thread of an allowed channel is allowed
    assert (
        refusal_text(Decision(Refusal.NOT_LISTED))
        == "🚫 Sorry, you're not on the list of people allowed to use this bot."
    )
    assert refusal_text(Decision(Refusal.CHANNEL_NOT_ALLOWED)) == "🚫 I'm not enabled in this channel."


async def test_dms_follow_the_switch_and_the_lists_and_ask_the_platform_only_when_they_must() -> None:
    asked: list[str] = []

    async def member() -> bool:
        asked.append("lookup")
        return True

    off = AccessPolicy(dms_enabled=False)
    decision = await off.check(Actor("U1"), DM)
    assert decision.refusal is Refusal.DMS_OFF and "Direct messages are turned off" in refusal_text(decision)

    only_users = AccessPolicy(users=["U1"])
    assert (await only_users.check(Actor("U1", member_elsewhere=member), DM)).allowed
    assert (await only_users.check(Actor("U2", member_elsewhere=member), DM)).refusal is Refusal.NOT_LISTED
    assert asked == []  # a user list alone needs no lookup

    by_role = AccessPolicy(roles=["R1"])
    assert (await by_role.check(Actor("U2", member_elsewhere=member), DM)).allowed and asked == ["lookup"]

    async def stranger() -> bool:
        return False

    refused = await by_role.check(Actor("U3", member_elsewhere=stranger), DM)
    assert refused.refusal is Refusal.DM_NOT_ALLOWED
    assert "direct messages only from people allowed to use me in a server" in refusal_text(refused)


async def test_admins_pass_every_list_and_the_rate_limit_which_counts_only_new_answers() -> None:
    now = [0.0]
    policy = AccessPolicy(
        channels=["C9"], users=["U9"], admins=["A1"], dms_enabled=False, limiter=RateLimiter(1, clock=lambda: now[0])
    )
    for place in (CHANNEL, DM):
        for _ in range(3):
            assert (await policy.check(Actor("A1"), place, Action.ASK)).allowed

    open_policy = AccessPolicy(limiter=RateLimiter(1, clock=lambda: now[0]))
    assert (await open_policy.check(Actor("U1"), CHANNEL, Action.USE)).allowed
    assert (await open_policy.check(Actor("U1"), CHANNEL, Action.ASK)).allowed
    assert (await open_policy.check(Actor("U1"), CHANNEL, Action.USE)).allowed  # /status costs nothing
    now[0] = 20.5
    too_fast = await open_policy.check(Actor("U1"), CHANNEL, Action.ASK)
    assert too_fast.refusal is Refusal.TOO_FAST
    assert refusal_text(too_fast) == "⏳ Easy there! You can send 1 messages a minute; try again in 40 s."
    assert (await open_policy.check(Actor("U2"), CHANNEL, Action.ASK)).allowed  # per user


async def test_a_channels_settings_are_for_admins_and_a_dms_for_its_user() -> None:
    policy = AccessPolicy(admins=["A1"])
    refused = await policy.check(Actor("U1"), CHANNEL, Action.SET_SYSTEM_PROMPT)
    assert refused.refusal is Refusal.ADMINS_ONLY
    assert refusal_text(refused, admins="people with the Manage Server permission") == (
        "🚫 Only people with the Manage Server permission can change a channel's system prompt; in a DM with me "
        "it is yours to change."
    )
    sampling = await policy.check(Actor("U1"), THREAD, Action.SET_SAMPLING)
    assert refusal_text(sampling).endswith("a channel's settings; in a DM with me they are yours to change.")
    assert (await policy.check(Actor("U1"), DM, Action.SET_SAMPLING)).allowed
    assert (await policy.check(Actor("A1"), CHANNEL, Action.SET_SAMPLING)).allowed
    assert (await policy.check(Actor("U1", manages_place=True), CHANNEL, Action.SET_SYSTEM_PROMPT)).allowed
    # /model follows the same rule, in words of its own.
    model = await policy.check(Actor("U1"), THREAD, Action.SET_MODEL)
    assert refusal_text(model).endswith("a channel's model; in a DM with me it is yours to change.")
    assert (await policy.check(Actor("U1"), DM, Action.SET_MODEL)).allowed
    assert (await policy.check(Actor("U1", manages_place=True), CHANNEL, Action.SET_MODEL)).allowed
    # The lists come first: someone refused outright hears that, not "admins only".
    listed = AccessPolicy(users=["U2"])
    assert (await listed.check(Actor("U1"), CHANNEL, Action.SET_SAMPLING)).refusal is Refusal.NOT_LISTED


async def test_only_the_asker_or_an_admin_may_approve_a_tool_call() -> None:
    policy = AccessPolicy(admins=["boss"], users=["asker", "other"])
    channel = Place(dm=False, server="s", channels=frozenset({"c"}))
    check = policy.check
    assert (await check(Actor("asker"), channel, Action.APPROVE_TOOL, owner="asker")).allowed
    assert (await check(Actor("other"), channel, Action.APPROVE_TOOL, owner="asker")).refusal is Refusal.NOT_YOURS
    assert (await check(Actor("boss"), channel, Action.APPROVE_TOOL, owner="asker")).allowed
    assert (await check(Actor("other", manages_place=True), channel, Action.APPROVE_TOOL, owner="asker")).allowed
    # No known asker (a Regenerate): only an admin; and the lists still come first.
    assert (await check(Actor("asker"), channel, Action.APPROVE_TOOL, owner="")).refusal is Refusal.NOT_YOURS
    assert (
        await check(Actor("stranger"), channel, Action.APPROVE_TOOL, owner="stranger")
    ).refusal is Refusal.NOT_LISTED
    assert "Only the person who asked" in refusal_text(Decision(Refusal.NOT_YOURS, Action.APPROVE_TOOL))
