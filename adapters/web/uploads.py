"""A message sent with files: ``multipart/form-data`` with one ``text`` field and up to `MAX_FILES` ``file`` parts.

Limits hold before the body is read whole: a body longer than `upload_limit` is refused from its
Content-Length (or as soon as it has sent that much), and of each file at most ``max_file_bytes + 1`` bytes are
kept, so `bot.files.read_attachment` gives too big or binary files its own "skipped" line. An image (by its
type or name) keeps up to ``max_image_bytes + 1`` bytes, for `bot.images` to read or skip with a line.
"""

from __future__ import annotations

from aiohttp import BodyPartReader, web
from aiohttp.hdrs import CONTENT_TYPE
from aiohttp.http_exceptions import HttpProcessingError

from bot.files import read_attachment
from bot.images import is_image
from bot.types import Attachment

__all__ = ["FORM_TYPE", "MAX_FILES", "UploadError", "read_form", "upload_limit"]

FORM_TYPE = "multipart/form-data"
MAX_FILES = 10  # per message
UTF8_BYTES_PER_CHAR = 4
FORM_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers
CHUNK_BYTES = 64 * 1024


class UploadError(Exception):
    """A form the API refuses: (status, code, message), turned into an `adapters.web.api.ApiError`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def upload_limit(max_chars: int, max_file_bytes: int, max_image_bytes: int = 0, max_images: int = 0) -> int:
    """The most bytes a form may send: the longest text, `MAX_FILES` files each cut just past the limit (the
    page sends no more of a file than that: enough for the core to see it is too big), and ``max_images``
    images cut just past theirs (the page sends the images past that count empty: they are skipped unread)."""
    return (
        max_chars * UTF8_BYTES_PER_CHAR
        + MAX_FILES * (max_file_bytes + 1)
        + max_images * (max_image_bytes + 1)
        + FORM_OVERHEAD_BYTES
    )


async def read_form(
    request: web.Request, *, max_chars: int, max_file_bytes: int, max_image_bytes: int = 0, max_images: int = 0
) -> tuple[str, tuple[Attachment, ...], tuple[tuple[str, bytes], ...]]:
    """The form's text ("" if it has none), its files as `Attachment`s, and its images as (name, bytes) for
    `bot.images`; raises `UploadError`."""
    limit = upload_limit(max_chars, max_file_bytes, max_image_bytes, max_images)
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(request.content_length, limit, max_file_bytes)
    budget = _Budget(limit, max_file_bytes)
    text: str | None = None
    files: list[Attachment] = []
    images: list[tuple[str, bytes]] = []
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise UploadError(400, "invalid_form", "Nested multipart bodies are not accepted.")
            if part.name == "text" and text is None:
                data = await budget.read(part, max_chars * UTF8_BYTES_PER_CHAR + 1)
                text = _decode_text(data, max_chars)
            elif part.name == "file":
                if len(files) + len(images) == MAX_FILES:
                    raise UploadError(413, "too_many_files", f"At most {MAX_FILES} files go with one message.")
                if not part.filename:
                    raise UploadError(400, "invalid_field", "Each 'file' part needs a file name.")
                if is_image(part.filename, part.headers.get(CONTENT_TYPE)):
                    images.append((part.filename, await budget.read(part, max_image_bytes + 1)))
                    continue
                data = await budget.read(part, max_file_bytes + 1)
                files.append(read_attachment(part.filename, part.headers.get(CONTENT_TYPE), data, max_file_bytes))
            else:
                raise UploadError(400, "invalid_field", "The form holds one 'text' field and 'file' parts only.")
    except (ValueError, AssertionError, KeyError, HttpProcessingError):  # aiohttp's words for a malformed body
        raise UploadError(400, "invalid_form", "The body is not valid multipart/form-data.") from None
    return text or "", tuple(files), tuple(images)


class _Budget:
    """Counts the bytes a form has sent, whatever its Content-Length claimed (or when it sent none)."""

    def __init__(self, limit: int, max_file_bytes: int) -> None:
        self.limit, self.max_file_bytes = limit, max_file_bytes
        self.used = 0

    async def read(self, part: BodyPartReader, keep: int) -> bytes:
        """The part's first ``keep`` bytes; the rest is read and dropped, never held."""
        kept = bytearray()
        while chunk := await part.read_chunk(CHUNK_BYTES):
            self.used += len(chunk)
            if self.used > self.limit:
                raise _too_large(self.used, self.limit, self.max_file_bytes, more=True)
            if len(kept) < keep:
                kept += chunk[: keep - len(kept)]
        return bytes(kept)


def _decode_text(data: bytes, max_chars: int) -> str:
    if len(data) > max_chars * UTF8_BYTES_PER_CHAR:
        raise UploadError(413, "too_long", f"'text' is over the limit of {max_chars:,} characters.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError(400, "invalid_field", "'text' must be UTF-8 text.") from None
    if len(text) > max_chars:
        raise UploadError(413, "too_long", f"'text' is {len(text):,} characters; the limit is {max_chars:,}.")
    return text


def _too_large(size: int, limit: int, max_file_bytes: int, *, more: bool = False) -> UploadError:
    return UploadError(
        413,
        "too_large",
        f"The upload is {'over ' if more else ''}{size:,} bytes; the limit is "
        f"{limit:,}. Files over {max_file_bytes:,} bytes are skipped: send at most "
        f"their first {max_file_bytes + 1:,}.",
    )
