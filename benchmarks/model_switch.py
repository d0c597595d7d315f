"""What a /model switch costs, through the real ConversationManager: the second model's load time, the process's
RSS before and after it, and the switched conversation's first reply (cold: load included) against its next
(warm); then an image turn on a vision model (the small model with a tiny random projector, as the tests use):
prompt positions and time to first token, with and without the picture.

Run: .venv/bin/python benchmarks/model_switch.py [--runs 3]     (about half a minute on two cores)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

from PIL import Image  # noqa: E402

from bot.config import EngineSettings, ModelSettings, SamplingSettings, Settings  # noqa: E402
from bot.conversations import ConversationManager  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.images import read_image  # noqa: E402
from bot.models import ModelRegistry, open_backend  # noqa: E402
from bot.prompt import Prompt  # noqa: E402
from bot.store import open_store  # noqa: E402
from bot.types import Controls, ImagePart, Incoming, SessionKey  # noqa: E402
from tests.tiny_vision import write_tiny_mmproj  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLING = SamplingSettings(max_tokens=16, temperature=0.0, seed=1)


def rss_mb() -> float:
    """The process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class FirstText:
    """A reply target that notes when the reply's first words arrived."""

    max_length = 100_000
    min_edit_interval = 0.0

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None

    async def post(self, text: str, controls: Controls | None = None) -> int:
        self._saw(text)
        return 0

    async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
        return await self.post(text)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        self._saw(text)

    def _saw(self, text: str) -> None:
        if self.first is None and text and not text.startswith(("💭", "⏳")):
            self.first = time.perf_counter() - self.started


async def reply(manager: ConversationManager, key: SessionKey, text: str) -> float:
    """Seconds to the first words of one answer in conversation ``key``."""
    target = FirstText()
    result = await manager.respond(Incoming(key, "bench", "bench", text), target)
    assert result.status == "complete", result
    assert target.first is not None
    return target.first


async def turn(engine: Any, text: str, image: ImagePart | None = None) -> tuple[float, int]:
    """(seconds to the first words, prompt positions, the image's included) of one fresh turn on ``engine``."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    prompt = Prompt(messages, engine.chat_tokens(messages), images={1: [image]} if image is not None else {})
    started = time.perf_counter()
    generation = engine.submit(prompt, SAMPLING, session=text)
    first = None
    async for event in generation:
        if isinstance(event, str) and first is None:
            first = time.perf_counter() - started
    assert first is not None
    return first, len(generation.prompt)


async def run(runs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        mmproj = write_tiny_mmproj(Path(folder) / "mmproj-tiny.gguf")
        small = dict(path=MODEL, n_ctx=2048, kv_pool_mb=32, n_gpu_layers=0)
        settings = Settings(
            engine=EngineSettings(
                model_path=MODEL, n_ctx=2048, n_threads=1, parallel=1, kv_pool_mb=32, state_dir=None, n_gpu_layers=0
            ),
            models=[
                ModelSettings(name="second", **small),
                ModelSettings(name="seeing", mmproj=mmproj, image_size=64, **small),
            ],
        )
        settings.sampling = SAMPLING
        settings.store.path = Path(folder) / "bench.sqlite3"
        settings.model_pool.idle_seconds = 0
        loads: list[float] = []

        async def timed_open(engine: EngineSettings, api_key: str | None) -> Any:
            started = time.perf_counter()
            opened = await open_backend(engine, api_key)
            loads.append(time.perf_counter() - started)
            return opened

        engine = Engine(settings.engine)
        store = await open_store(settings.store.path)
        figures: dict[str, list[float]] = {"load": [], "rss_before": [], "rss_after": [], "cold": [], "warm": []}
        try:
            for attempt in range(runs):
                models = ModelRegistry(settings, opener=timed_open)
                manager = ConversationManager(engine, store, settings, models=models)
                key = SessionKey.for_channel("bench", "g", f"c{attempt}")
                await reply(manager, key, "Hello!")  # the default model, warm
                figures["rss_before"].append(rss_mb())
                await manager.set_model(key, "second")
                cold = await reply(manager, key, "Say something short.")
                figures["rss_after"].append(rss_mb())
                warm = await reply(manager, key, "And again?")
                figures["load"].append(loads[-1])
                figures["cold"].append(cold)
                figures["warm"].append(warm)
                resident = models.get("second").memory_bytes / 2**20
                await manager.shutdown()  # unloads "second"
            mid = {name: statistics.median(values) for name, values in figures.items()}
            print(f"model switch (median of {runs}; SmolLM2-135M Q4_1 loaded again as a second model, CPU, 1 thread)")
            print(f"  load time:                      {mid['load'] * 1000:8.0f} ms")
            print(
                f"  RSS before -> after the switch: {mid['rss_before']:8.0f} MB -> {mid['rss_after']:.0f} MB "
                f"(+{mid['rss_after'] - mid['rss_before']:.0f} MB; the registry counts {resident:.0f} MB "
                "of weights and KV pool)"
            )
            print(f"  first reply after /model:       {mid['cold'] * 1000:8.0f} ms to first words (load included)")
            print(f"  next reply on it:               {mid['warm'] * 1000:8.0f} ms to first words")

            picture = io.BytesIO()
            Image.new("RGB", (640, 480), (200, 30, 30)).save(picture, "PNG")
            image = await read_image("red.png", picture.getvalue(), settings.images, 64)
            assert isinstance(image, ImagePart)
            models = ModelRegistry(settings)
            try:
                async with models.use("seeing") as seeing:
                    text_only = [await turn(seeing, f"Run {n}: what colour is this?") for n in range(runs)]
                    pictured = [await turn(seeing, f"Turn {n}: what colour is this?", image) for n in range(runs)]
            finally:
                await models.aclose()
            print(f"image turn (median of {runs}; the same model with a tiny random projector: 64 px, 16 image tokens)")
            for label, results in (("text only", text_only), ("with a 640x480 picture", pictured)):
                print(
                    f"  {label + ':':31} {statistics.median(t for t, _ in results) * 1000:8.0f} ms to first words, "
                    f"{statistics.median(n for _, n in results):.0f} prompt positions"
                )
        finally:
            await store.close()
            await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(run(parser.parse_args().runs))


if __name__ == "__main__":
    main()
