"""The remote engine against a real OpenAI-compatible server process (llama-cpp-python's ``llama_cpp.server``):
streaming, /stop, the line for request slots, an unreachable, killed or refusing server, and too-long prompts."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from adapters.ops.server import readiness
from bot.app import open_engine
from bot.config import EngineSettings, SamplingSettings, Secrets, Settings, load_settings
from bot.conversations import ConversationManager, ReplyResult
from bot.engine.base import renders_template
from bot.engine.remote import BYTES_PER_TOKEN, RemoteEngine, estimate_tokens
from bot.errors import ConfigError
from bot.store import Status, Store
from bot.types import SessionKey
from bot.wording import SERVER_RETRYING, queued_line
from tests.conversations.helpers import CHANNEL, Target, message
from tests.inference_server import InferenceServer, free_port

ROOT = Path(__file__).resolve().parents[2]
LONG = SamplingSettings(max_tokens=300, temperature=0.0, seed=1)
REPLY_TIMEOUT_SECONDS = 60.0


def remote_settings(settings: Settings, base_url: str, **engine: object) -> Settings:
    settings.engine = EngineSettings(backend="openai", base_url=base_url, n_ctx=2048, retry_seconds=3.0, **engine)  # type: ignore[arg-type]
    return settings


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InferenceServer]:
    server = await InferenceServer(tmp_path).start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def remote_manager(
    settings: Settings, store: Store, api_key: str | None = None
) -> AsyncIterator[ConversationManager]:
    engine = await open_engine(settings, Secrets(engine_api_key=api_key))
    assert isinstance(engine, RemoteEngine)
    manager = ConversationManager(engine, store, settings)
    try:
        yield manager
    finally:
        await manager.shutdown()
        await engine.aclose()


async def answer(manager: ConversationManager, text: str, target: Target | None = None) -> ReplyResult:
    async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
        return await manager.respond(message(text), target or Target())


async def test_a_reply_streams_from_the_server_and_is_stored(
    server: InferenceServer, settings: Settings, store: Store
) -> None:
    async with remote_manager(remote_settings(settings, server.base_url), store) as manager:
        assert manager.engine.model_name.endswith(".gguf")  # the server's own name for its model
        target = Target()
        first = await answer(manager, "My name is Ada. Say hello.", target)
        assert first.status == Status.COMPLETE and first.text.strip()
        assert target.messages[-1].startswith(first.text.strip()[:20])
        second = await answer(manager, "What is my name?")
        assert second.status == Status.COMPLETE
        history = await manager.history(CHANNEL)
        assert [m.content for m in history] == [
            "My name is Ada. Say hello.",
            first.text,
            "What is my name?",
            second.text,
        ]
        lines = dict(manager.status(CHANNEL).lines())
        assert lines["Model"] == manager.engine.model_name and "tokens/s" in lines["Speed"]
        assert "Device" not in lines  # the server knows where its model runs
        assert manager.metrics.registry.get_sample_value("llamarelay_engine_info", {"device": "server"}) == 1


async def test_stop_closes_the_stream_at_once(server: InferenceServer, settings: Settings, store: Store) -> None:
    settings.sampling = LONG
    async with remote_manager(remote_settings(settings, server.base_url), store) as manager:
        target = Target()
        reply = asyncio.create_task(answer(manager, "Write a very long story about a dragon.", target))
        async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
            await target.first_text.wait()
        stopped_at = time.monotonic()
        assert manager.stop(CHANNEL) == 1
        result = await reply
        assert time.monotonic() - stopped_at < 2.0
        assert result.status == Status.STOPPED and result.text.strip()
        # The server saw the client go (llama_cpp.server logs it) and serves the next request.
        async with asyncio.timeout(10):
            while "Disconnected from client" not in server.log():
                await asyncio.sleep(0.1)
        settings.sampling = SamplingSettings(max_tokens=8, temperature=0.0)
        assert (await answer(manager, "Hello?")).status == Status.COMPLETE


async def test_requests_beyond_max_requests_wait_and_learn_their_place(
    server: InferenceServer, settings: Settings, store: Store
) -> None:
    settings.sampling = SamplingSettings(max_tokens=48, temperature=0.0)
    async with remote_manager(remote_settings(settings, server.base_url, max_requests=1), store) as manager:
        targets = [Target() for _ in range(3)]
        replies = [
            asyncio.create_task(
                manager.respond(message(f"Count to {n}.", SessionKey.for_channel("discord", "g", f"c{n}")), target)
            )
            for n, target in enumerate(targets)
        ]
        async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
            results = await asyncio.gather(*replies)
        assert [r.status for r in results] == [Status.COMPLETE] * 3
        shown = [text for _, text in targets[2].calls]
        assert queued_line(2) in shown or queued_line(1) in shown  # (statuses shown briefly may be coalesced)
        assert manager.engine.status().running == 0 and manager.engine.status().queue_length == 0


async def test_an_unreachable_server_is_retried_then_reported_and_the_bot_recovers(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    port = free_port()
    down = InferenceServer(tmp_path, port=port)
    async with remote_manager(remote_settings(settings, down.base_url), store) as manager:
        assert (await readiness(manager))["engine"].startswith("model server")
        target = Target()
        result = await answer(manager, "Is anyone there?", target)
        assert result.status == Status.FAILED and "unreachable" in result.notes[-1]
        assert SERVER_RETRYING in [text for _, text in target.calls]
        assert "unreachable" in target.messages[-1] and "saved" in target.messages[-1]
        await down.start()
        try:
            assert (await readiness(manager))["engine"] == "ok"
            again = await answer(manager, "And now?")
            assert again.status == Status.COMPLETE and again.text.strip()
            history = await manager.history(CHANNEL)  # the first message stayed stored
            assert [m.content for m in history if m.role == "user"] == ["Is anyone there?", "And now?"]
        finally:
            await down.stop()


async def test_a_server_killed_mid_stream_keeps_what_was_shown(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    port = free_port()
    server = await InferenceServer(tmp_path, port=port).start()
    settings.sampling = LONG
    try:
        async with remote_manager(remote_settings(settings, server.base_url), store) as manager:
            target = Target()
            reply = asyncio.create_task(answer(manager, "Write a very long story about a dragon.", target))
            async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
                await target.first_text.wait()
            await server.kill()
            result = await reply
            assert result.status == Status.FAILED and "stopped in the middle" in result.notes[-1]
            [stored] = [m for m in await manager.history(CHANNEL) if m.role == "assistant"]
            assert stored.content == result.text and result.text.strip()
            assert target.messages[-1].startswith(result.text.strip()[:10])
            await server.start()  # back on the same port: the bot carries on by itself
            settings.sampling = SamplingSettings(max_tokens=8, temperature=0.0)
            assert (await answer(manager, "Are you back?")).status == Status.COMPLETE
    finally:
        await server.stop()


async def test_a_prompt_the_server_finds_too_long_is_sent_again_with_fewer_turns(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    server = await InferenceServer(tmp_path, n_ctx=512).start()  # the bot believes it has 2048 tokens
    settings.sampling = SamplingSettings(max_tokens=16, temperature=0.0)
    try:
        async with remote_manager(remote_settings(settings, server.base_url), store) as manager:
            for n in range(6):  # about 1,500 tokens of history
                _, reply_id = await store.add_exchange(
                    str(CHANNEL), f"Fact {n}: " + "the sky is blue. " * 40, author_id="u1", author_name="user u1"
                )
                await store.finish_message(reply_id, f"I will remember fact {n}. " * 10, Status.COMPLETE)
            result = await answer(manager, "Hello! Please greet me.")
            assert result.status == Status.COMPLETE and result.text.strip()
            assert "exceed context window of 512" in server.log()  # it was refused first, then sent shorter
            alone = await answer(manager, "word " * 1500)  # too long for the server even without any turns:
            assert "only its first" in alone.notes[0]  # it was cut to fit, and the user is told
    finally:
        await server.stop()


async def test_the_api_key_comes_from_the_environment_and_a_wrong_one_is_said(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    server = await InferenceServer(tmp_path, api_key="s3cret-key").start()
    try:
        remote_settings(settings, server.base_url)
        async with remote_manager(settings, store, api_key="wrong") as manager:
            refused = await answer(manager, "Hello?")
            assert refused.status == Status.FAILED and "API key" in refused.notes[-1]
            assert "s3cret" not in refused.notes[-1] and "wrong" not in refused.notes[-1]
        async with remote_manager(settings, store, api_key="s3cret-key") as manager:
            assert (await answer(manager, "Hello?")).status == Status.COMPLETE
        assert "s3cret-key" in Secrets.from_env({"LLAMARELAY_ENGINE_API_KEY": "s3cret-key"}).values()
    finally:
        await server.stop()


def test_the_openai_backend_needs_a_base_url(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[engine]\nbackend = "openai"\n')
    with pytest.raises(ConfigError, match="base_url"):
        load_settings(config)
    config.write_text('[engine]\nbackend = "openai"\nbase_url = "127.0.0.1:8080"\n')
    with pytest.raises(ConfigError, match="http"):
        load_settings(config)
    config.write_text('[engine]\nbackend = "openai"\nbase_url = "http://127.0.0.1:8080/v1"\n[api]\nenabled = true\n')
    with pytest.raises(ConfigError, match="model server itself"):
        load_settings(config)


def test_the_remote_backend_never_loads_llama_cpp() -> None:
    # The bot, its adapters and a remote engine opened as start-up opens it: llama.cpp stays out of the process.
    script = f"""
import asyncio, sys
import adapters.ops, adapters.openai_api, adapters.web, bot.app
from bot.app import open_engine
from bot.config import EngineSettings, Secrets, Settings

async def main():
    settings = Settings()
    settings.engine = EngineSettings(backend="openai", base_url="http://127.0.0.1:{free_port()}/v1",
                                     connect_timeout=0.5)
    engine = await open_engine(settings, Secrets())
    engine.status()
    await engine.aclose()

asyncio.run(main())
print(sorted(name for name in sys.modules if name.startswith("llama_cpp")))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "[]"


@pytest.mark.parametrize("module", ["bot.engine.remote", "bot.engine", "bot.conversations"])
def test_importing_the_remote_backend_or_the_core_does_not_import_llama_cpp(module: str) -> None:
    script = (
        f"import sys, {module}\n"
        "loaded = sorted(name for name in sys.modules if name.startswith('llama_cpp'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_remote_engine_says_the_server_renders_the_template() -> None:
    engine = RemoteEngine(EngineSettings(backend="openai", base_url="http://127.0.0.1:9/v1"))
    assert engine.renders_template is False and not renders_template(engine)
    assert not hasattr(engine, "chat_template")  # no sentinel template: the capability says it


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.text())
def test_the_estimate_never_counts_fewer_tokens_than_bytes_allow_and_gives_the_text_back(text: str) -> None:
    engine = RemoteEngine(EngineSettings(backend="openai", base_url="http://127.0.0.1:9/v1"))
    tokens = estimate_tokens(text)
    size = len(text.encode("utf-8", "replace"))
    assert len(tokens) * BYTES_PER_TOKEN >= size > (len(tokens) - 1) * BYTES_PER_TOKEN
    assert engine.detokenize(tokens) == text.encode("utf-8", "replace").decode("utf-8")


class ClosingKeepAlive:
    """A server on 127.0.0.1 that answers the first request of each connection with a short chat completion
    stream, keeps the connection open, and drops it when a second request arrives on it: what a server whose
    keep-alive ran out does to a client that reuses the connection at that moment."""

    REPLY = (
        b'data: {"choices":[{"delta":{"content":"Hello there."}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )

    def __init__(self) -> None:
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for served in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if served:
                    self.dropped += 1
                    break
                body = self.REPLY if head.startswith(b"POST") else b'{"data": [{"id": "model.gguf"}]}'
                kind = b"text/event-stream" if head.startswith(b"POST") else b"application/json"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: "
                    + kind
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: keep-alive\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_a_pooled_connection_the_server_closed_is_retried_at_once_not_reported_as_an_outage(
    settings: Settings, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    server = ClosingKeepAlive()
    url = await server.start()
    try:
        async with remote_manager(remote_settings(settings, url), store) as manager:
            for text in ("Hello?", "And again?"):  # each request meets a connection the server drops
                target = Target()
                result = await answer(manager, text, target)
                assert result.status == Status.COMPLETE and result.text == "Hello there."
                assert SERVER_RETRYING not in [shown for _, shown in target.calls]
        assert server.dropped >= 2
        assert "unavailable" not in caplog.text
    finally:
        await server.stop()
