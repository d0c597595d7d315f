"""An OpenAI-compatible server for the tests that records what it receives: each chat completion request's
headers and body go to a JSON-lines file, and it streams a fixed reply. Offered ``tools`` (and a
``tool_choice`` other than "none") while the last message is the user's, it streams a call of the first tool
instead (``add`` gets 2 and 3), its arguments in two pieces as servers send them; after a ``tool`` message it
answers with the result it read (`answer_for`). Run as its own process on 127.0.0.1:
``python -m tests.recording_server PORT RECORD_FILE [MODEL_ID ...]`` (no vision model can be downloaded here).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.inference_server import START_TIMEOUT_SECONDS, free_port

REPLY = "I see a picture."
CALL_ID = "call_rec_1"


def answer_for(result: str) -> str:
    return f"The tool said: {result}"


def _chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The deltas of the streamed reply, then the last one's finish_reason."""
    messages = body.get("messages") or [{}]
    tools = body.get("tools") or []
    if tools and body.get("tool_choice") != "none" and messages[-1].get("role") == "user":
        name = tools[0]["function"]["name"]
        arguments = '{"a": 2, "b": 3}' if name == "add" else "{}"
        return [
            {"content": "Let me check. "},
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": CALL_ID,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments[:6]},
                    }
                ]
            },
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[6:]}}]},
            {"finish": "tool_calls"},
        ]
    if messages[-1].get("role") == "tool":
        return [{"content": answer_for(str(messages[-1].get("content")))}, {"finish": "stop"}]
    return [{"content": REPLY}, {"finish": "stop"}]


def make_app(record: Path, model_ids: list[str]) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"} for name in model_ids]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with record.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"authorization": request.headers.get("Authorization"), "body": body}) + "\n")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in _chunks(body):
            finish = chunk.pop("finish", None)
            choice: dict[str, Any] = {"index": 0, "delta": chunk, "finish_reason": finish}
            await response.write(f"data: {json.dumps({'model': body.get('model'), 'choices': [choice]})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


class RecordingServer:
    """The recording server as a separate process; `requests()` reads back what it received."""

    def __init__(self, directory: Path, *model_ids: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.record = directory / f"received_{self.port}.jsonl"
        self.model_ids = list(model_ids) or ["recorder"]
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> RecordingServer:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.recording_server",
            str(self.port),
            str(self.record),
            *self.model_ids,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
        async with aiohttp.ClientSession() as http:
            while True:
                assert self._process.returncode is None, "the recording server exited"
                try:
                    async with http.get(f"{self.base_url}/models") as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    await self.stop()
                    raise AssertionError("the recording server did not start")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            await self._process.wait()
        self._process = None

    def requests(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text(encoding="utf-8").splitlines()]


if __name__ == "__main__":
    port, record, *names = sys.argv[1:]
    web.run_app(make_app(Path(record), names or ["recorder"]), host="127.0.0.1", port=int(port), print=None)
