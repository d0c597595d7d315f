"""Tools on Slack end to end: real slack-bolt against tests/fake_slack.py, the real engine and small model made
to call a tool with a GBNF grammar, and the real MCP server process: Run / Deny (Block Kit buttons) and
Tool details."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.slack.blocks import DENY, REGENERATE, RUN, STOP, TOOL_DETAILS
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
    tool_approval_timed_out,
    tool_asking,
    tool_denied,
    tools_used,
)
from tests.conversations.test_tools import call_or
from tests.fake_slack import FakeMessage, FakeSlack
from tests.slack_helpers import (
    ACK_DEADLINE_SECONDS,
    ADMIN,
    REPLY_TIMEOUT_SECONDS,
    answered,
    channel_key,
    fake,
    mention,
    replies,
    running_bot,
)

__all__ = ["fake"]

SERVER = str(Path(__file__).with_name("mcp_server.py"))
DELETE_CALL = '<tool_call>\n{"name": "delete_file", "arguments": {"path": "notes.txt"}}\n</tool_call>'


@pytest.fixture
async def asking(manager: ConversationManager, tmp_path: Path) -> AsyncIterator[ConversationManager]:
    settings = ToolsSettings(
        servers=[
            ToolServerSettings(
                name="test", command=sys.executable, args=[SERVER], tools={"delete_file": ToolOptions(confirm=True)}
            )
        ],
        allow=[ToolGrant(places=["slack/ch/*"])],
        max_rounds=1,
        approval_timeout=1.5,
    )
    async with ToolSupervisor(settings) as supervisor:
        manager.use_tools(Toolbox(supervisor, AccessPolicy(tool_grants=settings.allow), settings))
        await manager.set_sampling(channel_key("C1"), grammar=call_or("done", DELETE_CALL), max_tokens=40)
        yield manager


async def press(fake: FakeSlack, message: FakeMessage, action_id: str, user: str) -> None:
    pressed_at = time.monotonic()
    await fake.wait_ack(await fake.press(message, action_id, user=user), timeout=10)
    assert time.monotonic() - pressed_at < ACK_DEADLINE_SECONDS


async def asking_message(fake: FakeSlack, thread: str) -> FakeMessage:
    return await fake.wait_for(
        lambda: next((m for m in fake.messages_in("C1", thread) if RUN in m.buttons), None),
        timeout=REPLY_TIMEOUT_SECONDS,
        what="the Run / Deny buttons",
    )


async def test_run_by_the_asker_after_another_users_press_is_refused(
    asking: ConversationManager, settings, fake: FakeSlack
) -> None:
    async with running_bot(asking, settings, fake) as bot:
        question = mention("C1", "delete notes.txt", user="U1")
        await fake.push_event(question)
        waiting = await asking_message(fake, question["ts"])
        assert tool_asking("Deleting a file") in waiting.text
        assert set(waiting.buttons) == {RUN, DENY, STOP}
        await press(fake, waiting, RUN, user="U2")
        await fake.wait_for(lambda: fake.ephemeral_texts("U2"), what="the refusal")
        assert fake.ephemeral_texts("U2") == [REFUSALS[Refusal.NOT_YOURS]]
        assert asking.approvals.waiting(str(channel_key("C1", question["ts"])))  # still waiting
        await press(fake, waiting, RUN, user="U1")
        [reply] = await answered(bot, fake, "C1", thread_ts=question["ts"])
        assert tools_used(["Deleting a file"]) in reply.text and set(reply.buttons) >= {REGENERATE, TOOL_DETAILS}
        assert "deleted notes.txt" not in reply.text  # the result is not shown raw
        await press(fake, reply, TOOL_DETAILS, user="U1")
        await fake.wait_for(lambda: len(fake.ephemeral_texts("U1")) >= 2, what="the tool details")
    assert fake.ephemeral_texts("U1")[0] == APPROVED
    assert "deleted notes.txt" in fake.ephemeral_texts("U1")[1] and "delete_file" in fake.ephemeral_texts("U1")[1]
    [stored] = (await replies(asking, channel_key("C1", question["ts"])))[-1:]
    [call] = await asking.store.tool_calls(stored.id)
    assert (call.tool, call.result) == ("delete_file", "deleted notes.txt")


async def test_an_admin_denies_and_an_unanswered_request_times_out(
    asking: ConversationManager, settings, fake: FakeSlack
) -> None:
    async with running_bot(asking, settings, fake) as bot:
        question = mention("C1", "delete notes.txt", user="U1")
        await fake.push_event(question)
        await press(fake, await asking_message(fake, question["ts"]), DENY, user=ADMIN)
        [reply] = await answered(bot, fake, "C1", thread_ts=question["ts"])
        assert tool_denied("Deleting a file") in reply.text and RUN not in reply.buttons
        assert fake.ephemeral_texts(ADMIN) == [DENIED]
        [stored] = (await replies(asking, channel_key("C1", question["ts"])))[-1:]
        assert [c.result for c in await asking.store.tool_calls(stored.id)] == [TOOL_DENIED_RESULT]

        second = mention("C2", "delete notes.txt", user="U1")
        await asking.set_sampling(channel_key("C2"), grammar=call_or("done", DELETE_CALL), max_tokens=40)
        await fake.push_event(second)
        await asking_message_in(fake, "C2", second["ts"])
        [late] = await answered(bot, fake, "C2", thread_ts=second["ts"])
    assert tool_approval_timed_out("Deleting a file", 1.5) in late.text and RUN not in late.buttons


async def asking_message_in(fake: FakeSlack, channel: str, thread: str) -> FakeMessage:
    return await fake.wait_for(
        lambda: next((m for m in fake.messages_in(channel, thread) if RUN in m.buttons), None),
        timeout=REPLY_TIMEOUT_SECONDS,
        what="the Run / Deny buttons",
    )


def test_only_targets_that_can_show_buttons_ask_for_approval() -> None:
    from slack_sdk.web.async_client import AsyncWebClient

    from adapters.slack.targets import NativeStreamTarget, UpdateTarget

    client = AsyncWebClient(token="xoxb-test")
    assert UpdateTarget(client, "C1", team_id="T1", key=channel_key("C1")).asks_approval
    assert not UpdateTarget(client, "C1", team_id="T1").asks_approval  # no key: its buttons could not act
    assert not NativeStreamTarget(
        client, "C1", thread_ts="1.0", team_id="T1", user_id="U1", key=channel_key("C1")
    ).asks_approval
