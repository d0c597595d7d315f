"""Images: the limits judged before a download (size, count) and after it (pixels, not an image), scaling and
encoding with Pillow, and keeping them in the store within the disk budget (SQLite and PostgreSQL)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from bot.config import ImageSettings
from bot.images import (
    estimate_tokens,
    is_image,
    keep_images,
    not_worth_fetching,
    over_count,
    prepare_image,
    pruned_note,
    read_image,
    stored_images,
)
from bot.store import Status, Store, open_store
from bot.types import Attachment, ImagePart

LIMITS = ImageSettings()
KEY = "discord/ch/g1/c1"


def png(width: int, height: int, mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    """A screenshot-like picture: flat colour with a dark bar across it."""
    image = Image.new(mode, (width, height), color)  # type: ignore[arg-type]
    ImageDraw.Draw(image).rectangle((0, height // 3, width - 1, height // 2), fill=(10, 10, 10, 255)[: len(mode)])
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def photo(width: int, height: int) -> bytes:
    """A photo-like picture: smooth gradients and fine detail everywhere, saved as JPEG by a camera."""
    image = Image.radial_gradient("L").resize((width, height)).convert("RGB")
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    image = Image.blend(image, noise, 0.3)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def decoded(part: ImagePart) -> Image.Image:
    return Image.open(io.BytesIO(part.data))


def test_images_are_told_from_other_files_by_type_or_suffix() -> None:
    assert is_image("shot.PNG") and is_image("blob", "image/webp; q=1") and is_image("x.jpeg", None)
    assert not is_image("notes.txt", "text/plain") and not is_image("logo.svg", "image/svg+xml")


def test_an_image_larger_than_max_bytes_is_skipped_before_download_with_a_note() -> None:
    limits = ImageSettings(max_bytes=2_000_000)
    assert not_worth_fetching("big.png", 2_000_001, limits) == Attachment(
        "big.png", skipped="an image larger than 2 MB"
    )
    assert not_worth_fetching("small.png", 2_000_000, limits) is None


def test_only_max_count_images_of_a_message_are_fetched_and_the_rest_are_named() -> None:
    kept, skipped = over_count(["a.png", "b.png", "c.png"], ImageSettings(max_count=2))
    assert kept == ["a.png", "b.png"]
    assert skipped == [Attachment("c.png", skipped="only 2 images per message are read")]


def test_a_large_photo_is_scaled_to_the_model_size_and_sent_as_jpeg() -> None:
    part = prepare_image("holiday.jpg", photo(1600, 1200), LIMITS, max_side=512)
    assert isinstance(part, ImagePart)
    assert (part.width, part.height) == (512, 384) and part.media_type == "image/jpeg"
    assert decoded(part).size == (512, 384) and decoded(part).format == "JPEG"


def test_a_screenshot_stays_png_and_a_small_one_keeps_its_size() -> None:
    part = prepare_image("C:\\Users\\me\\shot.png", png(300, 200), LIMITS, max_side=1024)
    assert isinstance(part, ImagePart)
    assert (part.name, part.media_type, part.width, part.height) == ("shot.png", "image/png", 300, 200)
    assert decoded(part).getpixel((5, 5)) == (200, 30, 30)  # lossless


def test_transparency_is_kept_as_png() -> None:
    part = prepare_image("logo.png", png(800, 400, "RGBA", (0, 0, 0, 0)), LIMITS, max_side=400)
    assert isinstance(part, ImagePart) and part.media_type == "image/png" and (part.width, part.height) == (400, 200)
    assert decoded(part).mode == "RGBA" and decoded(part).getpixel((0, 0))[3] == 0


def test_too_many_pixels_or_not_an_image_is_skipped_with_a_note_and_no_warning() -> None:
    limits = ImageSettings(max_pixels=1_000_000)
    assert prepare_image("wide.png", png(2000, 600), limits, 1024) == Attachment(
        "wide.png", skipped="an image of more than 1 megapixels"
    )
    # Past Pillow's own bomb limit (178 M pixels), read from a small, highly compressed file.
    bomb = png(15000, 12000, "L", 0)
    assert len(bomb) < 2_000_000
    assert prepare_image("bomb.png", bomb, ImageSettings(max_pixels=150_000_000), 1024) == Attachment(
        "bomb.png", skipped="an image of more than 150 megapixels"
    )
    assert prepare_image("fake.png", b"not a picture", LIMITS, 1024) == Attachment(
        "fake.png", skipped="not an image Pillow can read"
    )
    assert isinstance(prepare_image("big.png", png(10, 10), ImageSettings(max_bytes=10), 1024), Attachment)


def test_a_phone_photo_stands_the_way_it_was_taken() -> None:
    image = Image.new("RGB", (400, 200), (0, 120, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90° clockwise
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    part = prepare_image("phone.jpg", out.getvalue(), LIMITS, 1024)
    assert isinstance(part, ImagePart) and (part.width, part.height) == (200, 400)


async def test_reading_an_image_happens_off_the_event_loop_and_counts_its_tokens() -> None:
    part = await read_image("shot.png", png(1024, 600), LIMITS, 1024)
    assert isinstance(part, ImagePart)
    assert estimate_tokens(part) == 85 + 170 * 2 * 2
    assert part.data_url().startswith("data:image/png;base64,iVBOR")


# -- kept in the store ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def image_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    target = (
        tmp_path / "store.sqlite3"
        if request.param == "sqlite"
        else await request.getfixturevalue("postgres").database()
    )
    store = await open_store(target)
    yield store
    await store.close()


def part(name: str, size: int) -> ImagePart:
    result = prepare_image(name, png(size, size), LIMITS, 1024)
    assert isinstance(result, ImagePart)
    return result


async def test_images_come_back_with_their_message_in_order(image_store: Store) -> None:
    first, _ = await image_store.add_exchange(KEY, "what is this?", author_id="u1", author_name="Ann")
    second, _ = await image_store.add_exchange(KEY, "and these?", author_id="u1", author_name="Ann")
    a, b, c = part("a.png", 40), part("b.png", 50), part("c.png", 60)
    await keep_images(image_store, first, [a], LIMITS)
    await keep_images(image_store, second, [b, c], LIMITS)
    assert await stored_images(image_store, [first, second, second + 1]) == {first: [a], second: [b, c]}
    assert await stored_images(image_store, []) == {}


async def test_past_the_disk_budget_the_oldest_images_become_a_note(image_store: Store) -> None:
    images = [part(f"{n}.png", 200 + n) for n in range(4)]
    budget = ImageSettings(disk_mb=1)
    ids = []
    for image in images:
        message_id, _ = await image_store.add_exchange(KEY, "look", author_id="u1", author_name="Ann")
        ids.append(message_id)
        assert await keep_images(image_store, message_id, [image], budget) == 0
    # With a budget that holds only the two newest, the two oldest lose their data but keep their place.
    small = sum(len(image.data) for image in images[2:])
    assert await image_store.prune_images(small) == 2
    kept = await stored_images(image_store, ids)
    assert kept == {
        ids[0]: [pruned_note("0.png")],
        ids[1]: [pruned_note("1.png")],
        ids[2]: [images[2]],
        ids[3]: [images[3]],
    }
    assert await image_store.prune_images(small) == 0  # already within it


async def test_clearing_a_conversation_deletes_its_images(image_store: Store) -> None:
    message_id, reply_id = await image_store.add_exchange(KEY, "see", author_id="u1", author_name="Ann")
    other = await image_store.add_message("discord/ch/g1/c2", "user", "here too", Status.COMPLETE)
    await image_store.add_images(message_id, [part("a.png", 30)])
    await image_store.add_images(other, [part("b.png", 30)])
    await image_store.clear_messages(KEY, reply_id)
    assert list(await image_store.images([message_id, other])) == [other]
