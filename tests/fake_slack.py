"""A fake Slack Web API + Socket Mode server on 127.0.0.1, for driving the real slack-bolt app in tests.

It records every Web API call, keeps the text and blocks of every message the bot posts (so tests assert what
a user would see), pushes Socket Mode envelopes on demand (events, slash commands, and interactive payloads
built from what the bot really sent: a press on a button of a posted message, a message shortcut, a modal
submission) and collects their acks by ``envelope_id``, sends ``disconnect`` frames, serves files at
``url_private`` to the bot token only, and can script failures: 429 with ``Retry-After``, ``msg_too_long``,
``message_not_in_streaming_state``. Shapes follow docs/platform-protocol-notes.md section 2.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

__all__ = ["FakeSlack", "ApiCall", "FakeMessage", "ScriptedFailure"]

log = logging.getLogger(__name__)

BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"
BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
TEAM_ID = "T1"
API_APP_ID = "A1"
# Slack documents 40k but answers msg_too_long near 4k; the fake enforces the practical limit.
MAX_TEXT_CHARS = 4000
SECTION_TEXT_CHARS = 3000  # Block Kit: a section block's text
DEFAULT_TIMEOUT_SECONDS = 60.0

T = TypeVar("T")


@dataclass
class ApiCall:
    """One Web API request as the fake received it."""

    method: str
    args: dict[str, Any]
    token: str | None
    at: float
    status: int = 200
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class FakeMessage:
    """A message in the fake workspace (posted by the bot unless ``user`` says otherwise); ``versions`` holds
    every text it has shown, oldest first, and ``blocks`` what it shows now (text section, buttons)."""

    channel: str
    ts: str
    thread_ts: str | None
    text: str
    versions: list[str] = field(default_factory=list)
    streaming: bool = False
    stream_expired: bool = False
    deleted: bool = False
    user: str = BOT_USER_ID
    blocks: list[dict[str, Any]] = field(default_factory=list)
    subtype: str | None = None

    @property
    def buttons(self) -> dict[str, dict[str, Any]]:
        """The interactive elements under the message, by action_id."""
        return {
            element["action_id"]: element
            for block in self.blocks
            if block.get("type") in ("actions", "context_actions")
            for element in block.get("elements", [])
        }

    @property
    def selects(self) -> dict[str, dict[str, Any]]:
        """The static selects in the message (a section's accessory or in an actions block), by action_id, each
        with its block's ``block_id``."""
        found = {}
        for block in self.blocks:
            elements = [block["accessory"]] if "accessory" in block else block.get("elements", [])
            for element in elements:
                if element.get("type") == "static_select":
                    found[element["action_id"]] = {**element, "block_id": block.get("block_id") or "b"}
        return found

    def as_event(self) -> dict[str, Any]:
        """The message as Slack shows it in API answers and interaction payloads."""
        message: dict[str, Any] = {"type": "message", "user": self.user, "text": self.text, "ts": self.ts}
        if self.user == BOT_USER_ID:
            message["bot_id"] = BOT_ID
        if self.thread_ts:
            message["thread_ts"] = self.thread_ts
        if self.blocks:
            message["blocks"] = self.blocks
        if self.subtype:
            message["subtype"] = self.subtype
        return message


def _valid_select(select: dict[str, Any]) -> bool:
    """Block Kit's rules for a static select: 1-100 options, texts and descriptions of at most 75 characters,
    values of at most 150, and an initial option that is one of the options."""
    options = select.get("options") or []
    texts = [o["text"]["text"] for o in options] + [o["description"]["text"] for o in options if "description" in o]
    return (
        0 < len(options) <= 100
        and all(len(text) <= 75 for text in texts)
        and all(0 < len(o.get("value") or "") <= 150 for o in options)
        and select.get("initial_option", options[0]) in options
    )


@dataclass
class FakeFile:
    """A file users shared, served at ``url_private`` to the bot token only."""

    id: str
    name: str
    data: bytes
    mimetype: str
    size: int

    def info(self, base: str) -> dict[str, Any]:
        url = f"{base}/files/{self.id}/{self.name}"
        return {
            "id": self.id,
            "name": self.name,
            "title": self.name,
            "mimetype": self.mimetype,
            "filetype": self.name.rsplit(".", 1)[-1],
            "size": self.size,
            "mode": "hosted",
            "url_private": url,
            "url_private_download": url + "?download=1",
        }


@dataclass
class ScriptedFailure:
    """The next call(s) to ``method`` matching ``when`` fail with ``error`` (HTTP ``status``)."""

    method: str
    error: str
    status: int = 200
    retry_after: int | None = None
    times: int = 1
    when: Callable[[dict[str, Any]], bool] | None = None


class FakeSlack:
    """Fake Slack: ``base_url`` for ``AsyncWebClient(base_url=...)``; Socket Mode at ``/link/``."""

    def __init__(self, *, echo_bot_messages: bool = False) -> None:
        self.echo_bot_messages = echo_bot_messages
        """Push a ``message`` event for each bot post and ``message_changed`` for each edit, as Slack does."""
        self.calls: list[ApiCall] = []
        self.messages: dict[str, FakeMessage] = {}
        self.users: dict[str, dict[str, Any]] = {}
        """Profiles users.info answers with, by user id (``user_profile`` builds one)."""
        self.files: dict[str, FakeFile] = {}
        self.downloads: list[str] = []  # names of files the bot fetched
        self.views: list[dict[str, Any]] = []  # modals the bot opened
        self.acks: dict[str, dict[str, Any]] = {}
        self.connections_opened = 0
        self.sockets_connected = 0
        self._failures: list[ScriptedFailure] = []
        self._ts_counter = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._cond = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._echo_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.add_routes(
            [
                web.post("/api/{method}", self._api),
                web.get("/api/{method}", self._api),  # slack-sdk reads some methods (users.info) with GET
                web.get("/link/", self._socket),
                web.post("/response/{id}", self._response_url),
                web.get("/files/{id}/{name}", self._file),
            ]
        )
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        for task in list(self._echo_tasks):
            task.cancel()
        await asyncio.gather(*self._echo_tasks, return_exceptions=True)
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    def response_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._port}/response/{name}"

    # -- workspace content -----------------------------------------------------------------------

    def add_user(self, user: str, display_name: str, real_name: str = "") -> None:
        self.users[user] = {
            "id": user,
            "name": user.lower(),
            "real_name": real_name or display_name,
            "profile": {"display_name": display_name, "real_name": real_name or display_name},
        }

    def add_file(
        self, name: str, data: bytes, mimetype: str = "text/plain", *, size: int | None = None
    ) -> dict[str, Any]:
        """Share a file; returns its object as Slack puts it in a message event's ``files``."""
        file = FakeFile(f"F{len(self.files) + 1:04d}", name, data, mimetype, len(data) if size is None else size)
        self.files[file.id] = file
        return file.info(f"http://127.0.0.1:{self._port}")

    def user_message(
        self,
        channel: str,
        text: str,
        *,
        user: str = "U1",
        thread_ts: str | None = None,
        files: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A person writes in ``channel``: the message is kept (conversations.replies sees it) and its
        ``message`` event returned, ready for `push_event`."""
        message = FakeMessage(channel, self.new_ts(), thread_ts, text, [text], user=user)
        self.messages[message.ts] = message
        event = {
            "type": "message",
            "user": user,
            "text": text,
            "ts": message.ts,
            "channel": channel,
            "event_ts": message.ts,
            "team": TEAM_ID,
            "channel_type": "im" if channel.startswith("D") else "channel",
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        if files:
            event |= {"subtype": "file_share", "files": files}
        return event

    # -- scripting -------------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        error: str,
        *,
        status: int = 200,
        retry_after: int | None = None,
        times: int = 1,
        when: Callable[[dict[str, Any]], bool] | None = None,
    ) -> ScriptedFailure:
        """Make the next ``times`` calls to ``method`` (matching ``when``) fail with ``error``."""
        failure = ScriptedFailure(method, error, status, retry_after, times, when)
        self._failures.append(failure)
        return failure

    def rate_limit(
        self, method: str, *, retry_after: int = 1, times: int = 1, when: Callable[[dict[str, Any]], bool] | None = None
    ) -> ScriptedFailure:
        """Answer the next ``times`` calls to ``method`` with HTTP 429 and ``Retry-After``."""
        return self.fail(method, "ratelimited", status=429, retry_after=retry_after, times=times, when=when)

    def expire_streams(self) -> None:
        """End every native stream server-side: appendStream/stopStream now fail, chat.update still works."""
        for message in self.messages.values():
            if message.streaming:
                message.stream_expired = True

    # -- queries ---------------------------------------------------------------------------------

    def calls_to(self, method: str, *, ok_only: bool = False) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and (c.ok or not ok_only)]

    def messages_in(self, channel: str, thread_ts: str | None = None) -> list[FakeMessage]:
        """Messages the bot posted in ``channel`` (and in ``thread_ts`` when given), oldest first."""
        return [
            m
            for m in self.messages.values()
            if m.channel == channel
            and not m.deleted
            and m.user == BOT_USER_ID
            and m.subtype is None
            and (thread_ts is None or m.thread_ts == thread_ts)
        ]

    def ephemeral_texts(self, user: str | None = None) -> list[str]:
        """What the bot showed to one person only (chat.postEphemeral and ephemeral response_url posts)."""
        texts = [
            str(c.args.get("text"))
            for c in self.calls_to("chat.postEphemeral", ok_only=True)
            if user is None or c.args.get("user") == user
        ]
        return texts + [
            str(c.args.get("text")) for c in self.calls_to("response_url") if c.args.get("response_type") == "ephemeral"
        ]

    def texts_sent(self) -> list[str]:
        """Every text the bot sent to Slack, in any method (to check nothing can ping)."""
        texts = []
        for call in self.calls:
            if call.method.startswith(("chat.", "response_url")):
                texts.append(str(call.args.get("text") or ""))
                if call.method.endswith("Stream"):
                    texts.append(self._chunk_text(call))
        return texts

    async def wait_for(
        self, predicate: Callable[[], T], *, timeout: float = DEFAULT_TIMEOUT_SECONDS, what: str = "condition"
    ) -> T:
        """Wait until ``predicate()`` is truthy (re-checked on every call, ack and connection)."""
        async with self._cond:
            try:
                return await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
            except TimeoutError:
                raise AssertionError(f"fake Slack: timed out after {timeout}s waiting for {what}") from None

    async def _changed(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    # -- Socket Mode -----------------------------------------------------------------------------

    async def wait_connected(self, count: int = 1, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        """Wait until ``count`` sockets have connected in total and one is open."""
        await self.wait_for(
            lambda: self.sockets_connected >= count and self._open_socket() is not None,
            timeout=timeout,
            what=f"{count} socket connection(s)",
        )

    @property
    def open_sockets(self) -> int:
        """Socket Mode connections open right now."""
        return sum(not ws.closed for ws in self._sockets)

    def _open_socket(self, to: int | None = None) -> web.WebSocketResponse | None:
        open_sockets = [ws for ws in self._sockets if not ws.closed]
        return open_sockets[-1 if to is None else to] if open_sockets else None

    async def push(
        self,
        type_: str,
        payload: dict[str, Any],
        *,
        accepts_response_payload: bool = False,
        retry_attempt: int = 0,
        retry_reason: str = "",
        to: int | None = None,
    ) -> str:
        """Send one envelope on the newest open socket (``to``: the open socket at that index, oldest first, as
        Slack spreads envelopes over an app's connections); return its envelope_id."""
        ws = self._open_socket(to)
        if ws is None:
            raise AssertionError("fake Slack: no Socket Mode client is connected")
        envelope_id = str(uuid.uuid4())
        await ws.send_str(
            json.dumps(
                {
                    "envelope_id": envelope_id,
                    "type": type_,
                    "payload": payload,
                    "accepts_response_payload": accepts_response_payload,
                    "retry_attempt": retry_attempt,
                    "retry_reason": retry_reason,
                }
            )
        )
        return envelope_id

    async def push_event(
        self, event: dict[str, Any], *, event_id: str | None = None, retry_attempt: int = 0, to: int | None = None
    ) -> str:
        """Push an ``events_api`` envelope; a redelivery keeps the event_id and raises retry_attempt."""
        return await self.push(
            "events_api",
            self.event_body(event, event_id=event_id),
            retry_attempt=retry_attempt,
            retry_reason="timeout" if retry_attempt else "",
            to=to,
        )

    async def push_command(
        self, command: str, text: str = "", *, user: str = "U1", channel: str = "C1", channel_name: str = "general"
    ) -> str:
        return await self.push(
            "slash_commands",
            self.command_body(command, text, user=user, channel=channel, channel_name=channel_name),
            accepts_response_payload=True,
        )

    async def push_interactive(self, payload: dict[str, Any]) -> str:
        """Push an ``interactive`` envelope (block_actions, message_action, view_submission)."""
        return await self.push("interactive", payload, accepts_response_payload=True)

    def _interaction(self, type_: str, user: str, **extra: Any) -> dict[str, Any]:
        trigger = uuid.uuid4().hex[:8]
        return {
            "type": type_,
            "token": "verification-token-unused",
            "api_app_id": API_APP_ID,
            "team": {"id": TEAM_ID, "domain": "fake"},
            "is_enterprise_install": False,
            "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM_ID},
            "trigger_id": trigger,
            "response_url": self.response_url(trigger),
            **extra,
        }

    async def press(self, message: FakeMessage, action_id: str, *, user: str = "U1", positive: bool = True) -> str:
        """Press the button ``action_id`` that ``message`` shows now (for feedback buttons: 👍 or 👎)."""
        element = message.buttons.get(action_id)
        if element is None:
            raise AssertionError(f"fake Slack: message {message.ts} has no {action_id!r} button: {message.blocks}")
        if element["type"] == "feedback_buttons":
            value = element["positive_button" if positive else "negative_button"]["value"]
        else:
            value = element["value"]
        container = {
            "type": "message",
            "message_ts": message.ts,
            "channel_id": message.channel,
            "is_ephemeral": False,
            **({"thread_ts": message.thread_ts} if message.thread_ts else {}),
        }
        return await self.push_interactive(
            self._interaction(
                "block_actions",
                user,
                container=container,
                channel={"id": message.channel, "name": "general"},
                message=message.as_event(),
                state={"values": {}},
                actions=[
                    {
                        "action_id": action_id,
                        "block_id": "b",
                        "type": element["type"],
                        "value": value,
                        "action_ts": str(time.time()),
                    }
                ],
            )
        )

    async def choose(self, message: FakeMessage, action_id: str, value: str, *, user: str = "U1") -> str:
        """Pick the option whose value is ``value`` in the select ``action_id`` that ``message`` shows now."""
        select = message.selects.get(action_id)
        if select is None:
            raise AssertionError(f"fake Slack: message {message.ts} has no {action_id!r} select: {message.blocks}")
        option = next((o for o in select["options"] if o["value"] == value), None)
        if option is None:
            raise AssertionError(f"fake Slack: the {action_id!r} select has no option {value!r}: {select}")
        container = {
            "type": "message",
            "message_ts": message.ts,
            "channel_id": message.channel,
            "is_ephemeral": False,
            **({"thread_ts": message.thread_ts} if message.thread_ts else {}),
        }
        block_id = select["block_id"]
        return await self.push_interactive(
            self._interaction(
                "block_actions",
                user,
                container=container,
                channel={"id": message.channel, "name": "directmessage"},
                message=message.as_event(),
                state={"values": {block_id: {action_id: {"type": "static_select", "selected_option": option}}}},
                actions=[
                    {
                        "action_id": action_id,
                        "block_id": block_id,
                        "type": "static_select",
                        "selected_option": option,
                        "placeholder": select.get("placeholder"),
                        "action_ts": str(time.time()),
                    }
                ],
            )
        )

    async def message_shortcut(self, callback_id: str, message: FakeMessage, *, user: str = "U1") -> str:
        """Use a message shortcut on ``message``."""
        return await self.push_interactive(
            self._interaction(
                "message_action",
                user,
                callback_id=callback_id,
                channel={"id": message.channel, "name": "general"},
                message=message.as_event(),
                message_ts=message.ts,
                action_ts=str(time.time()),
            )
        )

    async def submit_view(self, view: dict[str, Any], values: dict[str, dict[str, str]], *, user: str = "U1") -> str:
        """Submit a modal the bot opened, with ``values`` as {block_id: {action_id: typed text}}."""
        state = {
            block: {action: {"type": "plain_text_input", "value": text} for action, text in inputs.items()}
            for block, inputs in values.items()
        }
        return await self.push_interactive(
            self._interaction(
                "view_submission", user, view={**view, "id": f"V{len(self.views)}", "state": {"values": state}}
            )
        )

    async def start_assistant_thread(self, *, user: str = "U2", channel: str = "D1") -> tuple[str, str]:
        """A user opens a new assistant thread: its root message, then ``assistant_thread_started``.
        Returns (thread_ts, envelope_id)."""
        root = FakeMessage(channel, self.new_ts(), None, "New chat", ["New chat"], subtype="assistant_app_thread")
        self.messages[root.ts] = root
        envelope = await self.push_event(
            {
                "type": "assistant_thread_started",
                "event_ts": self.new_ts(),
                "assistant_thread": {
                    "user_id": user,
                    "channel_id": channel,
                    "thread_ts": root.ts,
                    "context": {"channel_id": "C1", "team_id": TEAM_ID, "enterprise_id": None},
                },
            }
        )
        return root.ts, envelope

    async def wait_ack(self, envelope_id: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> dict[str, Any]:
        """The ack frame the client sent for ``envelope_id``."""
        await self.wait_for(lambda: envelope_id in self.acks, timeout=timeout, what=f"ack of envelope {envelope_id}")
        return self.acks[envelope_id]

    async def send_disconnect(self, reason: str = "refresh_requested") -> None:
        """Ask the client to reconnect, as Slack does before rotating a socket."""
        ws = self._open_socket()
        if ws is None:
            raise AssertionError("fake Slack: no Socket Mode client is connected")
        await ws.send_str(json.dumps({"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}))

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        # autoping=True echoes the SDK's "sdk-ping-pong:<t>" pings as pongs.
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        self.sockets_connected += 1
        await ws.send_str(
            json.dumps({"type": "hello", "num_connections": 1, "connection_info": {"app_id": API_APP_ID}})
        )
        await self._changed()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                if "envelope_id" in frame:
                    self.acks[frame["envelope_id"]] = frame
                    await self._changed()
        finally:
            await self._changed()
        return ws

    # -- payload builders ------------------------------------------------------------------------

    def event_body(self, event: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
        """The ``event_callback`` body Slack wraps around an event (Socket Mode payload or HTTP body)."""
        return {
            "token": "verification-token-unused",
            "team_id": TEAM_ID,
            "api_app_id": API_APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": TEAM_ID,
                    "user_id": BOT_USER_ID,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
        }

    def command_body(
        self, command: str, text: str = "", *, user: str = "U1", channel: str = "C1", channel_name: str = "general"
    ) -> dict[str, str]:
        trigger = uuid.uuid4().hex[:8]
        return {
            "token": "verification-token-unused",
            "team_id": TEAM_ID,
            "team_domain": "fake",
            "channel_id": channel,
            "channel_name": channel_name,
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "api_app_id": API_APP_ID,
            "is_enterprise_install": "false",
            "response_url": self.response_url(trigger),
            "trigger_id": trigger,
        }

    def new_ts(self) -> str:
        return f"{1700000000 + next(self._ts_counter)}.000100"

    # -- Web API ---------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        raw = await request.read()
        if raw:
            if request.content_type == "application/json":
                args.update(json.loads(raw))
            else:
                args.update(parse_qsl(raw.decode()))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else args.pop("token", None)
        call = ApiCall(method, args, token, time.monotonic())
        self.calls.append(call)
        try:
            return self._answer(call)
        finally:
            await self._changed()

    def _answer(self, call: ApiCall) -> web.Response:
        expected = APP_TOKEN if call.method == "apps.connections.open" else BOT_TOKEN
        if call.token != expected:
            return self._error(call, "invalid_auth")
        failure = self._take_failure(call)
        if failure is not None:
            headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else None
            return self._error(call, failure.error, status=failure.status, headers=headers)
        handler = getattr(self, "_m_" + call.method.replace(".", "_"), None)
        if handler is None:
            return self._error(call, "unknown_method", status=404)
        result = handler(call)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"ok": True, **result})

    def _take_failure(self, call: ApiCall) -> ScriptedFailure | None:
        for failure in self._failures:
            if (
                failure.method == call.method
                and failure.times > 0
                and (failure.when is None or failure.when(call.args))
            ):
                failure.times -= 1
                return failure
        return None

    @staticmethod
    def _error(call: ApiCall, error: str, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        call.status, call.error = status, error
        return web.json_response({"ok": False, "error": error}, status=status, headers=headers)

    def _m_auth_test(self, call: ApiCall) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.test/",
            "team": "Fake",
            "user": "llamarelay",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _m_apps_connections_open(self, call: ApiCall) -> dict[str, Any]:
        self.connections_opened += 1
        return {"url": f"ws://127.0.0.1:{self._port}/link/?ticket={uuid.uuid4().hex}"}

    def _text_of(self, call: ApiCall) -> str | web.Response:
        text = str(call.args.get("text") or "")
        if len(text) > MAX_TEXT_CHARS:
            return self._error(call, "msg_too_long")
        return text

    def _blocks_of(self, call: ApiCall) -> list[dict[str, Any]] | None | web.Response:
        """The call's blocks (None when it has none), or invalid_blocks as Slack answers for a too-long section."""
        blocks = call.args.get("blocks")
        if blocks is None:
            return None
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        for block in blocks:
            if block.get("type") == "section" and len(block.get("text", {}).get("text", "")) > SECTION_TEXT_CHARS:
                return self._error(call, "invalid_blocks")
            select = block.get("accessory") or {}
            if select.get("type") == "static_select" and not _valid_select(select):
                return self._error(call, "invalid_blocks")
        return list(blocks)

    def _m_chat_postMessage(self, call: ApiCall) -> dict[str, Any] | web.Response:
        text = self._text_of(call)
        if isinstance(text, web.Response):
            return text
        blocks = self._blocks_of(call)
        if isinstance(blocks, web.Response):
            return blocks
        channel = str(call.args.get("channel", ""))
        if channel.startswith("U"):  # posting to a user id opens the app's DM with them
            channel = "D" + channel[1:]
        thread_ts = call.args.get("thread_ts") or None
        message = FakeMessage(channel, self.new_ts(), thread_ts, text, [text], blocks=blocks or [])
        self.messages[message.ts] = message
        self._echo(
            {
                "type": "message",
                "channel": channel,
                "user": BOT_USER_ID,
                "bot_id": BOT_ID,
                "text": text,
                "ts": message.ts,
                **({"thread_ts": thread_ts} if thread_ts else {}),
                "channel_type": "im" if channel.startswith("D") else "channel",
            }
        )
        return {
            "channel": channel,
            "ts": message.ts,
            "message": {"type": "message", "text": text, "user": BOT_USER_ID, "bot_id": BOT_ID, "ts": message.ts},
        }

    def _m_chat_update(self, call: ApiCall) -> dict[str, Any] | web.Response:
        text = self._text_of(call)
        if isinstance(text, web.Response):
            return text
        blocks = self._blocks_of(call)
        if isinstance(blocks, web.Response):
            return blocks
        message = self.messages.get(str(call.args.get("ts", "")))
        if message is None or message.deleted or message.channel != call.args.get("channel"):
            return self._error(call, "message_not_found")
        message.text = text
        message.versions.append(text)
        if blocks is not None:
            message.blocks = blocks
        message.streaming = False
        self._echo(
            {
                "type": "message",
                "subtype": "message_changed",
                "channel": message.channel,
                "hidden": True,
                "ts": self.new_ts(),
                "event_ts": self.new_ts(),
                "message": {
                    "type": "message",
                    "text": text,
                    "user": BOT_USER_ID,
                    "bot_id": BOT_ID,
                    "ts": message.ts,
                    "edited": {"user": BOT_USER_ID, "ts": self.new_ts()},
                },
                "channel_type": "im" if message.channel.startswith("D") else "channel",
            }
        )
        return {"channel": message.channel, "ts": message.ts, "text": text}

    def _m_chat_delete(self, call: ApiCall) -> dict[str, Any] | web.Response:
        message = self.messages.get(str(call.args.get("ts", "")))
        if message is None or message.deleted or message.channel != call.args.get("channel"):
            return self._error(call, "message_not_found")
        message.deleted = True
        return {"channel": message.channel, "ts": message.ts}

    def _m_chat_postEphemeral(self, call: ApiCall) -> dict[str, Any]:
        return {"message_ts": self.new_ts()}

    @staticmethod
    def _chunk_text(call: ApiCall) -> str:
        chunks = call.args.get("chunks") or []
        if isinstance(chunks, str):
            chunks = json.loads(chunks)
        text = "".join(c.get("text", "") for c in chunks if c.get("type") == "markdown_text")
        return text + str(call.args.get("markdown_text") or "")

    def _m_chat_startStream(self, call: ApiCall) -> dict[str, Any] | web.Response:
        if not call.args.get("thread_ts"):
            return self._error(call, "invalid_arguments")
        channel = str(call.args.get("channel", ""))
        if not channel.startswith("D") and not (
            call.args.get("recipient_team_id") and call.args.get("recipient_user_id")
        ):
            return self._error(call, "invalid_arguments")
        text = self._chunk_text(call)
        message = FakeMessage(channel, self.new_ts(), call.args["thread_ts"], text, [text], streaming=True)
        self.messages[message.ts] = message
        return {"channel": channel, "ts": message.ts}

    def _streaming_message(self, call: ApiCall) -> FakeMessage | web.Response:
        message = self.messages.get(str(call.args.get("ts", "")))
        if message is None:
            return self._error(call, "message_not_found")
        if not message.streaming or message.stream_expired:
            return self._error(call, "message_not_in_streaming_state")
        return message

    def _m_chat_appendStream(self, call: ApiCall) -> dict[str, Any] | web.Response:
        message = self._streaming_message(call)
        if isinstance(message, web.Response):
            return message
        message.text += self._chunk_text(call)
        message.versions.append(message.text)
        return {"channel": message.channel, "ts": message.ts}

    def _m_chat_stopStream(self, call: ApiCall) -> dict[str, Any] | web.Response:
        message = self._streaming_message(call)
        if isinstance(message, web.Response):
            return message
        message.text += self._chunk_text(call)
        message.versions.append(message.text)
        blocks = self._blocks_of(call)
        if isinstance(blocks, web.Response):
            return blocks
        message.blocks = blocks or []
        message.streaming = False
        return {"channel": message.channel, "ts": message.ts}

    def _m_assistant_threads_setStatus(self, call: ApiCall) -> dict[str, Any]:
        return {}

    def _m_assistant_threads_setTitle(self, call: ApiCall) -> dict[str, Any]:
        return {}

    def _m_assistant_threads_setSuggestedPrompts(self, call: ApiCall) -> dict[str, Any]:
        return {}

    def _m_users_info(self, call: ApiCall) -> dict[str, Any] | web.Response:
        user = self.users.get(str(call.args.get("user")))
        return {"user": user} if user is not None else self._error(call, "user_not_found")

    def _m_views_open(self, call: ApiCall) -> dict[str, Any] | web.Response:
        view = call.args.get("view")
        if isinstance(view, str):
            view = json.loads(view)
        if not call.args.get("trigger_id") or not isinstance(view, dict) or view.get("type") != "modal":
            return self._error(call, "invalid_arguments")
        if len(str(view.get("private_metadata") or "")) > 3000:
            return self._error(call, "invalid_arguments")
        self.views.append(view)
        return {"view": {**view, "id": f"V{len(self.views)}"}}

    def _m_conversations_replies(self, call: ApiCall) -> dict[str, Any] | web.Response:
        channel, ts = str(call.args.get("channel")), str(call.args.get("ts"))
        thread = sorted(
            (
                m
                for m in self.messages.values()
                if m.channel == channel and not m.deleted and (m.ts == ts or m.thread_ts == ts)
            ),
            key=lambda m: float(m.ts),
        )
        if not thread:
            return self._error(call, "thread_not_found")
        start, limit = int(call.args.get("cursor") or 0), int(call.args.get("limit") or 1000)
        page = thread[start : start + limit]
        more = start + limit < len(thread)
        return {
            "messages": [m.as_event() for m in page],
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    async def _file(self, request: web.Request) -> web.StreamResponse:
        file = self.files.get(request.match_info["id"])
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            # Slack answers a request without the token with its login page, not an error.
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        if file is None:
            raise web.HTTPNotFound()
        self.downloads.append(file.name)
        await self._changed()
        return web.Response(body=file.data, content_type=file.mimetype)

    async def _response_url(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(ApiCall("response_url", body, None, time.monotonic()))
        await self._changed()
        return web.Response(text="ok")

    def _echo(self, event: dict[str, Any]) -> None:
        """Deliver the bot's own message back to it, as Slack does for subscribed channels."""
        if not self.echo_bot_messages or self._open_socket() is None:
            return
        task = asyncio.ensure_future(self._push_quietly(event))
        self._echo_tasks.add(task)
        task.add_done_callback(self._echo_tasks.discard)

    async def _push_quietly(self, event: dict[str, Any]) -> None:
        # Yield first so the API response reaches the bot before its own echo, as with Slack.
        await asyncio.sleep(0)
        try:
            await self.push_event(event)
        except (AssertionError, ConnectionError) as exc:
            log.debug("echo not delivered: %s", exc)
