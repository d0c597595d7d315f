"""Tools on Discord end to end: real discord.py against tests/fake_discord/, the real engine and small model made
to call a tool with a GBNF grammar, and the real MCP server process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import ToolGrant, ToolServerSettings, ToolsSettings
from bot.conversations import ConversationManager
from bot.conversations.tools import Toolbox
from bot.tools import ToolAccess, ToolSupervisor
from bot.wording import tool_rounds_used, tool_running, tools_used
from tests.conversations.test_tools import call_or
from tests.fake_discord import CHANNEL_ID, GUILD_ID, OTHER_CHANNEL_ID, FakeDiscord
from tests.test_discord import (ALICE_DM_KEY, CHANNEL_KEY, OTHER_KEY, StartBot, dsettings, fake, start_bot,  # noqa: F401
                                stored)

SERVER = str(Path(__file__).with_name("mcp_server.py"))
SLOW_CALL = '<tool_call>\n{"name": "slow", "arguments": {"seconds": 1.5}}\n</tool_call>'


@pytest.fixture
async def tools(tmp_path: Path) -> AsyncIterator[ToolSupervisor]:
    settings = ToolsSettings(servers=[ToolServerSettings(name="test", command=sys.executable, args=[SERVER],
                                                         env={"MCP_TEST_MARK": str(tmp_path / "marks")})],
                             allow=[ToolGrant(places=[f"discord/ch/{GUILD_ID}/{CHANNEL_ID}*", "discord/dm/*"])],
                             max_rounds=1)
    async with ToolSupervisor(settings) as supervisor:
        yield supervisor


@pytest.fixture
def with_tools(manager: ConversationManager, tools: ToolSupervisor) -> ConversationManager:
    manager.use_tools(Toolbox(tools, ToolAccess(tools.settings.allow), tools.settings))
    return manager


async def test_a_tool_call_is_answered_with_a_footer_and_neither_call_nor_result_shown(
        fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot) -> None:
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
        fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot) -> None:
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
        fake: FakeDiscord, with_tools: ConversationManager, start_bot: StartBot, tmp_path: Path) -> None:
    await with_tools.set_sampling(OTHER_KEY, grammar=call_or("5", SLOW_CALL), max_tokens=40)
    await start_bot()
    mid = await fake.message_create("Wait a moment, then tell me 2 plus 3.", channel_id=OTHER_CHANNEL_ID)
    await fake.wait_for(lambda: (r := fake.replies_to(mid)) and with_tools.status(OTHER_KEY).state is None
                        and r[0]["content"] not in ("", "💭 Thinking…"), "the reply")
    history = await stored(with_tools, OTHER_KEY)
    assert await with_tools.store.tool_calls(history[-1].id) == []
    assert not (tmp_path / "marks").exists()  # the server was never asked
    assert not any(text.startswith("🔧") for texts in fake.contents.values() for text in texts)
