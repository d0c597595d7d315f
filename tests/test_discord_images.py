"""Pictures posted in Discord: real discord.py against tests/fake_discord/ (which serves the attachments over
HTTP). A vision model (the recording server process) receives them as ``image_url`` parts, again on
Regenerate; the real small model, which has no vision, answers with a note; the limits each give a line."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot.config import ImageSettings, ModelSettings, Settings
from bot.conversations import ConversationManager
from bot.store import Store
from bot.wording import cannot_see_images, image_unseen
from tests.fake_discord import BOB_ID, FakeDiscord
from tests.pictures import MODEL_ID, png, recorded_manager, sent_images
from tests.recording_server import REPLY, RecordingServer
from tests.test_discord import CHANNEL_KEY, StartBot, _stop, dsettings, fake, force_reply, start_bot, stored  # noqa: F401
from tests.test_discord_controls import answer_to


async def ready(manager: ConversationManager, start_bot: StartBot) -> asyncio.Task[None]:
    """The bot started with ``manager``, once Discord's ready event has run (a quick test ends sooner)."""
    bot = await start_bot(manager)
    await asyncio.wait_for(_until(lambda: manager.platforms.status().get("discord")), 30)
    return bot


async def _until(condition: Callable[[], object]) -> None:
    while not condition():
        await asyncio.sleep(0.02)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, MODEL_ID).start()
    yield server
    await server.stop()


async def test_a_posted_picture_reaches_the_vision_model_and_again_on_regenerate(
    fake: FakeDiscord, dsettings: Settings, store: Store, server: RecordingServer, start_bot: StartBot
) -> None:
    async with recorded_manager(dsettings, store, server, vision=True) as manager:
        bot = await ready(manager, start_bot)
        mid = await fake.message_create("what colour?", files=[("red.png", png((300, 200), (255, 0, 0)), "image/png")])
        first = await fake.wait_for(lambda: answer_to(fake, mid, REPLY), "the answer")
        [image_id] = [int(a["id"]) for a in fake.messages[mid]["attachments"]]
        assert fake.downloads == [image_id]
        await fake.press(int(first["id"]), "Regenerate", user_id=BOB_ID)
        await fake.wait_for(
            lambda: (
                len(server.requests()) == 2
                and len(fake.replies_to(int(first["id"]))) == 1
                and answer_to(fake, int(first["id"]), REPLY)
            ),
            "the regenerated answer",
        )
        [question, _] = await stored(manager, CHANNEL_KEY)
        await _stop(bot)  # before its manager shuts down
    assert question.content == "what colour?"
    for request in server.requests():
        user = request["body"]["messages"][-1]
        assert user["content"][0] == {"type": "text", "text": "Alice: what colour?"}
        [image] = sent_images(user)
        assert image.size == (300, 200) and image.getpixel((1, 1)) == (255, 0, 0)


async def test_the_small_model_without_vision_answers_and_says_it_cannot_see(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, CHANNEL_KEY, "A picture.")
    await start_bot()
    mid = await fake.message_create("look", files=[("cat.jpg", png((64, 64), (9, 9, 9)), "image/jpeg")])
    await fake.final_reply(mid, f"A picture.\n\n{cannot_see_images([])}")
    [question, _] = await stored(manager, CHANNEL_KEY)
    assert question.content == "look"  # the picture is stored beside it, for a model that sees
    assert [image.name for image in (await manager.store.images([question.id]))[question.id]] == ["cat.jpg"]
    assert image_unseen("cat.jpg").startswith("[An image, cat.jpg")


async def test_too_big_too_many_and_too_many_pixels_each_get_a_line(
    fake: FakeDiscord, dsettings: Settings, store: Store, server: RecordingServer, start_bot: StartBot
) -> None:
    dsettings.images = ImageSettings(max_bytes=20_000, max_count=3, max_pixels=250_000)
    dsettings.models = [ModelSettings(name="other", url=server.base_url)]
    async with recorded_manager(dsettings, store, server, vision=True) as manager:
        bot = await ready(manager, start_bot)
        mid = await fake.message_create(
            "these?",
            files=[
                ("ok.png", png((40, 40), (0, 255, 0)), "image/png"),
                ("huge.bmp", bytes(30_000), "image/bmp"),  # larger than max_bytes, by its reported size
                ("wide.png", png((1000, 400), (0, 0, 0)), "image/png"),  # 400,000 pixels
                ("fourth.png", png((10, 10), (1, 1, 1)), "image/png"),  # past max_count
            ],
        )
        expected = (
            f"{REPLY}\n\n📎 I skipped huge.bmp: an image larger than 20 kB.\n"
            "📎 I skipped wide.png: an image of more than 0.25 megapixels.\n"
            "📎 I skipped fourth.png: only 3 images per message are read."
        )
        await fake.final_reply(mid, expected)
        ids = {a["filename"]: int(a["id"]) for a in fake.messages[mid]["attachments"]}
        await stored(manager, CHANNEL_KEY)
        await _stop(bot)  # before its manager shuts down
    assert sorted(fake.downloads) == sorted([ids["ok.png"], ids["wide.png"]])  # the others judged unread
    [request] = server.requests()
    assert [image.size for image in sent_images(request["body"]["messages"][-1])] == [(40, 40)]
