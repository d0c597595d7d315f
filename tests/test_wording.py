"""The core's words (`bot.wording`): typed statuses shown as the lines users know, shortcut prompts."""

from __future__ import annotations

import pytest

from bot.context import ask_about, summarize
from bot.types import Phase, ReplyStatus
from bot.wording import (
    ASK_ABOUT_QUESTION,
    WAITING_FOR_PREVIOUS,
    queued_line,
    status_line,
    tool_approval_timed_out,
    tool_asking,
    tool_denied,
    tools_used,
)


def test_statuses_are_typed_values_shown_as_the_lines_users_know() -> None:
    assert status_line(ReplyStatus(Phase.QUEUED, 3)) == queued_line(3) == "⏳ Queued: #3 in line…"
    assert status_line(ReplyStatus(Phase.WAITING)) == WAITING_FOR_PREVIOUS
    assert status_line(ReplyStatus(Phase.THINKING)) == "💭 Thinking…"
    assert status_line(ReplyStatus(Phase.RETRYING)) == "⚠️ The model server is unreachable; retrying…"
    assert status_line(ReplyStatus(Phase.TOOL, tool="Searching the wiki")) == "🔧 Searching the wiki…"
    assert status_line(ReplyStatus(Phase.APPROVAL, tool="Deleting a file")) == tool_asking("Deleting a file")
    assert "Deleting a file" in tool_asking("Deleting a file") and "Run or Deny" in tool_asking("Deleting a file")
    with pytest.raises(ValueError, match="tool status takes a tool title"):
        ReplyStatus(Phase.TOOL)
    with pytest.raises(ValueError, match="approval status takes a tool title"):
        ReplyStatus(Phase.APPROVAL)
    with pytest.raises(ValueError, match="queued status takes a queue position"):
        ReplyStatus(Phase.QUEUED)
    with pytest.raises(ValueError, match="thinking status takes no queue position"):
        ReplyStatus(Phase.THINKING, 2)


def test_the_tools_footer_names_each_tool_once_with_a_count() -> None:
    assert tools_used(["Adding numbers", "Searching", "Adding numbers"]) == "🔧 Used: Adding numbers ×2, Searching"


def test_shortcut_prompts_keep_their_words() -> None:
    assert ask_about("Bo", "Tea?", "  ") == f"Bo wrote:\n> Tea?\n\n{ASK_ABOUT_QUESTION}"
    prompt = summarize([("Ana", "one"), ("Bo", "two"), ("Cy", "three")], max_chars=20)
    assert prompt == (
        "Summarize this conversation: the main points, decisions and open questions, briefly "
        "(1 older messages left out).\n\nBo: two\nCy: three"
    )


def test_a_tool_call_not_run_says_why_in_one_clear_line() -> None:
    assert tool_denied("Deleting a file") == "🚫 Deleting a file was denied, so it did not run."
    assert tool_approval_timed_out("Deleting a file", 120) == (
        "⏱️ No one approved Deleting a file within 2 minutes, so it did not run ([tools] approval_timeout)."
    )
    assert "within 1.5 s" in tool_approval_timed_out("Deleting a file", 1.5)
