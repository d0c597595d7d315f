"""The web adapter end to end: the real aiohttp server on 127.0.0.1, real HTTP clients (one cookie jar per
browser), the real engine and small model. Exact replies are forced with per-session grammars."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from adapters.web import WebServer, create_app, run_web
from adapters.web.api import LOGIN_FAILURES_ALLOWED, LOGIN_WINDOW_SECONDS, MAX_MESSAGE_CHARS, STATE, TITLE_CHARS
from adapters.web.events import EventStreamTarget, json_dumps
from adapters.web.uploads import MAX_FILES, upload_limit
from bot.access import AccessPolicy
from bot.config import Secrets, Settings
from bot.conversations import ConversationManager
from bot.errors import ConfigError
from bot.prompt import Prompt
from bot.store import Status
from bot.types import Phase, ReplyStatus, SessionKey
from bot.wording import (
    LENGTH_NOTE,
    REASONING,
    STALE_REPLY,
    STOPPED_NOTE,
    THINKING,
    WAITING_FOR_PREVIOUS,
    queued_line,
    status_line,
)

REPLY_TIMEOUT_SECONDS = 120.0  # the machine is shared and may be slow; waited on, never slept
SENTENCE = "lorem ipsum dolor sit amet."
XSS_USER = "<img src=x onerror=alert(1)> and <script>alert(1)</script>"
XSS_MODEL = "<script>alert(2)</script> <img src=y onerror=alert(3)>"


def sentences(count: int) -> str:
    """A grammar forcing ``SENTENCE`` ``count`` times, separated by spaces: the reply is known in advance."""
    return f'root ::= "{SENTENCE}" (" {SENTENCE}"){{{count - 1}}}'


def expected(count: int) -> str:
    return " ".join([SENTENCE] * count)


@dataclass
class Stream:
    """The events of one streamed reply, read as they arrive."""

    response: aiohttp.ClientResponse
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)

    async def next(self) -> tuple[str, dict[str, Any]] | None:
        """The next event (keep-alive comments skipped), or None when the stream has ended."""
        name, data = "", ""
        while True:
            line = await self.response.content.readline()
            if not line:
                return None
            self.raw += line
            text = line.decode().rstrip("\n")
            if text.startswith("event:"):
                name = text[6:].strip()
            elif text.startswith("data:"):
                data += text[5:].strip()
            elif not text and data:
                event = (name, json.loads(data))
                self.events.append(event)
                return event

    async def until(self, predicate: Callable[[str, dict[str, Any]], bool]) -> tuple[str, dict[str, Any]]:
        async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
            while (event := await self.next()) is not None:
                if predicate(*event):
                    return event
        raise AssertionError(f"the stream ended without the awaited event; got {self.events}")

    async def done(self) -> dict[str, Any]:
        return (await self.until(lambda name, _: name == "done"))[1]

    def deltas(self) -> list[str]:
        return [data["text"] for name, data in self.events if name == "delta"]

    def shown(self) -> str:
        """The text the page shows after applying every delta and replace."""
        text = ""
        for name, data in self.events:
            if name in ("delta", "replace"):
                text = text + data["text"] if name == "delta" else data["text"]
        return text


class Browser:
    """One browser: its own cookie jar, so its own id. Talks to the server like the page does."""

    def __init__(self, url: str, manager: ConversationManager, *, origin: bool = True) -> None:
        self.url = url
        self.manager = manager
        self.origin = url.rstrip("/") if origin else None
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # unsafe: an IP host
        self.streams: list[Stream] = []

    async def close(self) -> None:
        for stream in self.streams:
            stream.response.close()
        await self.session.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if self.origin:
            headers.setdefault("Origin", self.origin)
        return self.session.request(method, self.url + path.lstrip("/"), headers=headers, **kwargs)

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.request(method, path, **kwargs) as response:
            body = await response.read()
            return response.status, json.loads(body) if body else None

    async def new(self, grammar: str | None = None, max_tokens: int = 160) -> str:
        status, body = await self.call("POST", "/api/conversations")
        assert status == 201, body
        if grammar:
            await self.manager.set_sampling(self.key(body["id"]), grammar=grammar, max_tokens=max_tokens)
        return str(body["id"])

    def key(self, conversation: str) -> SessionKey:
        cookie = next(c for c in self.session.cookie_jar if c.key == "llamarelay_browser")
        return SessionKey.for_channel("web", cookie.value, conversation)

    async def send(self, conversation: str, text: str) -> Stream:
        return await self.stream(f"/api/conversations/{conversation}/messages", json={"text": text})

    async def send_files(self, conversation: str, text: str | None, files: list[tuple[str, bytes, str]]) -> Stream:
        """Send a form as the page does: ``text`` and each (name, data, content type) as a ``file`` part."""
        return await self.stream(f"/api/conversations/{conversation}/messages", data=upload(text, files))

    async def redo(self, conversation: str, action: str, reply_id: int) -> Stream:
        """Regenerate or Continue the answer ``reply_id``."""
        return await self.stream(f"/api/conversations/{conversation}/{action}", json={"reply_id": reply_id})

    async def stream(self, path: str, **kwargs: Any) -> Stream:
        response = await self.request("POST", path, **kwargs)
        assert response.status == 200, await response.text()
        assert response.content_type == "text/event-stream"
        self.streams.append(Stream(response))
        return self.streams[-1]

    async def conversation(self, conversation: str) -> dict[str, Any]:
        status, body = await self.call("GET", f"/api/conversations/{conversation}")
        assert status == 200, body
        return dict(body)


def upload(text: str | None, files: list[tuple[str, bytes, str]]) -> aiohttp.FormData:
    # File names as browsers send them (UTF-8, not %-encoded); a form even without files.
    form = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
    if text is not None:
        form.add_field("text", text)
    for name, data, content_type in files:
        form.add_field("file", data, filename=name, content_type=content_type)
    return form


@pytest.fixture
async def server(manager: ConversationManager, settings: Settings) -> AsyncIterator[WebServer]:
    settings.web.edit_interval = 0.02
    web = WebServer(create_app(manager, settings, Secrets()), "127.0.0.1", 0)
    await web.start()
    try:
        yield web
    finally:
        await manager.shutdown()  # ends replies still running, so closing does not wait for them
        await web.close()


@pytest.fixture
async def browsers(server: WebServer, manager: ConversationManager) -> AsyncIterator[Callable[[], Browser]]:
    opened: list[Browser] = []

    def make(**kwargs: Any) -> Browser:
        browser = Browser(server.url, manager, **kwargs)
        opened.append(browser)
        return browser

    yield make
    for browser in opened:
        await browser.close()


async def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if value := await condition():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- streaming ----------------------------------------------------------------------------------------


async def test_reply_arrives_in_several_chunks_and_is_stored(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(sentences(6))
    stream = await browser.send(conversation, "Say lorem ipsum.")
    done = await stream.done()
    assert len(stream.deltas()) >= 2, stream.events
    assert "".join(stream.deltas()) == done["text"] == expected(6)
    assert done["status"] == Status.COMPLETE and done["notes"] == []
    history = (await browser.conversation(conversation))["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in history] == [
        ("user", "Say lorem ipsum.", Status.COMPLETE),
        ("assistant", expected(6), Status.COMPLETE),
    ]


async def test_stop_ends_the_reply_and_keeps_the_partial_text(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(sentences(200), max_tokens=1500)
    stream = await browser.send(conversation, "Talk for a long time.")
    await stream.until(lambda name, _: name == "delta")
    status, body = await browser.call("POST", f"/api/conversations/{conversation}/stop")
    assert status == 200 and body == {"stopped": True} and body["stopped"] is True  # a boolean, not a count
    done = await stream.done()
    assert done["status"] == Status.STOPPED and done["notes"] == [STOPPED_NOTE]
    assert done["text"] and expected(200).startswith(done["text"]) and len(done["text"]) < len(expected(200))
    assert done["can_continue"] is True and isinstance(done["reply_id"], int)  # a stopped answer can go on
    assert stream.shown() == f"{done['text']}\n\n{STOPPED_NOTE}"
    assert await stream.next() is None, "the stream should end after done"
    reply = (await browser.conversation(conversation))["messages"][-1]
    assert (reply["content"], reply["status"]) == (done["text"], Status.STOPPED)
    # Nothing runs any more: a second stop has nothing to cancel.
    status, body = await browser.call("POST", f"/api/conversations/{conversation}/stop")
    assert status == 200 and body == {"stopped": False} and body["stopped"] is False


async def test_dropped_connection_loses_nothing_and_history_shows_after_reconnect(
    browsers: Callable[[], Browser], server: WebServer, manager: ConversationManager
) -> None:
    browser = browsers()
    conversation = await browser.new(sentences(10), max_tokens=200)
    stream = await browser.send(conversation, "Tell me something.")
    await stream.until(lambda name, _: name == "delta")
    stream.response.close()  # the tab is closed mid-reply

    # A new connection with the same cookie (the page reloaded) sees the reply finish and be stored.
    again = Browser(server.url, manager)
    try:
        again.session.cookie_jar.update_cookies({c.key: c.value for c in browser.session.cookie_jar})

        async def finished() -> dict[str, Any] | None:
            reply = (await again.conversation(conversation))["messages"][-1]
            return reply if reply["status"] != Status.GENERATING else None

        reply = await wait_for(finished, "the reply to be stored")
        assert (reply["content"], reply["status"]) == (expected(10), Status.COMPLETE)
        status, listed = await again.call("GET", "/api/conversations")
        assert status == 200 and listed["conversations"] == [
            {"id": conversation, "title": "Tell me something.", "messages": 2}
        ]
    finally:
        await again.close()


async def test_queue_position_is_streamed_while_the_engine_is_busy(
    browsers: Callable[[], Browser], manager: ConversationManager
) -> None:
    # The test engine serves two generations at once (parallel=2): a third one waits in the queue.
    browser = browsers()
    busy = [await browser.new(sentences(200), max_tokens=1500) for _ in range(2)]
    waiting = await browser.new(sentences(2))
    streams = [await browser.send(conversation, "Go on.") for conversation in busy]
    for stream in streams:
        await stream.until(lambda name, _: name == "delta")

    third = await browser.send(waiting, "And me?")
    name, data = await third.until(lambda name, data: name != "status" or data["kind"] == "queued")
    assert (name, data) == ("status", {"kind": "queued", "text": "⏳ Queued: #1 in line…", "position": 1})
    assert (await browser.conversation(waiting))["position"] == 1

    for conversation in busy:
        await browser.call("POST", f"/api/conversations/{conversation}/stop")
    done = await third.done()
    assert done["status"] == Status.COMPLETE and done["text"] == expected(2)
    kinds = [data.get("kind") for name, data in third.events if name == "status"]
    assert kinds[0] == "queued"  # statuses coalesce: the newest is shown, never a flash of "thinking" first
    for stream in streams:
        assert (await stream.done())["status"] == Status.STOPPED


# -- regenerate and continue -------------------------------------------------------------------------------


async def test_regenerate_replaces_the_last_answer_in_the_history(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new('root ::= "First try."')
    first = await (await browser.send(conversation, "Say something.")).done()
    detail = await browser.conversation(conversation)
    assert detail["latest_reply"] == first["reply_id"] and first["can_continue"] is False
    assert detail["messages"][-1]["can_continue"] is False and detail["messages"][-1]["notes"] == []

    await browser.manager.set_sampling(browser.key(conversation), grammar='root ::= "Second try."')
    stream = await browser.redo(conversation, "regenerate", first["reply_id"])
    done = await stream.done()
    assert (done["status"], done["text"], done["reply_id"]) == (Status.COMPLETE, "Second try.", first["reply_id"])
    assert stream.shown() == "Second try."
    detail = await browser.conversation(conversation)
    assert [(m["role"], m["content"]) for m in detail["messages"]] == [
        ("user", "Say something."),
        ("assistant", "Second try."),
    ]
    assert detail["latest_reply"] == first["reply_id"]


async def test_continue_extends_an_answer_cut_by_the_length_limit(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(sentences(50), max_tokens=8)
    cut = await (await browser.send(conversation, "Talk.")).done()
    assert cut["notes"] == [LENGTH_NOTE] and cut["can_continue"] is True and expected(50).startswith(cut["text"])
    stored = (await browser.conversation(conversation))["messages"][-1]
    assert stored["notes"] == [LENGTH_NOTE] and stored["can_continue"] is True  # what the page needs after a reload

    await browser.manager.set_sampling(browser.key(conversation), grammar='root ::= " And that is all."', max_tokens=40)
    stream = await browser.redo(conversation, "continue", cut["reply_id"])
    assert await stream.next() == ("replace", {"text": cut["text"]})  # the stream opens with the answer so far
    done = await stream.done()
    assert (done["status"], done["text"]) == (Status.COMPLETE, cut["text"] + " And that is all.")
    assert done["can_continue"] is False and done["notes"] == [] and stream.shown() == done["text"]
    messages = (await browser.conversation(conversation))["messages"]
    assert [(m["content"], m["can_continue"]) for m in messages] == [("Talk.", False), (done["text"], False)]

    status, body = await browser.call(
        "POST", f"/api/conversations/{conversation}/continue", json={"reply_id": cut["reply_id"]}
    )
    assert (status, body["error"]) == (409, "nothing_to_continue")


async def test_regenerate_and_continue_refuse_what_no_longer_applies(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(sentences(1))
    first = await (await browser.send(conversation, "One.")).done()
    second = await (await browser.send(conversation, "Two.")).done()
    path = f"/api/conversations/{conversation}"
    for action in ("regenerate", "continue"):  # the page showed an old state: 409, and nothing changes
        assert await browser.call("POST", f"{path}/{action}", json={"reply_id": first["reply_id"]}) == (
            409,
            {"error": "stale_reply", "message": STALE_REPLY},
        )
    for body in ({}, {"reply_id": "1"}, {"reply_id": True}, {"reply_id": None}):
        status, answer = await browser.call("POST", f"{path}/regenerate", json=body)
        assert (status, answer["error"]) == (400, "invalid_field"), body
    async with browser.request("POST", f"{path}/regenerate", data="reply_id=1") as response:
        assert response.status == 415
    messages = (await browser.conversation(conversation))["messages"]
    assert [m["content"] for m in messages] == ["One.", expected(1), "Two.", expected(1)]

    # While an answer is being written, neither acts on it.
    await browser.manager.set_sampling(browser.key(conversation), grammar=sentences(200), max_tokens=1500)
    running = await browser.send(conversation, "Three.")
    await running.until(lambda name, _: name == "delta")
    latest = (await browser.conversation(conversation))["latest_reply"]
    assert latest not in (first["reply_id"], second["reply_id"])
    for action in ("regenerate", "continue"):
        status, answer = await browser.call("POST", f"{path}/{action}", json={"reply_id": latest})
        assert (status, answer["error"]) == (409, "reply_in_progress"), action
    await browser.call("POST", f"{path}/stop")
    assert (await running.done())["reply_id"] == latest


# -- files, speakers, reasoning ------------------------------------------------------------------------------


async def test_files_are_read_into_the_message_and_skipped_ones_say_why(
    browsers: Callable[[], Browser], settings: Settings
) -> None:
    settings.conversation.max_file_bytes = 1000
    browser = browsers()
    conversation = await browser.new(sentences(1))
    stream = await browser.send_files(
        conversation,
        "Summarize these.",
        [
            ("notes.txt", b"buy milk\r\ncall Bo", "text/plain"),
            ("archive.zip", b"PK\x03\x04\x00\x00", "application/zip"),
            ("big.log", b"x" * 5000, "application/octet-stream"),
            ("../../etc/données.csv", b"a,b\n1,2\n", ""),
        ],
    )
    done = await stream.done()
    assert done["status"] == Status.COMPLETE and done["text"] == expected(1)
    assert done["notes"] == ["📎 I skipped archive.zip: not a text file.", "📎 I skipped big.log: larger than 1 kB."]
    messages = (await browser.conversation(conversation))["messages"]
    assert messages[0]["content"] == (
        "Summarize these.\n\nFile notes.txt:\n```\nbuy milk\ncall Bo\n```\n\nFile données.csv:\n```\na,b\n1,2\n```"
    )

    # Files alone are a message too; a form with neither text nor files is an empty one.
    alone = await (await browser.send_files(conversation, None, [("todo.md", b"- [ ] ship it", "")])).done()
    assert alone["status"] == Status.COMPLETE
    assert (await browser.conversation(conversation))["messages"][-2]["content"] == (
        "File todo.md:\n```\n- [ ] ship it\n```"
    )
    status, body = await browser.call("POST", f"/api/conversations/{conversation}/messages", data=upload(" ", []))
    assert (status, body["error"]) == (400, "empty_message")
    status, info = await browser.call("GET", "/api/info")
    assert (info["max_files"], info["max_file_bytes"]) == (MAX_FILES, 1000)


async def raw_post(port: int, path: str, headers: dict[str, str], body: AsyncIterator[bytes]) -> tuple[int, str]:
    """POST with exactly these headers, sending ``body`` until the server answers: (status, JSON error code).
    A server that waited for the whole body before answering would make this time out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{head}\r\n".encode())

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            async for chunk in body:
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(REPLY_TIMEOUT_SECONDS):
            status_line = await reader.readline()
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = json.loads(await reader.readexactly(length))
        return int(status_line.split()[1]), str(answer["error"])
    finally:
        sender.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_upload_limits_hold_before_the_body_is_read(
    browsers: Callable[[], Browser], server: WebServer, settings: Settings
) -> None:
    settings.conversation.max_file_bytes = 1000
    settings.images.max_bytes = 1000
    browser = browsers()
    conversation = await browser.new(sentences(1))
    path = f"/api/conversations/{conversation}/messages"
    cookie = next(c for c in browser.session.cookie_jar if c.key == "llamarelay_browser")
    form = {"Cookie": f"llamarelay_browser={cookie.value}", "Content-Type": "multipart/form-data; boundary=b"}
    limit = upload_limit(MAX_MESSAGE_CHARS, 1000, 1000, settings.images.max_count)

    sent = 0

    async def trickle() -> AsyncIterator[bytes]:  # a client that would send its gigabyte, 100 kB a second
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="huge.txt"\r\n\r\n'
        while True:
            sent += 1024
            yield b"x" * 1024
            await asyncio.sleep(0.01)

    # A Content-Length over the limit is refused from the headers alone, long before the limit is sent.
    assert await raw_post(server.port, path, {**form, "Content-Length": str(10**9)}, trickle()) == (413, "too_large")
    assert sent < limit / 2, (sent, limit)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        async for piece in trickle():
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"

    sent = 0
    assert await raw_post(server.port, path, {**form, "Transfer-Encoding": "chunked"}, chunked()) == (413, "too_large")
    assert limit <= sent < 2 * limit, (sent, limit)  # refused once past the limit, not at the body's end

    too_many = [(f"f{n}.txt", b"x", "text/plain") for n in range(MAX_FILES + 1)]
    cases: list[tuple[Any, dict[str, str], int, str]] = [
        (upload("hi", too_many), {}, 413, "too_many_files"),
        (upload("x" * (MAX_MESSAGE_CHARS + 1), []), {}, 413, "too_long"),
        (
            b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\xfe\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            400,
            "invalid_field",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nno name\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            400,
            "invalid_field",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            400,
            "invalid_field",
        ),
        (b"--b\r\nnot a header line", {"Content-Type": "multipart/form-data; boundary=b"}, 400, "invalid_form"),
        (b"no boundary at all", {"Content-Type": "multipart/form-data"}, 400, "invalid_form"),
    ]
    for data, headers, status, error in cases:
        answer = await browser.call("POST", path, data=data, headers=headers)
        assert (answer[0], answer[1]["error"]) == (status, error), data if isinstance(data, bytes) else error
    assert (await browser.conversation(conversation))["messages"] == []


async def test_the_model_reads_no_speaker_name_on_the_web(
    browsers: Callable[[], Browser], manager: ConversationManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[list[int]] = []
    submit = manager.engine.submit

    def recording_submit(prompt: Prompt, *args: Any, **kwargs: Any) -> Any:
        prompts.append(prompt.tokens)
        return submit(prompt, *args, **kwargs)

    monkeypatch.setattr(manager.engine, "submit", recording_submit)
    browser = browsers()
    conversation = await browser.new(sentences(1))
    for text in ("I like tea.", "And you?"):
        await (await browser.send(conversation, text)).done()
    read = manager.engine.detokenize(prompts[-1])
    # One person per browser conversation: their words, with no "Name: " before them.
    assert "user\nI like tea." in read and "user\nAnd you?" in read, read
    assert [m.author_name for m in await manager.history(browser.key(conversation))] == ["", "", "", ""]


async def test_a_reasoning_model_shows_a_status_then_only_its_answer(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(
        'root ::= "<think>" ([a-z]{3,6} " "){60} "</think>" " The answer is yes."', max_tokens=400
    )
    stream = await browser.send(conversation, "Is it?")
    done = await stream.done()
    assert done["text"] == "The answer is yes." and stream.shown() == "The answer is yes."
    statuses = [data for name, data in stream.events if name == "status"]
    assert {"kind": "reasoning", "text": REASONING, "position": None} in statuses, stream.events
    assert b"think\\u003e" not in stream.raw  # neither <think> nor </think> (sent as \u003c…\u003e)
    assert (await browser.conversation(conversation))["messages"][-1]["content"] == "The answer is yes."


# -- sessions ---------------------------------------------------------------------------------------------


async def test_two_browsers_cannot_reach_each_others_conversations(browsers: Callable[[], Browser]) -> None:
    alice, mallory = browsers(), browsers()
    conversation = await alice.new(sentences(1))
    await (await alice.send(conversation, "A secret.")).done()

    assert await mallory.call("GET", "/api/conversations") == (200, {"conversations": []})
    reply_id = (await alice.conversation(conversation))["latest_reply"]
    for method, path, body in (
        ("GET", "", None),
        ("POST", "/messages", {"text": "hi"}),
        ("POST", "/stop", None),
        ("POST", "/reset", None),
        ("PUT", "/system_prompt", {"system_prompt": "x"}),
        ("POST", "/regenerate", {"reply_id": reply_id}),
        ("POST", "/continue", {"reply_id": reply_id}),
    ):
        status, answer = await mallory.call(method, f"/api/conversations/{conversation}{path}", json=body)
        assert (status, answer["error"]) == (404, "unknown_conversation"), (method, path)
    history = (await alice.conversation(conversation))["messages"]
    assert [m["content"] for m in history] == ["A secret.", expected(1)]
    assert (await alice.conversation(conversation))["system_prompt"] == "You are a helpful assistant."


async def test_the_web_asks_the_core_access_policy_and_answers_its_refusals(
    server: WebServer, browsers: Callable[[], Browser]
) -> None:
    # No [web] key sets a limit; a policy with one shows that the web asks the same question as every platform.
    server.app[STATE].policy = AccessPolicy(messages_per_minute=1)
    browser = browsers()
    conversation = await browser.new(sentences(1))
    await (await browser.send(conversation, "first")).done()
    async with browser.request("POST", f"/api/conversations/{conversation}/messages", json={"text": "again"}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (429, "too_fast") and int(r.headers["Retry-After"]) > 0
        assert body["message"].startswith("⏳ Easy there! You can send 1 messages a minute")
    # A browser's conversation is its own, as a DM is: its settings are its to change.
    assert (
        await browser.call(
            "PUT", f"/api/conversations/{conversation}/system_prompt", json={"system_prompt": "Be brief."}
        )
    )[0] == 200


async def test_conversations_list_system_prompt_and_reset(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    first = await browser.new(sentences(1))
    second = await browser.new()
    question = "  What is\n the   weather like on a very long day in the middle of summer?"
    await (await browser.send(first, question)).done()
    status, listed = await browser.call("GET", "/api/conversations")
    assert status == 200 and listed["conversations"] == [
        {"id": second, "title": "New chat", "messages": 0},
        {"id": first, "title": "What is the weather like on a very long day in the middle…", "messages": 2},
    ]

    path = f"/api/conversations/{first}/system_prompt"
    assert await browser.call("PUT", path, json={"system_prompt": "You are a pirate."}) == (
        200,
        {"system_prompt": "You are a pirate."},
    )
    assert (await browser.conversation(first))["system_prompt"] == "You are a pirate."
    assert await browser.call("PUT", path, json={"system_prompt": None}) == (
        200,
        {"system_prompt": "You are a helpful assistant."},
    )

    assert await browser.call("POST", f"/api/conversations/{first}/reset") == (200, {"reset": True})
    assert (await browser.conversation(first))["messages"] == []


async def test_conversation_list_is_one_query_whatever_the_history(
    browsers: Callable[[], Browser], manager: ConversationManager
) -> None:
    browser, other = browsers(), browsers()
    first, second, empty = [await browser.new() for _ in range(3)]
    await other.new()
    store = manager.store
    for conversation, count in ((first, 40), (second, 3)):
        key = str(browser.key(conversation))
        await store.add_message(key, "assistant", "an assistant first", "complete")  # not a title
        for n in range(count):
            await store.add_message(key, "user", f"  question\n {conversation} {n} " + "x" * 900, "complete")
            await store.add_message(key, "assistant", "answer " * 500, "complete")

    statements: list[str] = []
    await store._db.set_trace_callback(statements.append)
    try:
        status, listed = await browser.call("GET", "/api/conversations")
    finally:
        await store._db.set_trace_callback(None)
    assert status == 200
    assert len(statements) == 1, statements  # one summary query, never a conversation read whole
    titles = [f"question {c} 0 " + "x" * (TITLE_CHARS - 1 - len(f"question {c} 0 ")) + "…" for c in (first, second)]
    assert listed["conversations"] == [
        {"id": empty, "title": "New chat", "messages": 0},
        {"id": second, "title": titles[1], "messages": 7},
        {"id": first, "title": titles[0], "messages": 81},
    ]
    # The store's side: newest first, limited, only under the prefix, first user message cut short.
    prefix = str(browser.key("_"))[:-1]
    summaries = await store.session_summaries(prefix, 2)
    assert [(key[len(prefix) :], len(text), count) for key, text, count in summaries] == [
        (empty, 0, 0),
        (second, 500, 7),
    ]


# -- bad input ----------------------------------------------------------------------------------------


async def test_bad_input_gets_a_4xx_json_error_and_stores_nothing(
    browsers: Callable[[], Browser], server: WebServer
) -> None:
    browser = browsers()
    conversation = await browser.new()
    messages = f"/api/conversations/{conversation}/messages"
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", messages, {"json": {"text": ""}}, 400, "empty_message"),
        ("POST", messages, {"json": {"text": " \n\t\u200b "}}, 400, "empty_message"),
        ("POST", messages, {"json": {"text": "x" * 50_000}}, 413, "too_long"),
        ("POST", messages, {"json": {"text": "x" * (MAX_MESSAGE_CHARS + 1)}}, 413, "too_long"),
        ("POST", messages, {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
        (
            "POST",
            messages,
            {"data": b"\xff\xfe{", "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            "POST",
            messages,
            {"data": "[" * 100_000, "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ("POST", messages, {"json": ["hello"]}, 400, "invalid_json"),
        ("POST", messages, {"json": {"text": 42}}, 400, "invalid_field"),
        ("POST", messages, {"json": {}}, 400, "invalid_field"),
        (
            "POST",
            messages,
            {"data": "text=hello", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            messages,
            {"data": '{"text": "hello"}', "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/api/conversations/NoSuchConversation/messages",
            {"json": {"text": "hi"}},
            404,
            "unknown_conversation",
        ),
        ("GET", "/api/conversations/bad!id", {}, 404, "unknown_conversation"),
        (
            "POST",
            messages,
            {"json": {"text": "hi"}, "headers": {"Origin": "http://evil.example"}},
            403,
            "foreign_origin",
        ),
        ("POST", "/api/conversations", {"headers": {"Origin": "null"}}, 403, "foreign_origin"),
        ("GET", "/api/conversations", {"headers": {"Origin": "http://127.0.0.1:1"}}, 403, "foreign_origin"),
        ("GET", "/api/conversations", {"headers": {"Sec-Fetch-Site": "cross-site"}}, 403, "foreign_origin"),
        ("GET", "/api/conversations", {"headers": {"Host": f"rebind.example:{server.port}"}}, 403, "foreign_host"),
        (
            "PUT",
            f"/api/conversations/{conversation}/system_prompt",
            {"json": {"system_prompt": "x" * 20_001}},
            413,
            "too_long",
        ),
        ("GET", "/api/nothing-here", {}, 404, "not_found"),
        ("DELETE", "/api/conversations", {}, 405, "method_not_allowed"),
    ]
    for method, path, kwargs, status, error in cases:
        async with browser.request(method, path, **kwargs) as response:
            body = await response.text()
            assert (response.status, response.content_type) == (status, "application/json"), (path, kwargs, body)
            assert json.loads(body)["error"] == error and "Traceback" not in body, (path, kwargs, body)
    assert (await browser.conversation(conversation))["messages"] == []


async def test_lone_surrogates_are_answered_and_stored(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    raw = {"Content-Type": "application/json"}
    # A lone surrogate is valid JSON ("\\ud800") but no valid UTF-8: it becomes U+FFFD wherever it is stored.
    status, created = await browser.call(
        "POST", "/api/conversations", data=b'{"system_prompt": "Be \\ud800 kind."}', headers=raw
    )
    assert (status, created["system_prompt"]) == (201, "Be \ufffd kind."), created
    conversation = created["id"]
    await browser.manager.set_sampling(browser.key(conversation), grammar=sentences(1), max_tokens=40)
    path = f"/api/conversations/{conversation}/system_prompt"
    assert await browser.call("PUT", path, data=b'{"system_prompt": "\\udfff"}', headers=raw) == (
        200,
        {"system_prompt": "\ufffd"},
    )

    response = await browser.request(
        "POST", f"/api/conversations/{conversation}/messages", data=b'{"text": "hi \\ud800 there \\udc00"}', headers=raw
    )
    assert response.status == 200, await response.text()
    stream = Stream(response)
    browser.streams.append(stream)
    done = await stream.done()
    assert (done["status"], done["text"]) == (Status.COMPLETE, expected(1))
    detail = await browser.conversation(conversation)
    assert [m["content"] for m in detail["messages"]] == ["hi \ufffd there \ufffd", expected(1)]
    assert detail["title"] == "hi \ufffd there \ufffd"
    status, listed = await browser.call("GET", "/api/conversations")
    assert [c["id"] for c in listed["conversations"]] == [conversation]  # nothing left behind


# Any code point, with the ones JSON bodies must escape (markup, newlines, lone surrogates) made frequent.
ANY_TEXT = st.text(
    st.characters(exclude_categories=())
    | st.sampled_from('<>&\n"\\\u2028')
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | ANY_TEXT,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
        max_leaves=12,
    )
)
def test_json_bodies_carry_any_text_and_never_raw_markup(value: Any) -> None:
    text = json_dumps(value)
    body = text.encode()  # lone surrogates included: always valid UTF-8
    assert json.loads(body) == value
    assert not {"<", ">", "&", "\n"} & set(text)


STATUSES = st.sampled_from(
    [ReplyStatus(phase) for phase in Phase if phase not in (Phase.QUEUED, Phase.TOOL, Phase.APPROVAL)]
    + [
        ReplyStatus(Phase.QUEUED, 3),
        ReplyStatus(Phase.TOOL, tool="Search the web"),
        ReplyStatus(Phase.APPROVAL, tool="Delete a file"),
    ]
)
LOOKALIKES = st.sampled_from([THINKING, REASONING, WAITING_FOR_PREVIOUS, queued_line(3)])  # a model may write these


@hypothesis_settings(max_examples=200, deadline=None)
@given(prefix=ANY_TEXT, edits=st.lists(ANY_TEXT | LOOKALIKES | STATUSES, min_size=1, max_size=6))
async def test_an_event_stream_shows_the_answer_so_far_and_each_edit_after_it(
    prefix: str, edits: list[str | ReplyStatus]
) -> None:
    target = EventStreamTarget(min_edit_interval=0.0, prefix=prefix)
    first = edits[0]
    handle = await (target.post_status(first) if isinstance(first, ReplyStatus) else target.post(first))
    for edit in edits[1:]:
        await (target.edit_status(handle, edit) if isinstance(edit, ReplyStatus) else target.edit(handle, edit))
    target.close(None)
    events = [event async for event in target.events() if event is not None]
    shown = ""
    for name, data in events:
        if name in ("delta", "replace"):
            shown = shown + data["text"] if name == "delta" else data["text"]
    # Statuses before the first text are status events; text that only looks like a status line is text, and
    # from the first text on, a status shows as its line.
    statuses = list(itertools.takewhile(lambda edit: isinstance(edit, ReplyStatus), edits))
    texts = [status_line(e) if isinstance(e, ReplyStatus) else e for e in edits[len(statuses) :]]
    assert shown == prefix + (texts[-1] if texts else "")
    assert events[-1][0] == "done" and events[-1][1]["text"] == shown
    assert [(data["kind"], data["text"], data["position"]) for name, data in events if name == "status"] == [
        (status.phase.value, status_line(status), status.position)
        for status in statuses
        if isinstance(status, ReplyStatus)
    ]


# -- escaping -----------------------------------------------------------------------------------------


async def test_markup_comes_back_escaped_and_is_stored_as_text(browsers: Callable[[], Browser]) -> None:
    browser = browsers()
    conversation = await browser.new(f'root ::= "{XSS_MODEL}"', max_tokens=64)
    stream = await browser.send(conversation, XSS_USER)
    done = await stream.done()
    assert done["text"] == XSS_MODEL
    assert b"<" not in stream.raw and b">" not in stream.raw  # every < and > travels as \u003c / \u003e
    await browser.call("PUT", f"/api/conversations/{conversation}/system_prompt", json={"system_prompt": XSS_USER})

    async with browser.request("GET", f"/api/conversations/{conversation}") as response:
        raw = await response.read()
    assert b"<" not in raw and b">" not in raw and b"\\u003cscript\\u003e" in raw
    detail = json.loads(raw)
    assert [m["content"] for m in detail["messages"]] == [XSS_USER, XSS_MODEL]
    assert detail["system_prompt"] == XSS_USER and detail["title"] == XSS_USER
    async with browser.request("GET", "/api/conversations") as response:
        assert b"<" not in await response.read()


# -- the page, access and start-up --------------------------------------------------------------------


async def test_page_is_self_contained_and_a_page_load_sets_no_cookie(browsers: Callable[[], Browser]) -> None:
    browser = browsers(origin=False)
    async with browser.request("GET", "/") as response:
        page = await response.text()
        assert response.status == 200 and response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        # A page load never gives an id: opened from another site's link it may arrive without the cookie,
        # and a fresh id would replace the browser's own.
        assert "Set-Cookie" not in response.headers
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    for name, kind in (
        ("app.js", "javascript"),
        ("markdown.js", "javascript"),
        ("style.css", "text/css"),
        ("vendor/markdown-it.min.js", "javascript"),
        ("vendor/purify.min.js", "javascript"),
    ):
        assert f'"/static/{name}"' in page, name
        async with browser.request("GET", f"/static/{name}") as response:
            assert response.status == 200 and kind in response.content_type, name
    assert (await browser.call("GET", "/api/conversations")) == (200, {"conversations": []})
    assert not list(browser.session.cookie_jar), "reading gives no id either"

    # The first conversation gives the id: HttpOnly, SameSite=Lax (other sites' requests are refused by the
    # Origin checks; a link from another site still carries it).
    async with browser.request("POST", "/api/conversations", headers={"Origin": browser.url.rstrip("/")}) as response:
        assert response.status == 201
        cookie = response.cookies["llamarelay_browser"]
        assert len(cookie.value) >= 43 and cookie["httponly"] and cookie["samesite"] == "Lax"
        assert not cookie["secure"]
    async with browser.request("POST", "/api/conversations", headers={"Origin": browser.url.rstrip("/")}) as response:
        assert response.status == 201 and "llamarelay_browser" not in response.cookies
    async with browser.request("GET", "/") as response:
        assert "Set-Cookie" not in response.headers
    # A forged, guessable id is not accepted: the server hands out a fresh random one instead.
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as forger,
        forger.post(browser.url + "api/conversations", headers={"Cookie": "llamarelay_browser=alice"}) as response,
    ):
        assert response.status == 201
        assert response.cookies["llamarelay_browser"].value not in ("alice", cookie.value)


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` exactly as written (no client normalizes it first): (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_static_files_never_leave_their_directory(server: WebServer) -> None:
    status, body = await raw_get(server.port, "/static/app.js")
    assert status == 200 and b"llamarelay" in body  # the raw client works
    for target in (
        "/static/../api.py",
        "/static/%2e%2e/api.py",
        "/static/%2E%2E/api.py",
        "/static/..%2fapi.py",
        "/static/%2e%2e%2fapi.py",
        "/static/vendor/../../api.py",
        "/static/vendor/%2e%2e/%2e%2e/api.py",
        "/static/..%5capi.py",
        "/static/%2e%2e/%2e%2e/bot/config.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
    ):
        status, body = await raw_get(server.port, target)
        assert status in (400, 403, 404), (target, status, body[:200])
        assert b"import" not in body and b"root:" not in body, target


async def test_access_token_is_required_once_set(manager: ConversationManager, settings: Settings) -> None:
    web = WebServer(create_app(manager, settings, Secrets(web_token="s3cret-token")), "127.0.0.1", 0)
    await web.start()
    browser = Browser(web.url, manager)
    try:
        status, body = await browser.call("GET", "/api/conversations")
        assert (status, body["error"]) == (401, "token_required")
        status, body = await browser.call("POST", "/api/login", json={"token": "wrong"})
        assert (status, body["error"]) == (401, "invalid_token")
        assert (await browser.call("GET", "/api/info"))[0] == 401
        headers = {"Authorization": "Bearer s3cret-token"}
        assert (await browser.call("GET", "/api/conversations", headers=headers)) == (200, {"conversations": []})

        async with browser.request("POST", "/api/login", json={"token": "s3cret-token"}) as response:
            assert response.status == 200
            auth = response.cookies["llamarelay_auth"]
            assert auth["httponly"] and auth["samesite"] == "Strict" and "s3cret-token" not in auth.value
        assert (await browser.call("GET", "/api/conversations"))[0] == 200
    finally:
        await browser.close()
        await web.close()


@contextlib.asynccontextmanager
async def serving(manager: ConversationManager, settings: Settings, secrets: Secrets) -> AsyncIterator[WebServer]:
    web = WebServer(create_app(manager, settings, secrets), "127.0.0.1", 0)
    await web.start()
    try:
        yield web
    finally:
        await web.close()


async def test_bearer_clients_keep_one_namespace_without_a_cookie_jar(
    manager: ConversationManager, settings: Settings
) -> None:
    async with (
        serving(manager, settings, Secrets(web_token="s3cret-token")) as web,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
    ):
        bearer = {"Authorization": "Bearer s3cret-token"}
        async with client.post(web.url + "api/conversations", headers=bearer) as response:
            assert response.status == 201 and "llamarelay_browser" not in response.cookies
            conversation = (await response.json())["id"]
        async with client.get(web.url + "api/conversations", headers=bearer) as response:
            assert [c["id"] for c in (await response.json())["conversations"]] == [conversation]
        async with client.get(web.url + f"api/conversations/{conversation}", headers=bearer) as response:
            assert response.status == 200

        # A browser that logged in with the same token has its own conversations, not the API's.
        browser = Browser(web.url, manager)
        try:
            assert (await browser.call("POST", "/api/login", json={"token": "s3cret-token"}))[0] == 200
            assert await browser.call("GET", "/api/conversations") == (200, {"conversations": []})
        finally:
            await browser.close()

    # Another token is another namespace: a leaked and replaced token no longer reaches the conversations.
    async with (
        serving(manager, settings, Secrets(web_token="new-token")) as web,
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
        client.get(web.url + "api/conversations", headers={"Authorization": "Bearer new-token"}) as response,
    ):
        assert await response.json() == {"conversations": []}


async def test_login_is_throttled_per_client(manager: ConversationManager, settings: Settings) -> None:
    async with serving(manager, settings, Secrets(web_token="s3cret-token")) as web:
        browser = Browser(web.url, manager)
        try:
            for _ in range(LOGIN_FAILURES_ALLOWED):
                status, body = await browser.call("POST", "/api/login", json={"token": "guess"})
                assert (status, body["error"]) == (401, "invalid_token")
            for token in ("guess", "s3cret-token"):  # while throttled even the right token must wait
                async with browser.request("POST", "/api/login", json={"token": token}) as response:
                    body = await response.json()
                    assert (response.status, body["error"]) == (429, "too_many_attempts")
                    retry_after = int(response.headers["Retry-After"])
                    assert 0 < retry_after <= LOGIN_WINDOW_SECONDS and f"{retry_after} seconds" in body["message"]
            assert (await browser.call("GET", "/api/conversations"))[0] == 401

            throttle = web.app[STATE].login_throttle
            later = time.monotonic() + LOGIN_WINDOW_SECONDS + 1
            throttle.clock = lambda: later  # the window has passed
            assert (await browser.call("POST", "/api/login", json={"token": "s3cret-token"})) == (
                200,
                {"authenticated": True},
            )
            assert (await browser.call("GET", "/api/conversations"))[0] == 200
        finally:
            await browser.close()


async def test_cookies_are_secure_behind_a_trusted_tls_proxy(manager: ConversationManager, settings: Settings) -> None:
    proxied = {"X-Forwarded-Proto": "https"}
    for trusted in (False, True):
        settings.web.trust_forwarded_proto = trusted
        async with (
            serving(manager, settings, Secrets(web_token="s3cret-token")) as web,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client,
        ):
            async with client.post(web.url + "api/login", json={"token": "s3cret-token"}, headers=proxied) as response:
                auth = response.cookies["llamarelay_auth"]
            headers = {**proxied, "Cookie": f"llamarelay_auth={auth.value}"}
            async with client.post(web.url + "api/conversations", headers=headers) as response:
                assert response.status == 201
                browser = response.cookies["llamarelay_browser"]
            assert bool(auth["secure"]) is trusted and bool(browser["secure"]) is trusted, trusted
            # Without the header (plain HTTP straight to the bot) nothing is marked Secure, trusted or not.
            async with client.post(web.url + "api/conversations", headers={"Cookie": headers["Cookie"]}) as response:
                assert not response.cookies["llamarelay_browser"]["secure"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_run_web_serves_until_cancelled(manager: ConversationManager, settings: Settings) -> None:
    settings.web.port = free_port()
    task = asyncio.create_task(run_web(manager, settings, Secrets()))
    url = f"http://127.0.0.1:{settings.web.port}/"
    async with aiohttp.ClientSession() as session:

        async def serving() -> bool:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(url + "api/info") as response:
                    return response.status == 200 and (await response.json())["max_message_chars"] > 0
            assert not task.done(), task
            return False

        await wait_for(serving, "the web server to answer")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", settings.web.port), timeout=2):
        pass


async def test_start_up_errors_are_one_clear_line(manager: ConversationManager, settings: Settings) -> None:
    settings.web.host = "0.0.0.0"
    with pytest.raises(ConfigError, match="LLAMARELAY_WEB_TOKEN") as error:
        await run_web(manager, settings, Secrets())
    assert "\n" not in str(error.value)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings.web.host, settings.web.port = "127.0.0.1", taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {settings.web.port}\b.*\[web\] port") as error:
            await run_web(manager, settings, Secrets())
        assert "\n" not in str(error.value)
