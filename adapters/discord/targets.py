"""Reply targets: where a streamed reply lands on Discord (a channel message, or a slash command's response).

Each implements `bot.types.ReplyTarget`. Edits that Discord refuses are not retried on the spot: the
streaming policy's next edit carries the whole text anyway, and `flush()` re-sends whatever is still
out of date once the reply ends, so a refused edit never loses text and never becomes a second message.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

import aiohttp
import discord

__all__ = ["NO_MENTIONS", "SEND_ERRORS", "DISCORD_MAX_MESSAGE_CHARS", "ChannelTarget", "InteractionTarget"]

log = logging.getLogger(__name__)

DISCORD_MAX_MESSAGE_CHARS = 2000
FLUSH_RETRY_DELAYS_SECONDS = (1.0, 2.0, 4.0)
EMPTY_PLACEHOLDER = "…"  # Discord refuses a message with no content

# Model output must never ping anyone: this goes on every message the bot sends or edits.
NO_MENTIONS = discord.AllowedMentions.none()

# What a failed Discord call can raise once discord.py has done its own retries.
SEND_ERRORS = (discord.HTTPException, discord.RateLimited, aiohttp.ClientError, asyncio.TimeoutError)


def _content(text: str) -> str:
    return text if text.strip() else EMPTY_PLACEHOLDER


class _EditingTarget(ABC):
    """Shared edit bookkeeping: remembers the text each message should show until Discord has it."""

    max_length: int = DISCORD_MAX_MESSAGE_CHARS

    def __init__(self, *, min_edit_interval: float) -> None:
        self.min_edit_interval = min_edit_interval
        self._stale: dict[int, tuple[Any, str]] = {}  # id(handle) -> (handle, wanted text)

    @abstractmethod
    async def _send_edit(self, handle: Any, text: str) -> None:
        """Make one edit on Discord (raises what discord.py raises)."""

    async def edit(self, handle: Any, text: str) -> None:
        """Replace the message's text; a refusal is remembered for the next edit or `flush`."""
        try:
            await self._send_edit(handle, _content(text))
        except (discord.NotFound, discord.Forbidden) as exc:
            # The message was deleted or the channel closed to us: nothing left to bring up to date.
            log.warning("discord edit impossible (%s); giving up on that message", exc)
            self._stale.pop(id(handle), None)
        except SEND_ERRORS as exc:
            log.warning("discord edit refused (%s); the next edit will carry the text", exc)
            self._stale[id(handle)] = (handle, text)
        else:
            self._stale.pop(id(handle), None)

    async def flush(self) -> bool:
        """Re-send edits Discord refused, with back-off; True when every message shows its final text."""
        for delay in (0.0, *FLUSH_RETRY_DELAYS_SECONDS):
            if not self._stale:
                return True
            await asyncio.sleep(delay)
            for handle, text in list(self._stale.values()):
                await self.edit(handle, text)
        if self._stale:
            log.error("discord: %d message(s) could not be brought up to date", len(self._stale))
        return not self._stale


class ChannelTarget(_EditingTarget):
    """A reply in a channel, thread or DM: the first message answers ``trigger``, continuations follow it."""

    def __init__(self, channel: discord.abc.Messageable, *, trigger: discord.Message | None = None,
                 min_edit_interval: float) -> None:
        super().__init__(min_edit_interval=min_edit_interval)
        self._channel = channel
        self._trigger = trigger

    async def post(self, text: str) -> discord.Message:
        # A reply that must not fail if the user deleted their message meanwhile.
        reference = self._trigger.to_reference(fail_if_not_exists=False) if self._trigger else None
        return await self._channel.send(_content(text), reference=reference,  # type: ignore[arg-type]
                                        allowed_mentions=NO_MENTIONS)

    async def post_continuation(self, text: str) -> discord.Message:
        return await self._channel.send(_content(text), allowed_mentions=NO_MENTIONS)

    async def _send_edit(self, handle: Any, text: str) -> None:
        await handle.edit(content=text, allowed_mentions=NO_MENTIONS)


class _Original:
    """Handle of a slash command's original response (it has no message object until edited)."""

    def __repr__(self) -> str:
        return "<original response>"


class InteractionTarget(_EditingTarget):
    """A reply to a slash command: the deferred original response first, follow-up messages after it.

    The command must have deferred already (Discord wants an answer within 3 s; the queue may be longer).
    """

    def __init__(self, interaction: discord.Interaction, *, min_edit_interval: float) -> None:
        super().__init__(min_edit_interval=min_edit_interval)
        self._interaction = interaction
        self._original = _Original()

    async def post(self, text: str) -> _Original:
        await self._interaction.edit_original_response(content=_content(text), allowed_mentions=NO_MENTIONS)
        return self._original

    async def post_continuation(self, text: str) -> discord.WebhookMessage:
        return await self._interaction.followup.send(_content(text), wait=True, allowed_mentions=NO_MENTIONS)

    async def _send_edit(self, handle: Any, text: str) -> None:
        if handle is self._original:
            await self._interaction.edit_original_response(content=text, allowed_mentions=NO_MENTIONS)
        else:
            await handle.edit(content=text, allowed_mentions=NO_MENTIONS)
