"""The same 8 concurrent conversations answered by llamarelay on its embedded engine and on a remote
OpenAI-compatible server (llama-cpp-python's ``llama_cpp.server``, started here as a separate process).

Run: .venv/bin/python benchmarks/remote.py [--conversations 8] [--tokens 128] [--rounds 2]
Prints, for each backend, the aggregate tokens/s and the time to first text (median, worst), measured through
the ConversationManager as a platform would see it. Reply tokens are counted with the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.engine.threads import configure_openmp  # noqa: E402

configure_openmp()  # before llama.cpp loads, as the command line does: measure what the bot runs

import llama_cpp  # noqa: E402

from bot.app import open_engine  # noqa: E402
from bot.config import SamplingSettings, Secrets, load_settings  # noqa: E402
from bot.conversations import ConversationManager  # noqa: E402
from bot.engine import Tokenizer  # noqa: E402
from bot.engine.threads import physical_cores  # noqa: E402
from bot.store import open_store  # noqa: E402
from bot.types import Controls, Incoming, SessionKey  # noqa: E402
from tests.inference_server import InferenceServer  # noqa: E402

TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "a dragon who bakes",
    "two rival chess players",
    "a city under the sea",
    "a time-travelling cat",
    "the last tree on Mars",
    "a haunted violin",
]


class Recorder:
    """A reply target that notes when the first words (not a status line) arrived."""

    max_length = 1_000_000
    min_edit_interval = 0.0

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_text: float | None = None

    def _saw(self, text: str) -> None:
        if self.first_text is None and text:
            self.first_text = time.perf_counter()

    async def post(self, text: str, controls: Controls | None = None) -> int:
        self._saw(text)
        return 0

    async def post_continuation(self, text: str, controls: Controls | None = None) -> int:
        return await self.post(text)

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        self._saw(text)

    async def post_status(self, status: Any, controls: Controls | None = None) -> int:
        return 0  # a status is not the first words

    async def edit_status(self, handle: Any, status: Any, controls: Controls | None = None) -> None:
        pass


def tokenizer() -> Tokenizer:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(
        str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").encode(), params
    )
    return Tokenizer(llama_cpp.llama_model_get_vocab(model))


async def round_of(
    manager: ConversationManager, conversations: int, take: int, count: Tokenizer
) -> tuple[float, list[float]]:
    """(aggregate tokens/s, times to first text) for ``conversations`` new conversations at once."""
    recorders = [Recorder() for _ in range(conversations)]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            manager.respond(
                Incoming(
                    SessionKey.for_channel("bench", "g", f"take{take}-{n}"),
                    "u",
                    "user",
                    f"Please write a long, detailed story about {TOPICS[n % len(TOPICS)]}.",
                ),
                recorder,
            )
            for n, recorder in enumerate(recorders)
        )
    )
    elapsed = time.perf_counter() - started
    tokens = sum(len(count.tokenize(result.text)) for result in results)
    return tokens / elapsed, [r.first_text - r.started for r in recorders if r.first_text is not None]


async def measure(label: str, settings: Any, args: argparse.Namespace, count: Tokenizer) -> None:
    engine = await open_engine(settings, Secrets())
    with tempfile.TemporaryDirectory() as data:
        store = await open_store(Path(data) / "bench.sqlite3")
        manager = ConversationManager(engine, store, settings)
        try:
            await round_of(manager, 1, 0, count)  # warm-up
            for take in range(1, args.rounds + 1):
                rate, firsts = await round_of(manager, args.conversations, take, count)
                print(
                    f"  {label:<34} {rate:7.1f} tokens/s   first text median {statistics.median(firsts):5.2f} s, "
                    f"worst {max(firsts):5.2f} s",
                    flush=True,
                )
        finally:
            await manager.shutdown()
            await store.close()
            await engine.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    count = tokenizer()
    settings = load_settings(ROOT / "config.toml")
    settings.sampling = SamplingSettings(max_tokens=args.tokens, temperature=0.7, seed=7)
    threads = settings.engine.n_threads or physical_cores()  # the same for the server
    print(
        f"{args.conversations} conversations at once, {args.tokens} tokens each, {threads} threads, "
        f"{os.cpu_count()} cores"
    )
    await measure(f"embedded (parallel = {settings.engine.parallel})", settings, args, count)
    with tempfile.TemporaryDirectory() as logs:
        server = InferenceServer(Path(logs), n_ctx=settings.engine.n_ctx)
        await server.start(threads=str(threads))
        try:
            remote = settings.model_copy(deep=True)
            remote.engine = remote.engine.model_copy(update={"backend": "openai", "base_url": server.base_url})
            await measure("remote llama_cpp.server", remote, args, count)
        finally:
            await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
