"""Tools on Discord end to end: real discord.py against tests/fake_discord/, the real engine and small model made
to call a tool with a GBNF grammar, and the real MCP server process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.access import AccessPolicy, Refusal
from bot.config import ToolGrant, ToolOptions, ToolServerSettings, ToolsSettings
from bot.conversations import ConversationManager
from bot.conversations.tools import Toolbox
from bot.tools import ToolSupervisor
from bot.wording import (
    APPROVED,
    DENIED,
    REFUSALS,
    TOOL_DENIED_RESULT,
    TOOL_TIMED_OUT_RESULT,
    tool_approval_timed_out,
    tool_asking,
    tool_denied,
    tool_rounds_used,
    tool_running,
    tools_used,
)
from tests.conversations.test_tools import call_or
from tests.fake_discord import (
    ALICE_ID,
    BOB_ID,
    CHANNEL_ID,
    EPHEMERAL_FLAG,
    GUILD_ID,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    OTHER_CHANNEL_ID,
    FakeDiscord,
    FakeInteraction,
)
from tests.test_discord import ALICE_DM_KEY, CHANNEL_KEY, OTHER_KEY, StartBot, dsettings, fake, start_bot, stored  # noqa: F401

SERVER = str(Path(__file__).with_name("mcp_server.py"))
PINGS = f"@everyone @here <@{BOB_ID}> <@&{GUILD_ID}>"
SLOW_CALL = '<tool_call>\n{"name": "slow", "arguments": {"seconds": 1.5}}\n</tool_call>'


@pytest.fixture
async def tools(tmp_path: Path) -> AsyncIterator[ToolSupervisor]:
    settings = ToolsSettings(
        servers=[
            ToolServerSettings(
                name="test",
                command=sys.executable,
                args=[SERVER],
                env={"MCP_TEST_MARK": str(tmp_path / "marks"), "MCP_TEST_PINGS": PINGS},
            )
        ],
        allow=[ToolGrant(places=[f"discord/ch/{GUILD_ID}/{CHANNEL_ID}*", "discord/dm/*"])],
        max_rounds=1,
    )
    async with ToolSupervisor(settings) as supervisor:
        yield supervisor


@pytest.fixture
def with_tools(manager: ConversationManager, tools: ToolSupervisor) -> ConversationManager:
    manager.use_tools(Toolbox(tools, AccessPolicy(tool_grants=tools.settings.allow), tools.settings))
    return manager


async def test_a_tool_call_is_answered_with_a_footer_and_neither_call_nor_result_shown(
    fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot
) -> None:
    await with_tools.set_sampling(ALICE_DM_KEY, grammar=call_or("5"), max_tokens=40)
    await start_bot()
    mid = await fake.message_create("What is 2 plus 3?", dm=True)
    reply = await fake.final_reply(mid, f"5\n\n{tools_used(['Adding numbers'])}")
    assert not any("<tool_call>" in text for text in fake.contents[int(reply["id"])])
    history = await stored(with_tools, ALICE_DM_KEY)
    assert (history[-1].content, history[-1].status) == ("5", "complete")
    [call] = await with_tools.store.tool_calls(history[-1].id)
    assert (call.tool, call.arguments, call.result) == ("add", '{"a": 2, "b": 3}', "5")


async def test_a_slow_tool_shows_its_status_in_the_channel(
    fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot
) -> None:
    await with_tools.set_sampling(CHANNEL_KEY, grammar=call_or("5", SLOW_CALL), max_tokens=40)
    await start_bot()
    mid = await fake.message_create("Wait a moment, then tell me 2 plus 3.")
    # The small model, held to "call or say 5", asks for the tool again in the round without tools: a clear line.
    reply = await fake.final_reply(mid, f"{tool_rounds_used(1)}\n{tools_used(['Sleeping'])}")
    shown = fake.contents[int(reply["id"])]
    assert tool_running("Sleeping") in shown, shown  # the 🔧 status, while the slow tool ran
    assert not any("<tool_call>" in text or "slept" in text for text in shown)  # neither the call nor the result
    history = await stored(with_tools, CHANNEL_KEY)
    [call] = await with_tools.store.tool_calls(history[-1].id)
    assert (call.tool, call.result) == ("slow", "slept 1.5")
    assert fake.pinging_writes() == []


async def test_a_channel_without_a_grant_never_offers_tools(
    fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot, tmp_path: Path
) -> None:
    await with_tools.set_sampling(OTHER_KEY, grammar=call_or("5", SLOW_CALL), max_tokens=40)
    await start_bot()
    mid = await fake.message_create("Wait a moment, then tell me 2 plus 3.", channel_id=OTHER_CHANNEL_ID)
    await fake.wait_for(
        lambda: (
            (r := fake.replies_to(mid))
            and with_tools.status(OTHER_KEY).state is None
            and r[0]["content"] not in ("", "💭 Thinking…")
        ),
        "the reply",
    )
    history = await stored(with_tools, OTHER_KEY)
    assert await with_tools.store.tool_calls(history[-1].id) == []
    assert not (tmp_path / "marks").exists()  # the server was never asked
    assert not any(text.startswith("🔧") for texts in fake.contents.values() for text in texts)


async def test_a_role_grant_offers_tools_to_members_with_the_role_only(
    fake: FakeDiscord, manager: ConversationManager, tools: ToolSupervisor, start_bot: StartBot, tmp_path: Path
) -> None:
    grants = [ToolGrant(places=[f"discord/ch/{GUILD_ID}/*"], roles=[str(MEMBER_ROLE_ID)], tools=["slow"])]
    manager.use_tools(Toolbox(tools, AccessPolicy(tool_grants=grants), tools.settings))
    for key in (CHANNEL_KEY, OTHER_KEY):  # two conversations: neither reply is seen while the other is written
        await manager.set_sampling(key, grammar=call_or("5", SLOW_CALL), max_tokens=40)
    await start_bot()

    mid = await fake.message_create(
        "Wait a moment, then tell me 2 plus 3.",
        author_id=MALLORY_ID,  # no role
        channel_id=OTHER_CHANNEL_ID,
    )
    await fake.wait_for(
        lambda: (
            (r := fake.replies_to(mid))
            and manager.status(OTHER_KEY).state is None
            and r[0]["content"] not in ("", "💭 Thinking…")
        ),
        "Mallory's reply",
    )
    history = await stored(manager, OTHER_KEY)
    assert await manager.store.tool_calls(history[-1].id) == []
    assert not (tmp_path / "marks").exists()  # the tool was never offered, so never called
    assert not any(
        text.startswith("🔧") or tools_used(["Sleeping"]) in text for texts in fake.contents.values() for text in texts
    )

    mid = await fake.message_create("Wait a moment, then tell me 2 plus 3.", author_id=BOB_ID)  # the member role
    reply = await fake.final_reply(mid, f"{tool_rounds_used(1)}\n{tools_used(['Sleeping'])}")
    assert tool_running("Sleeping") in fake.contents[int(reply["id"])]
    history = await stored(manager, CHANNEL_KEY)
    [call] = await manager.store.tool_calls(history[-1].id)
    assert (call.tool, call.result) == ("slow", "slept 1.5")
    assert (tmp_path / "marks").exists()


# -- approval: Run / Deny before a confirm = true tool runs -------------------------------------------------------

DELETE_CALL = '<tool_call>\n{"name": "delete_file", "arguments": {"path": "notes.txt"}}\n</tool_call>'


@pytest.fixture
async def confirm_tools(tmp_path: Path) -> AsyncIterator[ToolSupervisor]:
    settings = ToolsSettings(
        servers=[
            ToolServerSettings(
                name="test", command=sys.executable, args=[SERVER], tools={"delete_file": ToolOptions(confirm=True)}
            )
        ],
        allow=[ToolGrant(places=[f"discord/ch/{GUILD_ID}/{CHANNEL_ID}*"])],
        max_rounds=1,
        approval_timeout=1.5,
    )
    async with ToolSupervisor(settings) as supervisor:
        yield supervisor


@pytest.fixture
async def asking(manager: ConversationManager, confirm_tools: ToolSupervisor) -> ConversationManager:
    manager.use_tools(
        Toolbox(confirm_tools, AccessPolicy(tool_grants=confirm_tools.settings.allow), confirm_tools.settings)
    )
    await manager.set_sampling(CHANNEL_KEY, grammar=call_or("done", DELETE_CALL), max_tokens=40)
    return manager


async def _asking_reply(fake: FakeDiscord, question: int) -> dict[str, Any]:
    """The reply once it shows Run / Deny."""
    return await fake.wait_for(
        lambda: (r := fake.replies_to(question)) and "Run" in fake.buttons(int(r[0]["id"])) and r[0],
        "the Run / Deny buttons",
    )


async def _finished(fake: FakeDiscord, manager: ConversationManager, question: int) -> dict[str, Any]:
    return await fake.wait_for(
        lambda: (
            (r := fake.replies_to(question))
            and manager.status(CHANNEL_KEY).state is None
            and "Regenerate" in fake.buttons(int(r[0]["id"]))
            and r[0]
        ),
        "the finished reply",
    )


async def _ephemeral(fake: FakeDiscord, inter: FakeInteraction) -> str:
    await fake.wait_for(lambda: inter.original_id, "the ephemeral answer")
    [answer] = fake.interaction_messages(inter)
    assert answer["flags"] & EPHEMERAL_FLAG, answer
    return str(answer["content"])


async def test_a_confirm_tool_waits_for_run_and_only_the_asker_may_press_it(
    fake: FakeDiscord, asking: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    question = await fake.message_create("Delete notes.txt", author_id=BOB_ID)
    reply = await _asking_reply(fake, question)
    assert reply["content"] == tool_asking("Deleting a file")
    assert sorted(fake.buttons(int(reply["id"]))) == ["Deny", "Run", "Stop"]
    assert asking.approvals.waiting(str(CHANNEL_KEY))[0].owner == str(BOB_ID)

    other = await fake.press(int(reply["id"]), "Run", user_id=MALLORY_ID)  # not hers, and no admin
    assert await _ephemeral(fake, other) == REFUSALS[Refusal.NOT_YOURS]
    assert asking.approvals.waiting(str(CHANNEL_KEY))  # still waiting

    run = await fake.press(int(reply["id"]), "Run", user_id=BOB_ID)
    assert await _ephemeral(fake, run) == APPROVED
    done = await _finished(fake, asking, question)
    assert tools_used(["Deleting a file"]) in done["content"]
    history = await stored(asking, CHANNEL_KEY)
    [call] = await asking.store.tool_calls(history[-1].id)
    assert (call.tool, call.result, call.is_error) == ("delete_file", "deleted notes.txt", False)
    stale = await fake.press(int(reply["id"]), "Tool details", user_id=BOB_ID)  # the details of what ran
    details = await _ephemeral(fake, stale)
    assert "delete_file" in details and '"path": "notes.txt"' in details and "deleted notes.txt" in details
    assert "deleted notes.txt" not in done["content"]  # never shown raw
    assert fake.pinging_writes() == []


async def test_an_admin_may_deny_someone_elses_call_and_the_model_is_told(
    fake: FakeDiscord, asking: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    question = await fake.message_create("Delete notes.txt", author_id=BOB_ID)
    reply = await _asking_reply(fake, question)
    deny = await fake.press(int(reply["id"]), "Deny", user_id=ALICE_ID)  # she owns the server: an admin
    assert await _ephemeral(fake, deny) == DENIED
    done = await _finished(fake, asking, question)
    assert tool_denied("Deleting a file") in done["content"]
    history = await stored(asking, CHANNEL_KEY)
    [call] = await asking.store.tool_calls(history[-1].id)
    assert (call.tool, call.result, call.is_error) == ("delete_file", TOOL_DENIED_RESULT, True)
    late = await fake.press(int(reply["id"]), "Tool details", user_id=BOB_ID)
    assert TOOL_DENIED_RESULT in await _ephemeral(fake, late)


async def test_an_unanswered_approval_times_out_with_a_clear_line(
    fake: FakeDiscord, asking: ConversationManager, start_bot: StartBot
) -> None:
    await start_bot()
    question = await fake.message_create("Delete notes.txt", author_id=BOB_ID)
    reply = await _asking_reply(fake, question)
    done = await _finished(fake, asking, question)
    assert tool_approval_timed_out("Deleting a file", 1.5) in done["content"]
    assert "Run" not in fake.buttons(int(done["id"]))
    history = await stored(asking, CHANNEL_KEY)
    [call] = await asking.store.tool_calls(history[-1].id)
    assert (call.result, call.is_error) == (TOOL_TIMED_OUT_RESULT, True)
    # The buttons of a request that ended answer clearly, if a client still shows them.
    assert asking.approvals.waiting(str(CHANNEL_KEY)) == []
    gone = await fake.press(int(reply["id"]), "Tool details", user_id=BOB_ID)
    assert TOOL_TIMED_OUT_RESULT in await _ephemeral(fake, gone)


async def test_a_place_whose_target_cannot_ask_is_not_offered_confirm_tools(asking: ConversationManager) -> None:
    assert [t.name for t in asking.offered_tools(CHANNEL_KEY, str(BOB_ID))].count("delete_file") == 0
    assert "delete_file" in [t.name for t in asking.offered_tools(CHANNEL_KEY, str(BOB_ID), can_ask=True)]


async def test_a_result_full_of_mentions_is_expanded_without_pinging_anyone(
    fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot
) -> None:
    read = '<tool_call>\n{"name": "env", "arguments": {"name": "MCP_TEST_PINGS"}}\n</tool_call>'
    await with_tools.set_sampling(CHANNEL_KEY, grammar=call_or("done", read), max_tokens=40)
    await start_bot()
    question = await fake.message_create("Read the variable.")
    done = await _finished(fake, with_tools, question)
    assert PINGS not in done["content"] and "Tool details" in fake.buttons(int(done["id"]))
    details = await _ephemeral(fake, await fake.press(int(done["id"]), "Tool details", user_id=BOB_ID))
    assert PINGS in details  # shown as it is, to the presser alone…
    assert fake.pinging_writes() == []  # …and no message the bot wrote could ping anyone
