"""Pictures sent from the web page (a form, as the page sends pasted or dropped images): the real aiohttp
server, a real HTTP client, and the recording server process as the vision model. The picture reaches the
model as an ``image_url`` part, again on Regenerate; a model without vision says it cannot see it; the limits
each give a line."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from adapters.web import WebServer, create_app
from bot.config import ImageSettings, ModelSettings, Secrets, Settings
from bot.store import Status, Store
from bot.wording import cannot_see_images, image_unseen
from tests.pictures import MODEL_ID, png, recorded_manager, sent_images
from tests.recording_server import REPLY, RecordingServer
from tests.test_web import Browser


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, MODEL_ID).start()
    yield server
    await server.stop()


@pytest.fixture
def page(
    settings: Settings, store: Store, server: RecordingServer
) -> Callable[..., contextlib.AbstractAsyncContextManager[Browser]]:
    """A browser on the web page of a bot whose model is the recording server, with or without vision."""

    @contextlib.asynccontextmanager
    async def open_page(*, vision: bool) -> AsyncIterator[Browser]:
        settings.web.edit_interval = 0.02
        async with recorded_manager(settings, store, server, vision=vision) as manager:
            web = WebServer(create_app(manager, settings, Secrets()), "127.0.0.1", 0)
            await web.start()
            browser = Browser(web.url, manager)
            try:
                yield browser
            finally:
                await browser.close()
                await manager.shutdown()
                await web.close()

    return open_page


async def test_a_sent_picture_reaches_the_vision_model_and_again_on_regenerate(page, server: RecordingServer) -> None:
    async with page(vision=True) as browser:
        conversation = await browser.new()
        done = await (
            await browser.send_files(
                conversation, "what colour?", [("pasted.png", png((300, 200), (255, 0, 0)), "image/png")]
            )
        ).done()
        assert done["status"] == Status.COMPLETE and done["text"] == REPLY and done["notes"] == []
        again = await (await browser.redo(conversation, "regenerate", done["reply_id"])).done()
        assert again["status"] == Status.COMPLETE
        # A picture alone is a message too.
        alone = await (
            await browser.send_files(conversation, None, [("dropped.jpg", png((20, 20), (0, 0, 255)), "image/jpeg")])
        ).done()
        assert alone["status"] == Status.COMPLETE
        history = (await browser.conversation(conversation))["messages"]
        assert [(m["role"], m["content"], m["images"]) for m in history] == [
            ("user", "what colour?", ["pasted.png"]),
            ("assistant", REPLY, []),
            ("user", "", ["dropped.jpg"]),
            ("assistant", REPLY, []),
        ]  # the page shows a line for each image
    first, regenerated, third = server.requests()
    for request in (first, regenerated):
        user = request["body"]["messages"][-1]
        assert user["content"][0] == {"type": "text", "text": "what colour?"}
        [image] = sent_images(user)
        assert image.size == (300, 200) and image.getpixel((1, 1)) == (255, 0, 0)
    [image] = sent_images(third["body"]["messages"][-1])
    assert image.getpixel((1, 1)) == (0, 0, 255)


async def test_a_model_without_vision_says_it_cannot_see_the_picture(
    page, settings: Settings, server: RecordingServer
) -> None:
    settings.models = [ModelSettings(name="llava", url=server.base_url, vision=True)]
    async with page(vision=False) as browser:
        conversation = await browser.new()
        done = await (
            await browser.send_files(conversation, "and this?", [("cat.png", png((30, 30), (1, 2, 3)), "image/png")])
        ).done()
    assert done["text"] == REPLY and done["notes"] == [cannot_see_images(["llava"])]
    [request] = server.requests()
    assert request["body"]["messages"][-1]["content"] == f"and this?\n{image_unseen('cat.png')}"


async def test_too_big_too_many_and_too_many_pixels_each_get_a_line(
    page, settings: Settings, server: RecordingServer
) -> None:
    settings.images = ImageSettings(max_bytes=20_000, max_count=3, max_pixels=250_000)
    async with page(vision=True) as browser:
        conversation = await browser.new()
        status, info = await browser.call("GET", "/api/info")
        assert (info["max_images"], info["max_image_bytes"]) == (3, 20_000)
        done = await (
            await browser.send_files(
                conversation,
                "these?",
                [
                    ("ok.png", png((40, 40), (0, 255, 0)), "image/png"),
                    ("huge.bmp", bytes(20_001), "image/bmp"),  # the page sends no more than max_bytes + 1
                    ("wide.png", png((1000, 400), (0, 0, 0)), "image/png"),
                    ("fourth.png", b"", "image/png"),  # past the count the page sends it empty
                ],
            )
        ).done()
    assert done["notes"] == [
        "📎 I skipped huge.bmp: an image larger than 20 kB.",
        "📎 I skipped wide.png: an image of more than 0.25 megapixels.",
        "📎 I skipped fourth.png: only 3 images per message are read.",
    ]
    [request] = server.requests()
    assert [image.size for image in sent_images(request["body"]["messages"][-1])] == [(40, 40)]
