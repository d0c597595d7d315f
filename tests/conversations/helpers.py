"""What the conversation tests share: a session key, a recording reply target, a message, a long reply."""

from __future__ import annotations

import asyncio
from typing import Any

from bot.types import Controls, Incoming, SessionKey

CHANNEL = SessionKey.for_channel("test", "guild1", "chan1")


LONG_GRAMMAR = 'root ::= ("la " ){300}'


class Target:
    """A ReplyTarget that keeps every message's current text and the history of calls."""

    max_length = 2000
    min_edit_interval = 0.0

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.first_text = asyncio.Event()

    async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
        return await self.post(text)

    async def post(self, text: str, controls: Controls | None = None) -> int:
        self.calls.append(("post", text))
        self.messages.append(text)
        if not text.startswith(("💭", "⏳")):
            self.first_text.set()
        return len(self.messages) - 1

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        self.calls.append(("edit", text))
        self.messages[handle] = text
        if not text.startswith(("💭", "⏳")):
            self.first_text.set()


def message(text: str, key: SessionKey = CHANNEL, author: str = "u1") -> Incoming:
    return Incoming(key, author, f"user {author}", text)
