"""The model select in Slack's assistant greeting (issue 22's last surface): it lists the configured models with
the thread's own chosen; a pick switches that assistant thread alone, its next answer comes from that model, and
the choice survives a restart; a user the policy refuses is told so and nothing changes. Real Bolt against
tests/fake_slack.py, real llama.cpp as the default model and a real recording server process as the second."""

from __future__ import annotations

from adapters.slack.assistant import GREETING
from adapters.slack.blocks import MODEL_SELECT, OPTION_TEXT_LIMIT, model_select_blocks
from bot.access import Refusal
from bot.config import Settings
from bot.conversations import ConversationManager
from bot.engine import Engine
from bot.store import Store
from bot.wording import MODEL_PICKER_LABEL, REFUSALS, answered_by, model_changed
from tests.fake_slack import FakeSlack
from tests.helper_model import DEFAULT, server, settings  # noqa: F401
from tests.recording_server import REPLY, RecordingServer
from tests.slack_helpers import answered, channel_key, fake, running_bot

__all__ = ["fake"]


def chosen(select: dict) -> str | None:
    return (select.get("initial_option") or {}).get("value")


async def ask(bot, fake: FakeSlack, thread: str, text: str, count: int) -> str:
    """Ask in assistant thread ``thread`` of D1; the text of the bot's ``count``-th message there (the answer)."""
    await fake.push_event(fake.user_message("D1", text, user="U2", thread_ts=thread))
    return (await answered(bot, fake, "D1", thread_ts=thread, count=count))[count - 1].text


async def test_the_greeting_offers_the_models_and_a_pick_switches_that_thread_alone_even_after_a_restart(
    manager: ConversationManager,
    settings: Settings,
    fake: FakeSlack,
    engine: Engine,
    store: Store,
    server: RecordingServer,
) -> None:
    async with running_bot(manager, settings, fake) as bot:
        picked, _ = await fake.start_assistant_thread(user="U2", channel="D1")
        [greeting] = await answered(bot, fake, "D1", thread_ts=picked)
        other, _ = await fake.start_assistant_thread(user="U2", channel="D1")
        [other_greeting] = await answered(bot, fake, "D1", thread_ts=other)
        await manager.set_sampling(channel_key("D1", other), grammar='root ::= "Default here."')
        shown = greeting.selects[MODEL_SELECT]  # as first posted

        await fake.choose(greeting, MODEL_SELECT, "helper", user="U2")
        said = (await answered(bot, fake, "D1", thread_ts=picked, count=2))[1].text
        switched = await ask(bot, fake, picked, "who answers?", 3)
        kept = await ask(bot, fake, other, "and here?", 2)

    assert greeting.text == GREETING and MODEL_PICKER_LABEL in str(greeting.blocks)
    assert [(o["value"], o.get("description", {}).get("text")) for o in shown["options"]][1] == (
        "helper",
        "the recording server",
    )
    assert [o["value"] for o in shown["options"]] == [DEFAULT, "helper"]
    assert chosen(shown) == DEFAULT
    assert said == model_changed("helper", "<@U2>")
    assert chosen(greeting.selects[MODEL_SELECT]) == "helper"  # redrawn with the thread's model
    assert chosen(other_greeting.selects[MODEL_SELECT]) == DEFAULT
    assert REPLY in switched and answered_by("helper") in switched
    titles = [c.args["title"] for c in fake.calls_to("assistant.threads.setTitle") if c.args["thread_ts"] == picked]
    assert titles == ["who answers?"]  # a pick before the first question leaves the titling as it was
    [request] = server.requests()
    assert request["body"]["model"] == "remote-id"
    assert request["body"]["messages"][-1]["content"] == "who answers?"
    assert "Default here." in kept and answered_by("helper") not in kept
    assert await manager.model_name(channel_key("D1", picked)) == "helper"
    assert await manager.model_name(channel_key("D1", other)) == DEFAULT

    await manager.shutdown()
    restarted = ConversationManager(engine, store, settings)  # a new process, the same database
    try:
        async with running_bot(restarted, settings, fake) as bot:
            again = await ask(bot, fake, picked, "still you?", 4)
            there = await ask(bot, fake, other, "and you?", 3)
            fresh, _ = await fake.start_assistant_thread(user="U2", channel="D1")
            [new_greeting] = await answered(bot, fake, "D1", thread_ts=fresh)
    finally:
        await restarted.shutdown()
    assert REPLY in again and answered_by("helper") in again
    assert "Default here." in there and answered_by("helper") not in there
    assert len(server.requests()) == 2
    assert chosen(new_greeting.selects[MODEL_SELECT]) == DEFAULT  # a new thread starts on the default


async def test_a_user_the_policy_refuses_is_told_so_and_the_thread_keeps_its_model(
    manager: ConversationManager, settings: Settings, fake: FakeSlack, server: RecordingServer
) -> None:
    async with running_bot(manager, settings, fake, allowed_user_ids=["U2"]) as bot:
        thread, _ = await fake.start_assistant_thread(user="U2", channel="D1")
        [greeting] = await answered(bot, fake, "D1", thread_ts=thread)
    # The allow-list changed (new config, restarted) and leaves U2 out; their open greeting still has the select.
    async with running_bot(manager, settings, fake, allowed_user_ids=["U1"]) as bot:
        await fake.choose(greeting, MODEL_SELECT, "helper", user="U2")
        said = (await answered(bot, fake, "D1", thread_ts=thread, count=2))[1].text

    assert said == REFUSALS[Refusal.NOT_LISTED]
    assert await manager.model_name(channel_key("D1", thread)) == DEFAULT
    assert chosen(greeting.selects[MODEL_SELECT]) == DEFAULT
    assert server.requests() == []


def test_the_select_fits_block_kit_and_shows_no_choice_for_a_model_no_longer_configured() -> None:
    long = "a model described at more length than a select option may show, which is seventy-five characters"
    blocks = model_select_blocks("Hi", [("small", ""), ("big", long)], "gone")
    select = blocks[-1]["accessory"]
    assert "initial_option" not in select  # Slack refuses an initial option that is not among the options
    assert "description" not in select["options"][0]
    description = select["options"][1]["description"]["text"]
    assert len(description) == OPTION_TEXT_LIMIT and description.endswith("…")
    assert chosen(model_select_blocks("Hi", [("small", ""), ("big", long)], "big")[-1]["accessory"]) == "big"
