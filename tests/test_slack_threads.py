"""Slack threads as conversations, and speakers named in them: the real slack-bolt app against the fake Slack."""

from __future__ import annotations

from bot.store import Status
from tests.fake_slack import BOT_USER_ID
from tests.slack_helpers import answered, channel_key, fake, mention, running_bot, settled

__all__ = ["fake"]


async def test_a_follow_up_in_the_reply_thread_continues_the_conversation_without_a_mention(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= " Noted."', max_tokens=8)
    async with running_bot(manager, settings, fake) as bot:
        question = mention("C1", "My favourite colour is teal.")
        await fake.push_event(question)
        await answered(bot, fake, "C1", thread_ts=question["ts"])

        follow_up = fake.user_message("C1", "What is my favourite colour?", thread_ts=question["ts"])
        await fake.wait_ack(await fake.push_event(follow_up))
        await answered(bot, fake, "C1", thread_ts=question["ts"], count=2)

        # Said in the thread again, but with a mention: Slack sends it twice (app_mention and message).
        again = fake.user_message("C1", f"<@{BOT_USER_ID}> and my name?", thread_ts=question["ts"])
        for envelope in [await fake.push_event({**again, "type": "app_mention"}), await fake.push_event(again)]:
            await fake.wait_ack(envelope)
        await answered(bot, fake, "C1", thread_ts=question["ts"], count=3)

    thread = await manager.history(channel_key("C1", question["ts"]))
    assert [(m.role, m.content) for m in thread if m.role == "user"] == [
        ("user", "My favourite colour is teal."),
        ("user", "What is my favourite colour?"),
        ("user", "and my name?"),
    ]
    assert [m.status for m in thread if m.role == "assistant"] == [Status.COMPLETE] * 3
    assert len(fake.messages_in("C1", question["ts"])) == 3
    assert await manager.history(channel_key("C1")) == []  # the channel's own conversation was not touched


async def test_threads_the_bot_was_never_part_of_and_plain_channel_messages_are_ignored(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        others = fake.user_message("C1", "lunch?", user="U2")
        in_their_thread = fake.user_message("C1", "sure", user="U3", thread_ts=others["ts"])
        for event in (others, in_their_thread):
            await fake.wait_ack(await fake.push_event(event))
        await settled(bot)

    assert [c.method for c in fake.calls if c.method.startswith("chat.")] == []
    assert await manager.history(channel_key("C1", others["ts"])) == []


async def test_a_mention_inside_someone_elses_thread_makes_the_bot_follow_that_thread(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= " Sure."', max_tokens=8)
    async with running_bot(manager, settings, fake) as bot:
        parent = fake.user_message("C1", "release plan", user="U2")
        asked = mention("C1", "can you help here?", thread_ts=parent["ts"])
        await fake.push_event(asked)
        await answered(bot, fake, "C1", thread_ts=parent["ts"])
        await fake.push_event(fake.user_message("C1", "thanks, and step two?", user="U2", thread_ts=parent["ts"]))
        await answered(bot, fake, "C1", thread_ts=parent["ts"], count=2)

    users = [m.content for m in await manager.history(channel_key("C1", parent["ts"])) if m.role == "user"]
    assert users == ["can you help here?", "thanks, and step two?"]


async def test_someone_the_bot_does_not_answer_is_ignored_quietly_in_a_followed_thread(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar='root ::= " Hi."', max_tokens=8)
    async with running_bot(manager, settings, fake, allowed_user_ids=["U1"]) as bot:
        question = mention("C1", "hello")
        await fake.push_event(question)
        await answered(bot, fake, "C1", thread_ts=question["ts"])
        await fake.wait_ack(
            await fake.push_event(fake.user_message("C1", "me too", user="U9", thread_ts=question["ts"]))
        )
        await settled(bot)

    assert fake.calls_to("chat.postEphemeral") == []  # not addressed to the bot: no refusal either
    assert [m.content for m in await manager.history(channel_key("C1", question["ts"])) if m.role == "user"] == [
        "hello"
    ]


async def test_each_turn_carries_the_speakers_display_name(manager, settings, fake):
    fake.add_user("U1", "Ana", "Ana Lima")
    fake.add_user("U2", "", "Bo Berg")  # no display name set: the real name is used
    await manager.set_sampling(channel_key("C1"), grammar='root ::= " Hello."', max_tokens=8)
    async with running_bot(manager, settings, fake) as bot:
        question = mention("C1", "hi, I'm new")
        await fake.push_event(question)
        await answered(bot, fake, "C1", thread_ts=question["ts"])
        from_profile = fake.user_message("C1", "me too", user="U3", thread_ts=question["ts"])
        from_profile["user_profile"] = {"display_name": "Cy", "real_name": "Cyrus"}  # Slack sometimes sends it
        await fake.push_event(fake.user_message("C1", "welcome!", user="U2", thread_ts=question["ts"]))
        await answered(bot, fake, "C1", thread_ts=question["ts"], count=2)
        await fake.push_event(from_profile)
        await answered(bot, fake, "C1", thread_ts=question["ts"], count=3)
        await fake.push_event(fake.user_message("C1", "one more", user="U1", thread_ts=question["ts"]))
        await answered(bot, fake, "C1", thread_ts=question["ts"], count=4)

    history = await manager.history(channel_key("C1", question["ts"]))
    assert [m.author_name for m in history if m.role == "user"] == ["Ana", "Bo Berg", "Cy", "Ana"]
    looked_up = [c.args["user"] for c in fake.calls_to("users.info")]
    assert sorted(looked_up) == ["U1", "U2"]  # once per person (cached), and never for a profile in the event
