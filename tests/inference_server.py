"""A real OpenAI-compatible inference server for the tests: llama-cpp-python's own ``llama_cpp.server`` with
the small default model, as a separate process on 127.0.0.1. It can be killed and started again on its port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from tests.conftest import MODEL_PATH

START_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InferenceServer:
    """``python -m llama_cpp.server`` on a port of its own; ``base_url`` is its OpenAI API root."""

    def __init__(
        self, log_dir: Path, *, n_ctx: int = 2048, api_key: str | None = None, port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.n_ctx = n_ctx
        self.api_key = api_key
        self._log = log_dir / f"llama_cpp_server_{self.port}.log"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, *, threads: str = "1") -> InferenceServer:
        arguments = [
            "--model",
            str(MODEL_PATH),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            threads,
        ]
        if self.api_key:
            arguments += ["--api_key", self.api_key]
        with self._log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "llama_cpp.server",
                *arguments,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            await self._wait_ready()
        except BaseException:  # never leave it running behind a failed start
            await self.kill()
            raise
        return self

    async def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with aiohttp.ClientSession(headers=headers) as http:
            while True:
                assert self._process.returncode is None, f"llama_cpp.server exited: {self._log.read_text()[-2000:]}"
                try:
                    async with http.get(f"{self.base_url}/models") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "llama_cpp.server did not start"
                await asyncio.sleep(0.2)

    async def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill ends it: no goodbye to open streams."""
        if self._process is not None and self._process.returncode is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            await self._process.wait()
        self._process = None

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                await self.kill()
        self._process = None

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""
