"""The remote path for images: a user turn's images reach an OpenAI-compatible server as ``image_url`` parts
(data URLs), under the model id the registry names, with the key from the variable the config names. The
server is a real process that records what it received (no vision model can be downloaded here)."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from bot.config import ImageSettings, ModelSettings, SamplingSettings, Secrets, Settings
from bot.engine.remote import RemoteEngine
from bot.images import pruned_note, read_image
from bot.models import ModelRegistry
from bot.prompt import Prompt
from bot.types import ImagePart
from tests.recording_server import REPLY, RecordingServer

SAMPLING = SamplingSettings(max_tokens=16, temperature=0.0, seed=1)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, "llava-test", "text-only").start()
    yield server
    await server.stop()


async def picture(name: str, size: tuple[int, int], color: tuple[int, int, int]) -> ImagePart:
    image = Image.new("RGB", size, color)
    out = io.BytesIO()
    image.save(out, "PNG")
    part = await read_image(name, out.getvalue(), ImageSettings(), max_side=256)
    assert isinstance(part, ImagePart)
    return part


def registry_for(server: RecordingServer) -> ModelRegistry:
    settings = Settings(
        models=[
            ModelSettings(
                name="vision", url=server.base_url, model="llava-test", api_key_env="VISION_KEY", vision=True
            ),
            ModelSettings(name="plain", url=server.base_url, model="text-only"),
        ]
    )
    return ModelRegistry(settings, Secrets(), environ={"VISION_KEY": "k-123"})


async def test_a_user_turns_images_reach_the_vision_model_as_image_url_parts(server: RecordingServer) -> None:
    red = await picture("red.png", (640, 480), (255, 0, 0))
    blue = await picture("blue.png", (100, 100), (0, 0, 255))
    prompt = Prompt(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Earlier picture:"},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "What colours are these?"},
        ],
        tokens=[0] * 40,
        images={1: [pruned_note("old.png")], 3: [red, blue]},
    )
    registry = registry_for(server)
    try:
        async with registry.use("vision") as engine:
            assert isinstance(engine, RemoteEngine)
            generation = engine.submit(prompt, SAMPLING)
            text = "".join([event async for event in generation if isinstance(event, str)])
    finally:
        await registry.aclose()
    assert text == REPLY
    [received] = server.requests()
    assert received["authorization"] == "Bearer k-123"
    body = received["body"]
    assert body["model"] == "llava-test" and body["stream"] is True
    system, earlier, answer, last = body["messages"]
    assert system == {"role": "system", "content": "Be brief."} and answer == {"role": "assistant", "content": "Noted."}
    assert earlier["content"] == [
        {"type": "text", "text": "Earlier picture:"},
        {"type": "text", "text": "[An image, old.png, was here; it is no longer stored.]"},
    ]
    assert last["role"] == "user" and [part["type"] for part in last["content"]] == ["text", "image_url", "image_url"]
    assert last["content"][0]["text"] == "What colours are these?"
    sent = []
    for part in last["content"][1:]:
        url = part["image_url"]["url"]
        head, _, data = url.partition(",")
        assert head == "data:image/png;base64"
        sent.append(Image.open(io.BytesIO(base64.b64decode(data))))
    assert [image.size for image in sent] == [(256, 192), (100, 100)]  # scaled to the model's size
    assert sent[0].getpixel((10, 10)) == (255, 0, 0) and sent[1].getpixel((10, 10)) == (0, 0, 255)


async def test_each_server_model_is_asked_for_by_its_own_id_and_text_stays_plain(server: RecordingServer) -> None:
    registry = registry_for(server)
    prompt = Prompt(messages=[{"role": "user", "content": "Hello?"}], tokens=[0] * 10)
    try:
        for name in ("plain", "vision"):
            async with registry.use(name) as engine:
                generation = engine.submit(prompt, SAMPLING)
                assert "".join([event async for event in generation if isinstance(event, str)]) == REPLY
        assert not registry.get("plain").capabilities.vision and registry.get("vision").capabilities.vision
        assert registry.api_keys() == ["k-123"]  # for the log formatter to redact
    finally:
        await registry.aclose()
    plain, vision = server.requests()
    assert (plain["body"]["model"], plain["authorization"]) == ("text-only", None)
    assert (vision["body"]["model"], vision["authorization"]) == ("llava-test", "Bearer k-123")
    assert plain["body"]["messages"] == [{"role": "user", "content": "Hello?"}]  # no parts without images
