"""Prompts built from what users point at on a platform: a message to ask about, a stretch of chat to summarize.

Both platforms offer these (Discord's context menus, Slack's message shortcuts); they are built here once, in
the words of `bot.wording`.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.wording import ASK_ABOUT_QUESTION, asked_about, summarize_request

__all__ = ["ask_about", "summarize"]


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in text.strip().splitlines()) or ">"


def ask_about(author: str, text: str, question: str) -> str:
    """A question about one message, which is quoted (as data) above it."""
    question = question.strip() or ASK_ABOUT_QUESTION
    return asked_about(author, _quote(text), question)


def summarize(messages: Sequence[tuple[str, str]], max_chars: int) -> str:
    """A request to summarize ``messages`` (author, text; oldest first), keeping the newest within ``max_chars``."""
    lines: list[str] = []
    used = 0
    for author, text in reversed(messages):
        line = f"{author}: {' '.join(text.split())}"
        if used + len(line) > max_chars and lines:
            break
        lines.append(line[:max_chars])
        used += len(line) + 1
    return summarize_request(len(messages) - len(lines)) + "\n\n" + "\n".join(reversed(lines))
