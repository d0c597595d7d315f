"""Files shared with a message: fetched from Slack (``url_private``, with the bot token) and read by `bot.files`,
or by `bot.images` for images (within ``[images]``).

Needs the ``files:read`` scope. Slack reports each file's size and type with the event, so anything too big or
not text-like is skipped without downloading it; the bot token is only ever sent to Slack's own hosts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bot.files import not_worth_reading, read_attachment, skipped
from bot.images import ImageIntake, is_image
from bot.types import Attachment, ImagePart

__all__ = ["read_files", "read_images"]

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_SECONDS = 30.0
MAX_FILES = 10  # more than this in one message are listed as skipped, not fetched


def _trusted(url: str, api_host: str) -> bool:
    # files.slack.com for slack.com's API, and the same host for a self-hosted or fake one.
    host = urlsplit(url).hostname or ""
    return bool(api_host) and (host == api_host or host.endswith("." + api_host))


async def _read_one(
    http: aiohttp.ClientSession, file: dict[str, Any], *, token: str, api_host: str, max_bytes: int
) -> Attachment:
    name = str(file.get("name") or file.get("title") or "file")
    content_type = file.get("mimetype")
    url = str(file.get("url_private_download") or file.get("url_private") or "")
    size = file.get("size")
    if not url or file.get("mode") in ("tombstone", "hidden_by_limit"):
        return skipped(name, "not available to the bot")
    if reason := not_worth_reading(name, content_type, size if isinstance(size, int) else 0, max_bytes):
        return reason
    if not _trusted(url, api_host):
        log.warning("not sending the bot token to %s (not a Slack host)", urlsplit(url).hostname)
        return skipped(name, "not stored on Slack")
    data = await _download(http, name, url, token=token, max_bytes=max_bytes)
    if data is None:
        return skipped(name, "could not be downloaded")
    return read_attachment(name, content_type, data, max_bytes)


async def _download(http: aiohttp.ClientSession, name: str, url: str, *, token: str, max_bytes: int) -> bytes | None:
    """At most ``max_bytes + 1`` bytes of a file on a trusted host, fetched with the bot token; None on failure."""
    try:
        # aiohttp drops the Authorization header if a redirect leaves the host.
        async with http.get(
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_SECONDS),
        ) as response:
            response.raise_for_status()
            return await response.content.read(max_bytes + 1)  # never more than the limit, whatever size said
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not download the Slack file %s: %s", name, exc)
        return None


def _name(file: dict[str, Any]) -> str:
    return str(file.get("name") or file.get("title") or "file")


def _is_image(file: dict[str, Any]) -> bool:
    return is_image(_name(file), file.get("mimetype"))


async def read_images(
    http: aiohttp.ClientSession, files: list[dict[str, Any]], *, token: str, api_host: str, images: ImageIntake
) -> tuple[tuple[ImagePart, ...], tuple[Attachment, ...]]:
    """The image files of a message event as image parts, and those skipped with a reason (too big by the size
    Slack reports, past the count, not on a Slack host, unreadable)."""
    untrusted: list[Attachment] = []
    fetchable = []
    for file in filter(_is_image, files):
        url = str(file.get("url_private_download") or file.get("url_private") or "")
        if not url or file.get("mode") in ("tombstone", "hidden_by_limit"):
            untrusted.append(skipped(_name(file), "not available to the bot"))
        elif not _trusted(url, api_host):
            log.warning("not sending the bot token to %s (not a Slack host)", urlsplit(url).hostname)
            untrusted.append(skipped(_name(file), "not stored on Slack"))
        else:
            fetchable.append((file, url))

    async def fetch(item: tuple[dict[str, Any], str]) -> bytes | None:
        return await _download(http, _name(item[0]), item[1], token=token, max_bytes=images.limits.max_bytes)

    parts, skipped_images = await images.read(
        fetchable,
        name_of=lambda item: _name(item[0]),
        fetch=fetch,
        size_of=lambda item: size if isinstance(size := item[0].get("size"), int) else 0,
    )
    return parts, skipped_images + tuple(untrusted)


async def read_files(
    http: aiohttp.ClientSession, files: list[dict[str, Any]], *, token: str, api_host: str, max_bytes: int
) -> tuple[Attachment, ...]:
    """The files of a message event as attachments: text read, the rest skipped with a reason, in order (its
    images are `read_images`'s)."""
    files = [file for file in files if not _is_image(file)]
    fetched = await asyncio.gather(
        *(_read_one(http, file, token=token, api_host=api_host, max_bytes=max_bytes) for file in files[:MAX_FILES])
    )
    extra = tuple(
        skipped(str(f.get("name") or "file"), f"more than {MAX_FILES} files in one message") for f in files[MAX_FILES:]
    )
    return tuple(fetched) + extra
