"""Files sent with a message, read for the core: the reported size and kind are checked before downloading."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import discord

from bot.files import not_worth_reading, read_attachment, skipped
from bot.types import Attachment

__all__ = ["read_attachments"]

log = logging.getLogger(__name__)


async def read_attachments(attachments: Sequence[discord.Attachment], max_bytes: int) -> tuple[Attachment, ...]:
    """Each file as `bot.files` reads it; too big or not text-like ones are skipped without a download."""
    async def read(attachment: discord.Attachment) -> Attachment:
        name, kind = attachment.filename, attachment.content_type
        if (reason := not_worth_reading(name, kind, attachment.size, max_bytes)) is not None:
            return reason
        try:
            data = await attachment.read()
        except (TimeoutError, discord.HTTPException, OSError) as exc:
            log.warning("could not download attachment %s: %s", attachment.id, exc)
            return skipped(name, "could not be downloaded")
        return read_attachment(name, kind, data, max_bytes)

    return tuple(await asyncio.gather(*map(read, attachments)))
