"""``/model`` on Slack: the list without a name, a switch by admins in a channel (anyone in a DM), a clear line
for an unknown name; the channel's next reply comes from that model, another channel keeps its own, and both
survive a restart. Real Bolt against tests/fake_slack.py, real llama.cpp as the default model and a real
recording server process as the second."""

from __future__ import annotations

from bot.config import Settings
from bot.conversations import ConversationManager
from bot.engine import Engine
from bot.store import Store
from bot.types import SessionKey
from bot.wording import answered_by, unknown_model
from tests.helper_model import DEFAULT, server, settings  # noqa: F401
from tests.recording_server import REPLY, RecordingServer
from tests.slack_helpers import ADMIN, answered, channel_key, command, fake, mention, running_bot

__all__ = ["fake"]

MODEL_ADMINS_ONLY = (
    "🚫 Only admins (`admin_user_ids` under `[slack]` in config.toml) can change a channel's model; "
    "in a DM with me it is yours to change."
)


async def test_a_channel_switched_with_slash_model_is_answered_by_that_model_and_keeps_it_after_a_restart(
    manager: ConversationManager, settings: Settings, fake, engine: Engine, store: Store, server: RecordingServer
) -> None:
    await manager.set_sampling(channel_key("C2"), grammar='root ::= "Default here."')
    async with running_bot(manager, settings, fake) as bot:
        shown = await command(fake, "/model", user="U1")
        refused = await command(fake, "/model", "helper", user="U1")
        unknown = await command(fake, "/model", "gpt-9", user=ADMIN)
        changed = await command(fake, "/model", "Helper", user=ADMIN)
        status = await command(fake, "/status", user="U1")

        question = mention("C1", "who answers?")
        await fake.push_event(question)
        [switched] = await answered(bot, fake, "C1", thread_ts=question["ts"])
        other = mention("C2", "and here?")
        await fake.push_event(other)
        [kept] = await answered(bot, fake, "C2", thread_ts=other["ts"])

    assert f"uses `{DEFAULT}`" in shown and "`helper` — the recording server" in shown
    assert refused == MODEL_ADMINS_ONLY
    assert unknown == unknown_model("gpt-9", [DEFAULT, "helper"])
    assert changed.startswith("🧠 This conversation now uses `helper` (set by <@UADMIN>)")
    assert "*Model:* helper" in status
    assert REPLY in switched.text and answered_by("helper") in switched.text
    assert server.requests()[-1]["body"]["model"] == "remote-id"
    assert "Default here." in kept.text and answered_by("helper") not in kept.text
    thread = channel_key("C1", question["ts"])
    assert [m.model for m in await manager.history(thread)] == ["", "helper"]  # the thread inherited it

    await manager.shutdown()
    restarted = ConversationManager(engine, store, settings)  # a new process, the same database
    try:
        async with running_bot(restarted, settings, fake) as bot:
            again = mention("C1", "still you?")
            await fake.push_event(again)
            [reply] = await answered(bot, fake, "C1", thread_ts=again["ts"])
            there = mention("C2", "and you?")
            await fake.push_event(there)
            [default] = await answered(bot, fake, "C2", thread_ts=there["ts"])
    finally:
        await restarted.shutdown()
    assert REPLY in reply.text and answered_by("helper") in reply.text
    assert "Default here." in default.text
    assert len(server.requests()) == 2


async def test_anyone_picks_the_model_of_their_own_dm(manager: ConversationManager, settings: Settings, fake) -> None:
    async with running_bot(manager, settings, fake):
        changed = await command(fake, "/model", "helper", user="U5", channel="D5", channel_name="directmessage")
    assert changed.startswith("🧠 This conversation now uses `helper`")
    assert await manager.model_name(SessionKey.for_dm("slack", "U5")) == "helper"
    assert await manager.model_name(channel_key("C1")) == DEFAULT
