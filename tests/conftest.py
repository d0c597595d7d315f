"""Shared fixtures: the real engine with the small default model, a fresh store, a ConversationManager."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.engine.threads import configure_openmp

configure_openmp()  # before llama.cpp loads, as the command line does

from bot.config import EngineSettings, SamplingSettings, Settings  # noqa: E402
from bot.conversations import ConversationManager  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.store import Store, open_store  # noqa: E402
from tests.postgres import Cluster  # noqa: E402

MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tests talk only to 127.0.0.1; a proxy variable would send slack-sdk's requests elsewhere.
for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(variable, None)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The real llama.cpp engine, loaded once for the whole run (like the bot's one process-wide engine).

    One thread leaves the other core to the event loop and the fake servers: two llama.cpp threads that
    spin-wait for each other slow down several times over as soon as anything else wants the CPU.
    """
    assert MODEL_PATH.is_file(), f"{MODEL_PATH} is missing: run `make test` (it fetches the model)"
    engine = Engine(EngineSettings(model_path=MODEL_PATH, n_ctx=2048, n_threads=1, parallel=2, max_queue=16))
    yield engine
    engine.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Defaults, with short greedy replies so tests are quick and repeatable, and a store in tmp_path."""
    settings = Settings()
    settings.engine.model_path = MODEL_PATH
    settings.store.path = tmp_path / "llamarelay.sqlite3"
    settings.sampling = SamplingSettings(max_tokens=24, temperature=0.0, seed=1)
    return settings


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    store = await open_store(settings.store.path)
    yield store
    await store.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A PostgreSQL server started for this test run (only when a test asks for it), removed afterwards."""
    cluster = Cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
async def postgres_url(postgres: Cluster) -> str:
    """The URL of a new, empty PostgreSQL database on the test cluster."""
    return await postgres.database()


@pytest.fixture
async def manager(engine: Engine, store: Store, settings: Settings) -> AsyncIterator[ConversationManager]:
    manager = ConversationManager(engine, store, settings)
    yield manager
    await manager.shutdown()
