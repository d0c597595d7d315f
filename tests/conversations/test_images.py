"""Images of a user's turn in the manager: stored with the message, sent to a vision model as ``image_url``
parts (again on Regenerate, and later in the history), named in text with a note for a model without vision,
and replaced by a note past the disk budget. The model is a real server process that records its requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import EngineSettings, ImageSettings, ModelSettings, Settings
from bot.conversations import ConversationManager, ReplyResult
from bot.engine import Engine
from bot.images import read_image
from bot.store import Status, Store
from bot.types import ImagePart, Incoming
from bot.wording import cannot_see_images, image_unseen
from tests.conftest import MODEL_PATH
from tests.conversations.helpers import CHANNEL, Target
from tests.pictures import MODEL_ID, png, recorded_manager, sent_images
from tests.recording_server import REPLY, RecordingServer
from tests.tiny_vision import IMAGE_TOKENS, write_tiny_mmproj

REPLY_TIMEOUT_SECONDS = 30.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, MODEL_ID).start()
    yield server
    await server.stop()


async def picture(name: str, size: tuple[int, int], color: tuple[int, int, int], max_side: int = 1024) -> ImagePart:
    part = await read_image(name, png(size, color), ImageSettings(), max_side)
    assert isinstance(part, ImagePart)
    return part


async def ask(manager: ConversationManager, text: str, *images: ImagePart) -> ReplyResult:
    async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
        return await manager.respond(Incoming(CHANNEL, "u1", "Ann", text, images=images), Target())


async def test_a_picture_reaches_the_vision_model_and_again_on_regenerate_and_in_later_turns(
    settings: Settings, store: Store, server: RecordingServer
) -> None:
    red = await picture("red.png", (640, 480), (255, 0, 0))
    async with recorded_manager(settings, store, server, vision=True) as manager:
        first = await ask(manager, "What colour is this?", red)
        assert (first.status, first.text, first.notes) == (Status.COMPLETE, REPLY, [])
        assert first.reply_id is not None
        again = await manager.regenerate(CHANNEL, Target(), first.reply_id)
        assert again.status == Status.COMPLETE
        await ask(manager, "And now?")
    asked, regenerated, later = server.requests()
    for body in (asked["body"], regenerated["body"]):
        user = body["messages"][-1]
        assert user["content"][0] == {"type": "text", "text": "Ann: What colour is this?"}
        [image] = sent_images(user)
        assert image.size == (640, 480) and image.getpixel((5, 5)) == (255, 0, 0)
    # The next turn's history still shows the model the picture, with the message it came with.
    earlier = [m for m in later["body"]["messages"] if isinstance(m["content"], list)]
    assert len(earlier) == 1 and len(sent_images(earlier[0])) == 1
    assert later["body"]["messages"][-1] == {"role": "user", "content": "Ann: And now?"}


async def test_a_picture_alone_is_answered_and_scaled_to_the_models_image_size(
    settings: Settings, store: Store, server: RecordingServer
) -> None:
    settings.models = [ModelSettings(name="small-eyes", url=server.base_url, vision=True, image_size=200)]
    big = await picture("wide.png", (1600, 800), (0, 0, 255), max_side=1600)
    async with recorded_manager(settings, store, server, vision=True) as manager:
        assert manager.images.max_side == 1024  # stored at the largest size a model reads
        result = await ask(manager, "", big)
    assert result.status == Status.COMPLETE and result.text == REPLY
    [request] = server.requests()
    user = request["body"]["messages"][-1]
    assert [part["type"] for part in user["content"]] == ["text", "image_url"]  # "Ann: " names the speaker
    [image] = sent_images(user)
    assert image.size == (1024, 512)


async def test_a_model_without_vision_answers_and_says_it_cannot_see_the_picture(
    settings: Settings, store: Store, server: RecordingServer
) -> None:
    settings.models = [ModelSettings(name="llava", url=server.base_url, vision=True)]
    cat = await picture("cat.png", (64, 64), (10, 200, 10))
    async with recorded_manager(settings, store, server, vision=False) as manager:
        result = await ask(manager, "What is this?", cat)
        history = await manager.history(CHANNEL)
    assert result.status == Status.COMPLETE and result.text == REPLY
    assert result.notes == [cannot_see_images(["llava"])]
    assert "can't see images with this model; try `/model llava`" in result.notes[0]
    [request] = server.requests()
    user = request["body"]["messages"][-1]
    assert user == {"role": "user", "content": f"Ann: What is this?\n{image_unseen('cat.png')}"}
    # The picture is kept: a model that sees can be asked about it later.
    assert len((await store.images([history[0].id]))[history[0].id]) == 1


async def test_past_the_disk_budget_a_picture_is_replaced_by_a_note(
    settings: Settings, store: Store, server: RecordingServer
) -> None:
    settings.images = ImageSettings(disk_mb=0)
    cat = await picture("cat.png", (64, 64), (10, 200, 10))
    async with recorded_manager(settings, store, server, vision=True) as manager:
        result = await ask(manager, "Still there?", cat)
    assert result.status == Status.COMPLETE
    [request] = server.requests()
    assert request["body"]["messages"][-1]["content"] == [
        {"type": "text", "text": "Ann: Still there?"},
        {"type": "text", "text": "[An image, cat.png, was here; it is no longer stored.]"},
    ]


async def test_an_embedded_model_with_a_projector_reads_the_picture_with_no_note(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    settings.engine = EngineSettings(
        model_path=MODEL_PATH, mmproj=write_tiny_mmproj(tmp_path / "mmproj.gguf"), n_ctx=1024, n_threads=1
    )
    engine = await asyncio.to_thread(Engine, settings.engine)
    manager = ConversationManager(engine, store, settings)
    try:
        assert (await manager.vision(CHANNEL)).sees
        result = await ask(manager, "What is this?", await picture("red.png", (80, 60), (220, 30, 30)))
        assert result.status == Status.COMPLETE and result.text
        assert not any("can't see images" in note for note in result.notes)
        # The conversation's KV holds the picture's positions (negative stand-in ids) before the reply.
        [slot] = [slot for slot in engine.kv.slots if slot.session == str(CHANNEL)]
        assert sum(1 for token in slot.cached if token < 0) == IMAGE_TOKENS
    finally:
        await manager.shutdown()
        engine.close()
