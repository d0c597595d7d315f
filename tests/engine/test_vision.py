"""The embedded engine reads images through llama.cpp's mtmd: the small model with a tiny random-weight mmproj
(tests/tiny_vision.py), real images made with Pillow. An image's positions reach the decode, the reply streams,
its KV is reused by the conversation's next turn and the state cache like text, and another image shares none."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from PIL import Image

from bot.config import EngineSettings, ModelSettings, SamplingSettings, Settings
from bot.engine import Engine, FinishReason, Generation
from bot.engine.vision import stand_ins
from bot.errors import EngineError, ModelLoadError
from bot.models import ModelRegistry, ModelUnavailable
from bot.prompt import Prompt
from bot.types import ImagePart
from tests.conftest import MODEL_PATH
from tests.tiny_vision import IMAGE_TOKENS, write_tiny_mmproj

GREEDY = SamplingSettings(max_tokens=8, temperature=0.0)
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is in this picture?"}]


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mmproj(tmp_path_factory.mktemp("vision") / "mmproj-tiny.gguf")


def vision_engine(mmproj: Path, **settings: Any) -> Engine:
    return Engine(EngineSettings(model_path=MODEL_PATH, mmproj=mmproj, n_ctx=512, n_threads=1, **settings))


@pytest.fixture(scope="module")
def engine(mmproj: Path) -> Iterator[Engine]:
    engine = vision_engine(mmproj, parallel=2)
    yield engine
    engine.close()


def picture(image: Image.Image, name: str = "photo.png") -> ImagePart:
    """A real PNG, as bot.images stores one."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return ImagePart(name, "image/png", buffer.getvalue(), image.width, image.height)


RED, BLUE = picture(Image.new("RGB", (80, 60), (220, 30, 30))), picture(Image.new("RGB", (80, 60), (30, 30, 220)))
NOISE = picture(Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)))


def with_images(engine: Engine, messages: list[dict[str, str]], images: dict[int, list[ImagePart | str]]) -> Prompt:
    """A prompt as the conversation manager builds it: its tokens are the text's, its images beside them."""
    return Prompt(messages, engine.chat_tokens(messages), images=images)


async def read(generation: Generation) -> str:
    """The reply, checking that it streams as text deltas."""
    deltas = [event async for event in generation if isinstance(event, str)]
    assert deltas and all(deltas), "the reply streams in text deltas"
    return "".join(deltas)


def image_runs(tokens: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of image positions (negative stand-in ids) in a prompt."""
    runs: list[tuple[int, int]] = []
    for i, token in enumerate(tokens):
        if token < 0:
            if runs and runs[-1][0] + runs[-1][1] == i and token == tokens[i - 1] - 1:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    return runs


def slot_of(engine: Engine, session: str) -> Any:
    return next(slot for slot in engine.kv.slots if slot.session == session)


async def test_an_images_positions_reach_the_decode_and_the_reply_streams(engine: Engine) -> None:
    assert engine.sees_images
    prompt = with_images(engine, QUESTION, {1: [RED]})
    generation = engine.submit(prompt, GREEDY, session="look")
    reply = await read(generation)
    assert generation.finish_reason is FinishReason.LENGTH
    # The prompt the model read: the text's tokens plus the image's 16 positions (and the line before it).
    ((start, length),) = image_runs(generation.prompt)
    assert engine.vision is not None
    assert length == IMAGE_TOKENS
    assert generation.prompt[start : start + length] == stand_ins(RED.data, IMAGE_TOKENS, engine.vision.identity)
    assert len(generation.prompt) == len(prompt.tokens) + IMAGE_TOKENS + 1
    # llama.cpp's own KV sequence holds every position: the text after the image came after its 16.
    slot = slot_of(engine, "look")
    assert len(slot.cached) == len(generation.prompt) + generation.n_generated - 1
    memory = llama_cpp.llama_get_memory(engine._ctx)
    assert llama_cpp.llama_memory_seq_pos_max(memory, slot.seq_id) == len(slot.cached) - 1
    # The picture itself reaches the model: another picture, another reply.
    blue = await read(engine.submit(with_images(engine, QUESTION, {1: [BLUE]}), GREEDY, session="look-2"))
    noise = await read(engine.submit(with_images(engine, QUESTION, {1: [NOISE]}), GREEDY, session="look-3"))
    assert len({reply, blue, noise}) == 3


async def test_the_next_turn_reuses_the_images_kv_and_answers_as_a_fresh_read_would(
    engine: Engine, mmproj: Path
) -> None:
    first = engine.submit(with_images(engine, QUESTION, {1: [RED]}), GREEDY, session="ann")
    reply = await read(first)
    ((start, length),) = image_runs(first.prompt)
    turn2 = QUESTION + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And its colour?"}]
    second = engine.submit(with_images(engine, turn2, {1: [RED]}), GREEDY, session="ann")
    text = await read(second)
    assert second.prompt[: len(first.prompt)] == first.prompt  # the same image, the same ids: a common prefix
    assert second.n_prompt_reused >= len(first.prompt) - 1 > start + length  # the image was not read again

    fresh = await asyncio.to_thread(vision_engine, mmproj, parallel=1)
    try:
        again = fresh.submit(with_images(fresh, turn2, {1: [RED]}), GREEDY)
        assert await read(again) == text and again.n_prompt_reused == 0
    finally:
        await fresh.aclose()


async def test_an_image_prompt_is_read_in_chunks_beside_a_streaming_reply_and_answers_as_alone(
    engine: Engine, mmproj: Path
) -> None:
    long = SamplingSettings(max_tokens=400, temperature=0.0, grammar='root ::= ("la " ){400}')
    singing = engine.submit(
        Prompt(
            QUESTION[:1] + [{"role": "user", "content": "Sing."}],
            engine.chat_tokens(QUESTION[:1] + [{"role": "user", "content": "Sing."}]),
        ),
        long,
        session="singer",
    )
    async for event in singing:
        if isinstance(event, str):
            break
    # ~250 tokens of text before the image: read a chunk per step beside the song, then the image, then the rest.
    messages = [QUESTION[0], {"role": "user", "content": "Look: " + " ".join(f"detail{i}" for i in range(80))}]
    looked = singing.n_generated
    generation = engine.submit(with_images(engine, messages, {1: [NOISE]}), GREEDY, session="beside")
    text = await read(generation)
    assert singing.n_generated > looked and singing.finish_reason is None  # the song went on meanwhile
    singing.cancel()
    ((start, _),) = image_runs(generation.prompt)
    assert start > 200
    fresh = await asyncio.to_thread(vision_engine, mmproj, parallel=1)
    try:
        assert await read(fresh.submit(with_images(fresh, messages, {1: [NOISE]}), GREEDY)) == text
    finally:
        await fresh.aclose()


async def test_two_different_images_share_no_prefix(engine: Engine) -> None:
    green, yellow = (picture(Image.new("RGB", (80, 60), color)) for color in ((30, 200, 30), (230, 230, 20)))
    first = engine.submit(with_images(engine, QUESTION, {1: [green]}), GREEDY, session="green")
    await read(first)
    second = engine.submit(with_images(engine, QUESTION, {1: [yellow]}), GREEDY, session="yellow")
    await read(second)
    ((start, _),) = image_runs(second.prompt)
    assert first.prompt[:start] == second.prompt[:start] and first.prompt[start] != second.prompt[start]
    assert second.n_prompt_reused <= start  # the shared text before it at most: never the other image's KV
    # The same picture in another conversation is copied like any shared prefix.
    again = engine.submit(with_images(engine, QUESTION, {1: [green]}), GREEDY, session="green-again")
    await read(again)
    assert again.n_prompt_reused >= start + IMAGE_TOKENS
    # Read by another projector, the same picture is other ids: a KV state saved with one is never reused by another.
    assert engine.vision is not None
    assert stand_ins(green.data, IMAGE_TOKENS, engine.vision.identity) != stand_ins(green.data, IMAGE_TOKENS, b"other")


async def test_an_image_conversation_evicted_to_the_state_cache_comes_back_whole(mmproj: Path) -> None:
    # One KV stream: each other conversation takes it, and the last one's cache goes to RAM.
    engine = await asyncio.to_thread(vision_engine, mmproj, kv_layout="streams", kv_pool_mb=1, state_cache_mb=64)
    try:
        assert len(engine.kv.slots) == 1
        first = engine.submit(with_images(engine, QUESTION, {1: [RED]}), GREEDY, session="ann")
        reply = await read(first)
        hello = QUESTION[:1] + [{"role": "user", "content": "Hello?"}]
        await read(engine.submit(Prompt(hello, engine.chat_tokens(hello)), GREEDY, session="zed"))
        # Ann's cache left the stream for the RAM cache, image and all.
        assert all(slot.session != "ann" for slot in engine.kv.slots)
        assert engine.kv.saved._states["ann"][0][: len(first.prompt)] == first.prompt
        turn2 = QUESTION + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Sure?"}]
        second = engine.submit(with_images(engine, turn2, {1: [RED]}), GREEDY, session="ann")
        text = await read(second)
        assert second.n_prompt_reused >= len(first.prompt) - 1
    finally:
        await engine.aclose()
    fresh = await asyncio.to_thread(vision_engine, mmproj, parallel=1)
    try:
        assert await read(fresh.submit(with_images(fresh, turn2, {1: [RED]}), GREEDY)) == text
    finally:
        await fresh.aclose()


async def test_images_in_history_and_notes_are_read_in_order(engine: Engine) -> None:
    history = [
        QUESTION[0],
        {"role": "user", "content": "Two pictures."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "And this one, which is gone?"},
    ]
    generation = engine.submit(
        with_images(engine, history, {1: [RED, BLUE], 3: ["(An image, old.png, was here)"]}), GREEDY, session="album"
    )
    await read(generation)
    runs = image_runs(generation.prompt)
    assert [length for _, length in runs] == [IMAGE_TOKENS, IMAGE_TOKENS]
    assert engine.vision is not None
    assert [generation.prompt[start] for start, _ in runs] == [
        stand_ins(image.data, 1, engine.vision.identity)[0] for image in (RED, BLUE)
    ]
    assert "old.png, was here" in engine.detokenize([t for t in generation.prompt if t >= 0])


async def test_a_text_only_prompt_is_read_as_before(engine: Engine) -> None:
    prompt = Prompt(QUESTION, engine.chat_tokens(QUESTION))
    generation = engine.submit(prompt, GREEDY, session="plain")
    await read(generation)
    assert generation.prompt == prompt.tokens and generation._images is None
    assert not engine.worker._with_images  # nothing about images is left to do in any step


async def test_a_prompt_whose_images_overflow_the_window_fails_with_one_line(engine: Engine) -> None:
    text = "word " * 480
    while len(engine.chat_tokens([{"role": "user", "content": text}])) > 500:
        text = text[:-5]
    messages = [{"role": "user", "content": text}]
    generation = engine.submit(with_images(engine, messages, {0: [RED]}), GREEDY)
    with pytest.raises(EngineError, match=r"prompt of \d+ tokens with its images does not fit the 512-token context"):
        await read(generation)


async def test_an_unreadable_image_fails_its_request_alone(engine: Engine) -> None:
    broken = ImagePart("broken.png", "image/png", b"not a png", 10, 10)
    generation = engine.submit(with_images(engine, QUESTION, {1: [broken]}), GREEDY)
    with pytest.raises(EngineError, match="the image broken.png cannot be read"):
        await read(generation)
    await read(engine.submit(with_images(engine, QUESTION, {1: [RED]}), GREEDY))  # the engine goes on


def test_a_missing_mmproj_fails_the_load_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="mmproj file not found: .*nowhere.gguf"):
        Engine(EngineSettings(model_path=MODEL_PATH, mmproj=tmp_path / "nowhere.gguf", n_ctx=512, n_threads=1))
    (tmp_path / "text.gguf").write_bytes(MODEL_PATH.read_bytes())  # a GGUF, but no projector
    with pytest.raises(ModelLoadError, match="cannot load mmproj .*text.gguf"):
        Engine(EngineSettings(model_path=MODEL_PATH, mmproj=tmp_path / "text.gguf", n_ctx=512, n_threads=1))


@pytest.fixture
async def registry(mmproj: Path) -> AsyncIterator[ModelRegistry]:
    settings = Settings(
        engine=EngineSettings(
            model_path=MODEL_PATH, n_ctx=1024, n_threads=1, parallel=1, kv_pool_mb=24, state_dir=None
        ),
        models=[
            ModelSettings(name="eyes", path=MODEL_PATH, mmproj=mmproj, kv_pool_mb=24),
            ModelSettings(name="blind", path=MODEL_PATH, mmproj=mmproj, vision=False, kv_pool_mb=24),
        ],
    )
    registry = ModelRegistry(settings)
    await registry.start()
    yield registry
    await registry.aclose()


async def test_a_model_with_an_mmproj_has_vision_and_its_engine_reads_images(
    registry: ModelRegistry, mmproj: Path
) -> None:
    assert registry.get("eyes").capabilities.vision and not registry.default.capabilities.vision
    assert not registry.get("blind").capabilities.vision  # said in the config
    async with registry.use("eyes") as engine:
        assert registry.get("eyes").capabilities.vision
        assert engine.projector_size == mmproj.stat().st_size > 0  # the memory budget counts the projector
        assert registry.get("eyes").memory_bytes == engine.model_size + engine.projector_size + engine.kv_cache_bytes
        generation = engine.submit(with_images(engine, QUESTION, {1: [RED]}), GREEDY)
        await read(generation)
        assert len(image_runs(generation.prompt)) == 1


async def test_a_model_whose_mmproj_is_missing_is_unavailable_naming_it(tmp_path: Path) -> None:
    settings = Settings(
        engine=EngineSettings(
            model_path=MODEL_PATH, n_ctx=1024, n_threads=1, parallel=1, kv_pool_mb=24, state_dir=None
        ),
        models=[ModelSettings(name="eyes", path=MODEL_PATH, mmproj=tmp_path / "gone.gguf")],
    )
    registry = ModelRegistry(settings)
    await registry.start()
    try:
        with pytest.raises(ModelUnavailable, match="The model eyes is unavailable: mmproj file not found"):
            async with registry.use("eyes"):
                pass
    finally:
        await registry.aclose()
