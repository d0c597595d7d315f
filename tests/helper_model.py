"""Fixtures for tests with a second model: the recording OpenAI-compatible server configured as "helper" beside
the small default model (import ``server`` and ``settings`` into the test module)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import ModelSettings, Settings
from tests.recording_server import RecordingServer

DEFAULT = "SmolLM2-135M-Instruct.Q4_1"  # the default model's name (its file's)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RecordingServer]:
    server = await RecordingServer(tmp_path, "remote-id").start()
    yield server
    await server.stop()


@pytest.fixture
def settings(settings: Settings, server: RecordingServer) -> Settings:
    """The small model as the default, and the recording server as "helper"."""
    settings.models = [
        ModelSettings(
            name="helper", description="the recording server", url=server.base_url, model="remote-id", n_ctx=2048
        )
    ]
    return settings
