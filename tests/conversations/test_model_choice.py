"""/model in the manager: a conversation's model is its own (a thread inherits its channel's), stored, kept over
a restart; each reply runs on it (loaded on first use), records it, and says so under the reply when it is not
the default; a model that cannot answer fails alone, naming itself. Real llama.cpp (the small model under a
second name) and a real recording server process as the third model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import ImageSettings, ModelSettings, Settings
from bot.conversations import ConversationManager, ReplyResult
from bot.engine import Engine
from bot.errors import LlamarelayError
from bot.images import read_image
from bot.models import unavailable_line
from bot.store import Status, Store
from bot.types import ImagePart, Incoming, SessionKey
from bot.wording import answered_by, cannot_see_images, unknown_model
from tests.conftest import MODEL_PATH
from tests.conversations.helpers import CHANNEL, Target, message
from tests.helper_model import server  # noqa: F401
from tests.pictures import png, sent_images
from tests.recording_server import REPLY, RecordingServer

DEFAULT = MODEL_PATH.stem
OTHER_CHANNEL = SessionKey.for_channel("test", "guild1", "chan2")
THREAD = SessionKey.for_channel("test", "guild1", "chan2", "thread9")
TIMEOUT_SECONDS = 60.0


@pytest.fixture
def model_settings(settings: Settings, server: RecordingServer, tmp_path: Path) -> Settings:
    """The small model as the default, again as "second" (embedded), the recording server as "remote", and a
    "broken" model whose file is no GGUF. Only "remote" reads images."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model")
    settings.engine.n_threads, settings.engine.n_ctx = 1, 2048
    settings.engine.retry_seconds = 1.0  # a server that is down fails within a second (the models inherit it)
    settings.models = [
        ModelSettings(name="second", path=MODEL_PATH, n_ctx=1024, kv_pool_mb=24),
        ModelSettings(name="remote", url=server.base_url, model="remote-id", n_ctx=2048, vision=True),
        ModelSettings(name="broken", path=broken, kv_pool_mb=24),
    ]
    return settings


async def reply(manager: ConversationManager, key: SessionKey, text: str) -> ReplyResult:
    async with asyncio.timeout(TIMEOUT_SECONDS):
        return await manager.respond(message(text, key), Target())


async def force(manager: ConversationManager, key: SessionKey, text: str) -> None:
    """Make the embedded models write exactly ``text`` in ``key`` (a grammar: sampling, not the model)."""
    await manager.set_sampling(key, grammar=f'root ::= "{text}"', max_tokens=len(text) + 8)


async def test_a_channel_switched_to_another_model_is_answered_by_it_and_keeps_it_over_a_restart(
    engine: Engine, store: Store, model_settings: Settings, server: RecordingServer
) -> None:
    first = ConversationManager(engine, store, model_settings)
    try:
        await force(first, CHANNEL, "from the default")
        await force(first, OTHER_CHANNEL, "from the second")
        assert (await first.set_model(OTHER_CHANNEL, "SECOND")).name == "second"  # any case; stored as configured
        assert first.models.find("second").engine is None  # type: ignore[union-attr]  # not loaded until used

        kept = await reply(first, CHANNEL, "hello")
        switched = await reply(first, OTHER_CHANNEL, "hello")
        assert (kept.status, kept.text, kept.notes) == (Status.COMPLETE, "from the default", [])
        assert (switched.status, switched.text) == (Status.COMPLETE, "from the second")
        assert switched.notes == [answered_by("second")]  # the footer names a model other than the default
        assert first.models.find("second").engine is not None  # type: ignore[union-attr]
        assert [m.model for m in await first.history(CHANNEL)] == ["", DEFAULT]
        assert [m.model for m in await first.history(OTHER_CHANNEL)] == ["", "second"]

        # A thread inherits its channel's model until it picks its own.
        assert (await reply(first, THREAD, "in a thread")).notes == [answered_by("second")]
        await first.set_model(THREAD, "remote")
        remote = await reply(first, THREAD, "and now?")
        assert (remote.text, remote.notes) == (REPLY, [answered_by("remote")])
        assert server.requests()[-1]["body"]["model"] == "remote-id"
        assert (await first.model(OTHER_CHANNEL)).name == "second"
        status = await first.conversation_status(OTHER_CHANNEL)
        assert ("Model", "second") in status.lines()
    finally:
        await first.shutdown()

    restarted = ConversationManager(engine, store, model_settings)  # a new process: models loaded afresh
    try:
        assert ("Model", "second (loads on its next reply)") in (
            await restarted.conversation_status(OTHER_CHANNEL)
        ).lines()
        again = await reply(restarted, OTHER_CHANNEL, "still you?")
        assert (again.text, again.notes) == ("from the second", [answered_by("second")])
        assert (await reply(restarted, CHANNEL, "and you?")).notes == []
        assert (await restarted.model(THREAD)).name == "remote"
        default_status = dict((await restarted.conversation_status(CHANNEL)).lines())
        assert default_status["Model"] == engine.model_name  # the default model's own name, as before /model
    finally:
        await restarted.shutdown()
    assert len(server.requests()) == 1  # the restart's replies never went to the server model


async def test_a_model_that_cannot_load_fails_alone_and_says_which(
    engine: Engine, store: Store, model_settings: Settings
) -> None:
    manager = ConversationManager(engine, store, model_settings)
    try:
        await manager.set_model(OTHER_CHANNEL, "broken")
        failed = await reply(manager, OTHER_CHANNEL, "hello")
        assert failed.status == Status.FAILED and failed.text == ""
        [line] = failed.notes
        assert line.startswith("⚠️ The model broken is unavailable:") and line.endswith("Try /model to pick another.")
        await force(manager, CHANNEL, "still here")
        fine = await reply(manager, CHANNEL, "hello")  # the default is unaffected
        assert (fine.status, fine.text) == (Status.COMPLETE, "still here")
        await manager.set_model(OTHER_CHANNEL, "second")  # and the conversation recovers by picking another
        assert (await reply(manager, OTHER_CHANNEL, "again")).status == Status.COMPLETE
    finally:
        await manager.shutdown()


async def test_a_remote_model_that_is_down_names_itself(
    engine: Engine, store: Store, model_settings: Settings, server: RecordingServer
) -> None:
    manager = ConversationManager(engine, store, model_settings)
    await server.stop()
    try:
        await manager.set_model(CHANNEL, "remote")
        await manager.set_sampling(CHANNEL, max_tokens=8)
        failed = await reply(manager, CHANNEL, "anyone there?")
        assert failed.status == Status.FAILED
        assert failed.notes[0].startswith("⚠️ The model remote is unavailable:"), failed.notes
        assert "Try /model to pick another." in failed.notes[0]
    finally:
        await manager.shutdown()


async def test_an_unknown_model_is_refused_with_a_line_that_names_it(
    manager: ConversationManager, settings: Settings
) -> None:
    with pytest.raises(LlamarelayError) as refused:
        await manager.set_model(CHANNEL, "gpt-9")
    assert str(refused.value) == unknown_model("gpt-9", [DEFAULT])
    assert (await manager.model(CHANNEL)).name == DEFAULT


async def test_a_stored_choice_no_longer_configured_fails_with_the_models_line(
    manager: ConversationManager, store: Store
) -> None:
    await store.set_model(str(CHANNEL), "retired")  # chosen under an older config
    failed = await reply(manager, CHANNEL, "hello")
    assert failed.status == Status.FAILED
    assert failed.notes == [f"⚠️ {unavailable_line('retired', f'there is no such model (these are: {DEFAULT})')}"]


async def test_images_go_only_to_the_model_that_reads_them(
    engine: Engine, store: Store, model_settings: Settings, server: RecordingServer
) -> None:
    red = await read_image("red.png", png((64, 48), (255, 0, 0)), ImageSettings(), 1024)
    assert isinstance(red, ImagePart)
    manager = ConversationManager(engine, store, model_settings)
    try:
        await force(manager, CHANNEL, "I cannot tell.")
        async with asyncio.timeout(TIMEOUT_SECONDS):
            blind = await manager.respond(Incoming(CHANNEL, "u1", "Ann", "What colour?", images=(red,)), Target())
        assert (blind.text, blind.notes) == ("I cannot tell.", [cannot_see_images(["remote"])])
        assert server.requests() == []
        await manager.set_model(CHANNEL, "remote")
        seeing = await reply(manager, CHANNEL, "And now, what colour was it?")
        assert (seeing.text, seeing.notes) == (REPLY, [answered_by("remote")])
    finally:
        await manager.shutdown()
    [request] = server.requests()
    earlier = request["body"]["messages"][1]  # the picture's turn, in the history the new model reads
    assert [part["type"] for part in earlier["content"]] == ["text", "image_url"]
    assert [image.getpixel((5, 5)) for image in sent_images(earlier)] == [(255, 0, 0)]
