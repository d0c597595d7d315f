"""Images sent with a message: which are fetched (size and count, judged before any download), how they are
checked (pixels), scaled to the model's size and encoded (Pillow), kept within a disk budget, and read back.

Adapters hand a message's image files to `ImageIntake.read` with a way to download one: the count and the
size the platform reports are judged before any download, then each is read into an `ImagePart` (or a skipped
`Attachment`, listed with a note like a skipped text file). The manager stores them with the user's message;
the window puts them into the prompt of a model that sees (`Vision`), at its size, and a note elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

from PIL import Image, ImageOps, UnidentifiedImageError

from bot.config import ImageSettings
from bot.files import clean_name, skipped
from bot.store import Store
from bot.types import Attachment, ImagePart
from bot.wording import NOT_DOWNLOADED

__all__ = [
    "BLIND",
    "IMAGE_SUFFIXES",
    "ImageIntake",
    "Vision",
    "estimate_tokens",
    "fit_for",
    "is_image",
    "keep_images",
    "over_count",
    "not_worth_fetching",
    "prepare_image",
    "pruned_note",
    "read_image",
    "stored_images",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
JPEG_QUALITY = 90
_MIB = 1024 * 1024

T = TypeVar("T")


def is_image(name: str, content_type: str | None = None) -> bool:
    """True for a file worth reading as an image: an image/ MIME type or a known image suffix (not SVG)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "image/svg+xml":
        return False
    return media_type.startswith("image/") or PurePosixPath(name.lower()).suffix in IMAGE_SUFFIXES


def not_worth_fetching(name: str, size: int, limits: ImageSettings) -> Attachment | None:
    """Why an image is skipped, judged from the size the platform reports before any download; None to fetch."""
    if size > limits.max_bytes:
        return skipped(name, f"an image larger than {_size(limits.max_bytes)}")
    return None


def over_count(
    images: Sequence[T], limits: ImageSettings, name_of: Callable[[T], str] = str
) -> tuple[list[T], list[Attachment]]:
    """The first ``max_count`` of a message's images, to fetch, and the rest as skipped attachments."""
    kept = list(images[: limits.max_count])
    why = f"only {limits.max_count} image{'s' if limits.max_count != 1 else ''} per message are read"
    return kept, [skipped(name_of(image), why) for image in images[limits.max_count :]]


def prepare_image(name: str, data: bytes, limits: ImageSettings, max_side: int) -> ImagePart | Attachment:
    """The image scaled so its longest side is at most ``max_side`` and encoded (PNG, or JPEG when smaller and
    opaque); a skipped `Attachment` when it is too large, has too many pixels or is not an image. Blocking."""
    if (reason := not_worth_fetching(name, len(data), limits)) is not None:
        return reason
    with warnings.catch_warnings():
        # Pillow warns above its own pixel limit and raises above twice that; ours is checked from the header.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image: Image.Image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_pixels:
                return skipped(name, f"an image of more than {limits.max_pixels / 1e6:g} megapixels")
            image.draft("RGB", (max_side, max_side))  # JPEG: decode at a smaller scale straight away
            image = ImageOps.exif_transpose(image)  # phone photos stand the way they were taken
        except Image.DecompressionBombError:
            return skipped(name, f"an image of more than {limits.max_pixels / 1e6:g} megapixels")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return skipped(name, "not an image Pillow can read")
    opaque = image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info
    image = image.convert("RGB" if opaque else "RGBA")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    png = _encoded(image, "PNG", optimize=False)
    jpeg = _encoded(image, "JPEG", quality=JPEG_QUALITY) if opaque else None
    # A screenshot stays sharp as PNG; a photo is several times smaller as JPEG.
    data, media_type = (jpeg, "image/jpeg") if jpeg is not None and len(jpeg) < len(png) else (png, "image/png")
    return ImagePart(clean_name(name), media_type, data, image.width, image.height)


async def read_image(name: str, data: bytes, limits: ImageSettings, max_side: int) -> ImagePart | Attachment:
    """`prepare_image` off the event loop (decoding and scaling take a while)."""
    return await asyncio.to_thread(prepare_image, name, data, limits, max_side)


@dataclass(frozen=True)
class Vision:
    """What the model that reads a prompt makes of images: whether it sees them and at what size; ``seeing``
    names the configured models that do, for the note a model without vision leaves."""

    sees: bool = False
    image_size: int = 1024
    seeing: tuple[str, ...] = ()


BLIND = Vision()  # a model that reads text only


@dataclass(frozen=True)
class ImageIntake:
    """How adapters read a message's images: ``[images]`` limits, and the size they are stored at (the largest
    any model reads; a model that reads them smaller gets them scaled again, see `fit_for`)."""

    limits: ImageSettings
    max_side: int = 1024

    async def read(
        self,
        files: Sequence[T],
        *,
        name_of: Callable[[T], str],
        size_of: Callable[[T], int],
        fetch: Callable[[T], Awaitable[bytes | None]],
    ) -> tuple[tuple[ImagePart, ...], tuple[Attachment, ...]]:
        """The images among ``files`` and the ones skipped, with why: past the count or the size each reports,
        nothing is downloaded; ``fetch`` returns a file's bytes, or None when it could not be downloaded."""
        kept, skipped_files = over_count(files, self.limits, name_of)

        async def one(file: T) -> ImagePart | Attachment:
            name = name_of(file)
            if (reason := not_worth_fetching(name, size_of(file), self.limits)) is not None:
                return reason
            data = await fetch(file)
            if data is None:
                return skipped(name, NOT_DOWNLOADED)
            return await read_image(name, data, self.limits, self.max_side)

        read = await asyncio.gather(*map(one, kept))
        images = tuple(part for part in read if isinstance(part, ImagePart))
        return images, tuple(part for part in read if isinstance(part, Attachment)) + tuple(skipped_files)


async def fit_for(images: Sequence[ImagePart | str], vision: Vision, limits: ImageSettings) -> list[ImagePart | str]:
    """Stored images as a model reads them: those larger than its ``image_size`` scaled down (off the loop)."""

    async def one(image: ImagePart | str) -> ImagePart | str:
        if isinstance(image, str) or max(image.width, image.height) <= vision.image_size:
            return image
        scaled = await read_image(image.name, image.data, limits, vision.image_size)
        return scaled if isinstance(scaled, ImagePart) else image

    return list(await asyncio.gather(*map(one, images)))


def estimate_tokens(image: ImagePart) -> int:
    """Prompt tokens an image costs, as OpenAI counts them (85 + 170 per 512-pixel tile): a server's own
    vision encoder is usually cheaper, so the prompt's budget errs on the safe side."""
    return 85 + 170 * math.ceil(image.width / 512) * math.ceil(image.height / 512)


def pruned_note(name: str) -> str:
    """What stands in a conversation for an image whose data was dropped to keep the disk budget."""
    return f"[An image, {name}, was here; it is no longer stored.]"


async def keep_images(store: Store, message_id: int, images: Sequence[ImagePart], limits: ImageSettings) -> int:
    """Store a user message's images, then drop the oldest past ``[images] disk_mb``; how many were dropped."""
    if images:
        await store.add_images(message_id, images)
    return await store.prune_images(limits.disk_mb * _MIB)


async def stored_images(store: Store, message_ids: Iterable[int]) -> dict[int, list[ImagePart | str]]:
    """The stored images of those messages as parts, a pruned one as its `pruned_note`, by message id."""
    found = await store.images(message_ids)
    return {
        message_id: [
            ImagePart(image.name, image.media_type, image.data, image.width, image.height)
            if image.data is not None
            else pruned_note(image.name)
            for image in images
        ]
        for message_id, images in found.items()
    }


def _size(count: int) -> str:
    return f"{count / 1_000_000:g} MB" if count >= 1_000_000 else f"{count / 1000:g} kB"


def _encoded(image: Image.Image, format: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format, **options)
    return out.getvalue()
