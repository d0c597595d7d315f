"""What the image tests share: a real picture made with Pillow, a manager whose model is the recording server
(a vision model or not), and the images a recorded request carried, decoded from their data URLs."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

from PIL import Image

from bot.app import open_engine
from bot.config import EngineSettings, Secrets, Settings
from bot.conversations import ConversationManager
from bot.store import Store
from tests.recording_server import RecordingServer

MODEL_ID = "llava-test"


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    """A PNG of one colour, as a screenshot would be sent."""
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


@contextlib.asynccontextmanager
async def recorded_manager(
    settings: Settings, store: Store, server: RecordingServer, *, vision: bool
) -> AsyncIterator[ConversationManager]:
    """A manager whose default model is ``server`` (``[engine] backend = "openai"``), reading images or not."""
    settings.engine = EngineSettings(
        backend="openai", base_url=server.base_url, model=MODEL_ID, n_ctx=4096, retry_seconds=1.0, vision=vision
    )
    engine = await open_engine(settings, Secrets())
    manager = ConversationManager(engine, store, settings)
    try:
        yield manager
    finally:
        await manager.shutdown()
        await engine.aclose()


def sent_images(message: dict[str, Any]) -> list[Image.Image]:
    """The images of one message of a recorded request, decoded from their ``image_url`` data URLs."""
    found = []
    for part in message["content"] if isinstance(message["content"], list) else []:
        if part["type"] == "image_url":
            head, _, data = part["image_url"]["url"].partition(",")
            assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
            found.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return found
