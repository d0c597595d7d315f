"""A reply's tool calls as the user sees them when they expand them: each call's tool, arguments and result as
plain text, cut to fit one platform message. Never shown unless asked for (a button, a disclosure)."""

from __future__ import annotations

from collections.abc import Sequence

from bot.store import StoredToolCall

__all__ = ["details_text"]

CUT_MARK = "\n[… cut to fit]"


def details_text(calls: Sequence[StoredToolCall], max_chars: int) -> str:
    """``calls`` as one block of plain text of at most ``max_chars`` characters; each result is cut first so
    every call keeps its heading."""
    if not calls:
        return ""
    share = max(40, (max_chars - 1) // len(calls))
    parts = [_one(call, share) for call in calls]
    text = "\n\n".join(parts)
    return text if len(text) <= max_chars else text[: max_chars - len(CUT_MARK)] + CUT_MARK


def _one(call: StoredToolCall, max_chars: int) -> str:
    head = (
        f"🔧 {call.tool} (round {call.round}){' — failed' if call.is_error else ''}\n"
        f"arguments: {call.arguments}\nresult: "
    )
    room = max_chars - len(head) - 2
    result = call.result if len(call.result) <= room else call.result[: max(0, room - len(CUT_MARK))] + CUT_MARK
    return (head + result)[:max_chars]
