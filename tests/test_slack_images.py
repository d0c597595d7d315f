"""Pictures shared in Slack: fetched from ``url_private`` with the bot token (only from Slack's own host; a
foreign host is refused with a line), through the real slack-bolt app against tests/fake_slack.py. A vision
model (the recording server process) receives them as ``image_url`` parts, again on Regenerate; a model
without vision answers with a note; the limits each give a line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.slack.blocks import REGENERATE
from adapters.slack.mrkdwn import to_mrkdwn
from bot.config import ImageSettings, ModelSettings
from bot.wording import cannot_see_images, image_unseen
from tests.fake_slack import BOT_USER_ID, FakeSlack
from tests.pictures import MODEL_ID, png, recorded_manager, sent_images
from tests.recording_server import REPLY, RecordingServer
from tests.slack_helpers import REPLY_TIMEOUT_SECONDS, answered, channel_key, fake, running_bot, settled
from tests.test_slack_controls import press, shown

__all__ = ["fake"]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, MODEL_ID).start()
    yield server
    await server.stop()


async def test_a_shared_picture_reaches_the_vision_model_and_again_on_regenerate(
    settings, store, fake: FakeSlack, server: RecordingServer
) -> None:
    picture = fake.add_file("red.png", png((300, 200), (255, 0, 0)), "image/png")
    async with (
        recorded_manager(settings, store, server, vision=True) as manager,
        running_bot(manager, settings, fake) as bot,
    ):
        event = fake.user_message("C1", f"<@{BOT_USER_ID}> what colour?", files=[picture])
        await fake.push_event({**event, "type": "app_mention"})
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])
        assert shown(reply) == REPLY and fake.downloads == ["red.png"]
        await press(fake, reply, REGENERATE)
        await fake.wait_for(
            lambda: len(server.requests()) == 2, timeout=REPLY_TIMEOUT_SECONDS, what="the regenerated request"
        )
        await settled(bot)
        [asked] = [m for m in await manager.history(channel_key("C1", event["ts"])) if m.role == "user"]
    assert asked.content == "what colour?"
    for request in server.requests():
        user = request["body"]["messages"][-1]
        [image] = sent_images(user)
        assert image.size == (300, 200) and image.getpixel((1, 1)) == (255, 0, 0)


async def test_a_picture_on_a_foreign_host_is_refused_and_a_model_without_vision_says_so(
    settings, store, fake: FakeSlack, server: RecordingServer
) -> None:
    settings.models = [ModelSettings(name="llava", url=server.base_url, vision=True)]
    here = fake.add_file("cat.png", png((50, 50), (0, 0, 0)), "image/png")
    elsewhere = fake.add_file("dog.png", png((50, 50), (9, 9, 9)), "image/png")
    elsewhere["url_private_download"] = elsewhere["url_private"].replace("127.0.0.1", "localhost")
    async with (
        recorded_manager(settings, store, server, vision=False) as manager,
        running_bot(manager, settings, fake) as bot,
    ):
        await fake.push_event(fake.user_message("D1", "what are these?", user="U2", files=[here, elsewhere]))
        [reply] = await answered(bot, fake, "D1")
    assert fake.downloads == ["cat.png"]  # the bot token never went to the other host
    assert shown(reply) == to_mrkdwn(
        f"{REPLY}\n\n📎 I skipped dog.png: not stored on Slack.\n{cannot_see_images(['llava'])}"
    )
    [request] = server.requests()
    assert request["body"]["messages"][-1] == {"role": "user", "content": f"what are these?\n{image_unseen('cat.png')}"}


async def test_too_big_too_many_and_too_many_pixels_each_get_a_line(
    settings, store, fake: FakeSlack, server: RecordingServer
) -> None:
    settings.images = ImageSettings(max_bytes=20_000, max_count=3, max_pixels=250_000)
    files = [
        fake.add_file("ok.png", png((40, 40), (0, 255, 0)), "image/png"),
        fake.add_file("huge.png", png((10, 10), (0, 0, 0)), "image/png", size=30_000),  # by Slack's size
        fake.add_file("wide.png", png((1000, 400), (0, 0, 0)), "image/png"),  # 400,000 pixels
        fake.add_file("fourth.png", png((10, 10), (1, 1, 1)), "image/png"),
    ]  # past max_count
    async with (
        recorded_manager(settings, store, server, vision=True) as manager,
        running_bot(manager, settings, fake) as bot,
    ):
        await fake.push_event(fake.user_message("D1", "these?", user="U2", files=files))
        [reply] = await answered(bot, fake, "D1")
    assert shown(reply) == to_mrkdwn(
        f"{REPLY}\n\n📎 I skipped huge.png: an image larger than 20 kB.\n"
        "📎 I skipped wide.png: an image of more than 0.25 megapixels.\n"
        "📎 I skipped fourth.png: only 3 images per message are read."
    )
    assert sorted(fake.downloads) == ["ok.png", "wide.png"]
    [request] = server.requests()
    assert [image.size for image in sent_images(request["body"]["messages"][-1])] == [(40, 40)]
