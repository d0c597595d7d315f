"""Reply targets: where a streamed reply lands on Discord (a channel message, or a slash command's response).

Each implements `bot.types.ReplyTarget` as a thin transport: one Discord call per method, raising on
failure; `bot.delivery` paces, retries and falls back. A message that was deleted, or an interaction whose
15-minute token expired, raises `MessageGone`, and the reply continues in a new channel message. The
`Controls` delivery passes become the buttons of `adapters.discord.controls` under the message (an edit
without controls takes them away).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import discord

from adapters.discord.controls import view_for
from bot.errors import MessageGone
from bot.types import Controls

__all__ = ["NO_MENTIONS", "SEND_ERRORS", "DISCORD_MAX_MESSAGE_CHARS", "ChannelTarget", "InteractionTarget", "locate"]

log = logging.getLogger(__name__)

DISCORD_MAX_MESSAGE_CHARS = 2000
EMPTY_PLACEHOLDER = "…"  # Discord refuses a message with no content
GONE_CODES = {10008, 10015, 50027}  # Unknown Message, Unknown Webhook, Invalid Webhook Token (expired)

# Model output must never ping anyone: this goes on every message the bot sends or edits.
NO_MENTIONS = discord.AllowedMentions.none()

# What a failed Discord call can raise once discord.py has done its own retries.
SEND_ERRORS = (discord.HTTPException, discord.RateLimited, aiohttp.ClientError, asyncio.TimeoutError)


def _content(text: str) -> str:
    return text if text.strip() else EMPTY_PLACEHOLDER


def _buttons(controls: Controls | None) -> dict[str, Any]:
    """The ``view`` argument of a send: none at all when there are no buttons."""
    view = view_for(controls)
    return {} if view is None else {"view": view}


def _is_gone(exc: discord.HTTPException) -> bool:
    return isinstance(exc, discord.NotFound) or exc.code in GONE_CODES


class ChannelTarget:
    """A reply in a channel, thread or DM: the first message answers ``trigger``, continuations follow it."""

    max_length = DISCORD_MAX_MESSAGE_CHARS
    asks_approval = True  # Run / Deny buttons (adapters.discord.tool_buttons)

    def __init__(
        self, channel: discord.abc.Messageable, *, trigger: discord.Message | None = None, min_edit_interval: float
    ) -> None:
        self._channel = channel
        self._trigger = trigger
        self.min_edit_interval = min_edit_interval
        self.bucket = f"discord:channel:{getattr(channel, 'id', id(channel))}"  # Discord limits writes per channel
        # to 5 in 5 s: a status line and the first words may go out back to back, the pace stays one a second.
        self.burst = 2

    async def post(self, text: str, controls: Controls | None = None) -> discord.Message | _Original:
        # A reply that must not fail if the user deleted their message meanwhile.
        reference = self._trigger.to_reference(fail_if_not_exists=False) if self._trigger else None
        # send() takes reference=None (its default), though its typed overloads leave None out.
        return await self._channel.send(
            _content(text),
            reference=reference,  # type: ignore[arg-type]
            allowed_mentions=NO_MENTIONS,
            **_buttons(controls),
        )

    async def post_continuation(self, text: str, controls: Controls | None = None) -> discord.Message:
        return await self._channel.send(_content(text), allowed_mentions=NO_MENTIONS, **_buttons(controls))

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        try:
            await handle.edit(content=_content(text), allowed_mentions=NO_MENTIONS, view=view_for(controls))
        except discord.HTTPException as exc:
            if _is_gone(exc):
                raise MessageGone(f"discord: {exc}") from exc
            raise

    def reference(self, handle: Any) -> str | None:
        """ "<channel id>/<message id>" for `locate`; None for an interaction's original response (no message id
        until fetched, and its token lapses anyway)."""
        if isinstance(handle, discord.Message | discord.PartialMessage):
            return f"{handle.channel.id}/{handle.id}"
        return None


def locate(client: discord.Client, reference: str) -> tuple[ChannelTarget, discord.PartialMessage]:
    """A target and handle that edit the message at ``reference`` (`ChannelTarget.reference`): how a surviving
    process shows the end of a reply another process left."""
    channel_id, message_id = (int(part) for part in reference.split("/"))
    channel = client.get_partial_messageable(channel_id)
    return ChannelTarget(channel, min_edit_interval=1.0), channel.get_partial_message(message_id)


class _Original:
    """Handle of a slash command's original response (it has no message object until edited)."""

    def __repr__(self) -> str:
        return "<original response>"


class InteractionTarget(ChannelTarget):
    """A reply to a slash command: the deferred original response first, follow-up messages after it.

    The command must have deferred already (Discord wants an answer within 3 s; the queue may be longer).
    Once the interaction's token has expired, every further message goes to the channel instead.
    """

    def __init__(self, interaction: discord.Interaction, *, min_edit_interval: float) -> None:
        channel = interaction.channel
        # A slash command's channel is typed as any channel or None; where a command runs, it is messageable.
        super().__init__(channel, min_edit_interval=min_edit_interval)  # type: ignore[arg-type]
        self._interaction = interaction
        self._original = _Original()
        self._token_expired = False

    async def post(self, text: str, controls: Controls | None = None) -> _Original:
        await self._webhook(
            self._interaction.edit_original_response(
                content=_content(text), allowed_mentions=NO_MENTIONS, view=view_for(controls)
            )
        )
        return self._original

    async def post_continuation(self, text: str, controls: Controls | None = None) -> discord.Message:
        if not self._token_expired:
            try:
                return await self._webhook(
                    self._interaction.followup.send(
                        _content(text), wait=True, allowed_mentions=NO_MENTIONS, **_buttons(controls)
                    )
                )
            except MessageGone:
                pass
        return await super().post_continuation(text, controls)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        if handle is not self._original:
            await super().edit(handle, text, controls)
        elif self._token_expired:
            raise MessageGone("discord: the interaction token has expired")
        else:
            await self._webhook(
                self._interaction.edit_original_response(
                    content=_content(text), allowed_mentions=NO_MENTIONS, view=view_for(controls)
                )
            )

    async def _webhook(self, call: Any) -> Any:
        """Await an interaction-webhook call; an expired token (after 15 minutes) becomes `MessageGone`."""
        try:
            return await call
        except discord.HTTPException as exc:
            if _is_gone(exc):
                self._token_expired = True
                raise MessageGone(f"discord: {exc}") from exc
            raise
