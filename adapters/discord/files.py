"""Files sent with a message, read for the core: the reported size and kind are checked before downloading.
Images become `ImagePart`s (`bot.images`, within ``[images]``); the other files are read as text."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import discord

from bot.files import not_worth_reading, read_attachment, skipped
from bot.images import ImageIntake, is_image
from bot.types import Attachment, ImagePart

__all__ = ["read_attachments", "read_files"]

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


async def read_files(
    attachments: Sequence[discord.Attachment], max_bytes: int, images: ImageIntake
) -> tuple[tuple[Attachment, ...], tuple[ImagePart, ...]]:
    """A message's files: (text files read or skipped, with the images skipped), and its images."""
    pictures = [a for a in attachments if is_image(a.filename, a.content_type)]
    others = [a for a in attachments if not is_image(a.filename, a.content_type)]

    async def fetch(attachment: discord.Attachment) -> bytes | None:
        try:
            return await attachment.read()
        except (TimeoutError, discord.HTTPException, OSError) as exc:
            log.warning("could not download image %s: %s", attachment.id, exc)
            return None

    texts, (parts, skipped_images) = await asyncio.gather(
        read_attachments(others, max_bytes),
        images.read(pictures, name_of=lambda a: a.filename, size_of=lambda a: a.size, fetch=fetch),
    )
    return texts + skipped_images, parts
