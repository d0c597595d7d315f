"""Files shared with a message: fetched from Slack (``url_private``, with the bot token) and read by `bot.files`.

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
from bot.types import Attachment

__all__ = ["read_files"]

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_SECONDS = 30.0
MAX_FILES = 10  # more than this in one message are listed as skipped, not fetched


def _trusted(url: str, api_host: str) -> bool:
    # files.slack.com for slack.com's API, and the same host for a self-hosted or fake one.
    host = urlsplit(url).hostname or ""
    return bool(api_host) and (host == api_host or host.endswith("." + api_host))


async def _read_one(http: aiohttp.ClientSession, file: dict[str, Any], *, token: str, api_host: str,
                    max_bytes: int) -> Attachment:
    name = str(file.get("name") or file.get("title") or "file")
    content_type = file.get("mimetype")
    url = str(file.get("url_private_download") or file.get("url_private") or "")
    size = file.get("size")
    if not url or file.get("mode") in ("tombstone", "hidden_by_limit"):
        return skipped(name, "not available to the bot")
    if (reason := not_worth_reading(name, content_type, size if isinstance(size, int) else 0, max_bytes)):
        return reason
    if not _trusted(url, api_host):
        log.warning("not sending the bot token to %s (not a Slack host)", urlsplit(url).hostname)
        return skipped(name, "not stored on Slack")
    try:
        # aiohttp drops the Authorization header if a redirect leaves the host.
        async with http.get(url, headers={"Authorization": f"Bearer {token}"},
                            timeout=aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_SECONDS)) as response:
            response.raise_for_status()
            data = await response.content.read(max_bytes + 1)  # never more than the limit, whatever size said
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("could not download the Slack file %s: %s", name, exc)
        return skipped(name, "could not be downloaded")
    return read_attachment(name, content_type, data, max_bytes)


async def read_files(http: aiohttp.ClientSession, files: list[dict[str, Any]], *, token: str, api_host: str,
                     max_bytes: int) -> tuple[Attachment, ...]:
    """The files of a message event as attachments: text read, the rest skipped with a reason, in order."""
    fetched = await asyncio.gather(*(_read_one(http, file, token=token, api_host=api_host, max_bytes=max_bytes)
                                     for file in files[:MAX_FILES]))
    extra = tuple(skipped(str(f.get("name") or "file"), f"more than {MAX_FILES} files in one message")
                  for f in files[MAX_FILES:])
    return tuple(fetched) + extra
