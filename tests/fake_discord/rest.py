"""The REST half of the fake Discord: login, command sync, member lookups, messages, typing, interactions.

Every request is recorded with the status it got. Tests can script failures (429 with or without ``Via``),
enforce a per-channel write bucket announced in ``X-RateLimit-*`` headers, and wait on any condition.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_discord.payloads import (
    ALICE_ID,
    APP_ID,
    BOB_ID,
    BOT_ID,
    CHANNEL_ID,
    EPHEMERAL_FLAG,
    EVE_ID,
    EXTRA_CHANNEL_BASE,
    GUILD_CHANNELS,
    GUILD_ID,
    LOADING_FLAG,
    MALLORY_ID,
    MEMBER_ROLE_ID,
    OTHER_BOT_ID,
    OTHER_CHANNEL_ID,
    jresp,
    member_payload,
    message_payload,
    now_iso,
    user_payload,
)

__all__ = ["FakeRest", "FakeInteraction", "Recorded"]

NO_MENTIONS = {"parse": []}


@dataclass
class Recorded:
    """One REST request as the fake saw it, with the status it answered."""

    method: str
    path: str  # after /api/v10
    query: dict[str, str]
    body: Any
    status: int = 0
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Scripted:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    retry_after: float
    via: bool
    every: int = 1  # only every n-th matching request is answered so
    seen: int = 0


@dataclass
class FakeInteraction:
    """An interaction the fake pushed, and what the bot answered through its callback and webhook."""

    id: int
    token: str
    channel_id: int
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    original_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    message_id: int | None = None  # the message whose button was pressed (component interactions)


class FakeRest:
    """State and REST handlers; `FakeDiscord` adds the gateway and the server around them."""

    def __init__(self) -> None:
        self.bot_user = user_payload(BOT_ID, "llamarelay", bot=True)
        self.users: dict[int, dict[str, Any]] = {
            ALICE_ID: user_payload(ALICE_ID, "alice", global_name="Alice"),
            BOB_ID: user_payload(BOB_ID, "bob", global_name="Bob"),
            MALLORY_ID: user_payload(MALLORY_ID, "mallory", global_name="Mallory"),
            OTHER_BOT_ID: user_payload(OTHER_BOT_ID, "otherbot", bot=True),
            EVE_ID: user_payload(EVE_ID, "eve", global_name="Eve"),
        }
        # The guild's members and their roles (Eve is not one).
        self.member_roles: dict[int, list[int]] = {
            ALICE_ID: [MEMBER_ROLE_ID],
            BOB_ID: [MEMBER_ROLE_ID],
            MALLORY_ID: [],
            OTHER_BOT_ID: [],
        }
        self.requests: list[Recorded] = []
        self.messages: dict[int, dict[str, Any]] = {}
        self.contents: dict[int, list[str]] = {}  # every content a message has had, in order
        self.interactions: dict[str, FakeInteraction] = {}
        self.commands: dict[str, dict[str, Any]] = {}
        self.text_channel_ids = [CHANNEL_ID, OTHER_CHANNEL_ID]  # the guild's text channels, sent in GUILD_CREATE
        self.rate_limit_violations = 0  # writes that came although the bucket had said Remaining: 0
        self._ids = itertools.count(1_000_000_000_000_000_000)
        self._nonces: dict[str, int] = {}
        self._scripted: list[_Scripted] = []
        self.expired_tokens: set[str] = set()  # interactions whose 15-minute webhook token has run out
        self._write_limit: tuple[int, float] | None = None
        self._write_windows: dict[str, tuple[float, int]] = {}  # channel id -> (window start, writes used)
        self._cond = asyncio.Condition()
        self.threads: dict[int, dict[str, Any]] = {}  # threads the bot created, by id
        self._gateway_outbox: list[tuple[str, Any]] = []  # dispatches a REST call causes (THREAD_CREATE)

    # ------------------------------------------------------------------ waiting

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], what: str = "a condition", timeout: float = 30.0) -> Any:
        """Wait until ``predicate()`` is truthy and return it; checked on every request and gateway event."""

        async def _wait() -> Any:
            async with self._cond:
                while not (result := predicate()):
                    try:  # also now and then: some conditions change without a request (the bot's own state)
                        await asyncio.wait_for(self._cond.wait(), 0.25)
                    except TimeoutError:
                        pass
                return result

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            shown = [(len(m["content"]), m["content"][:60]) for m in self.bot_messages()]
            raise AssertionError(f"timed out waiting for {what}; bot messages: {shown}") from None

    async def final_reply(self, message_id: int, expected: str) -> dict[str, Any]:
        """Wait until the bot's reply to ``message_id`` reads exactly ``expected``; returns that message."""

        def done() -> dict[str, Any] | None:
            replies = self.replies_to(message_id)
            return replies[0] if replies and replies[0]["content"] == expected else None

        return await self.wait_for(done, f"the reply to {message_id} to read {expected[:40]!r}")

    # ------------------------------------------------------------------ scripting

    def script_status(
        self,
        method: str,
        path_regex: str,
        *,
        status: int = 429,
        times: int = 1,
        retry_after: float = 0.3,
        via: bool = True,
        every: int = 1,
    ) -> None:
        """Answer the next ``times`` requests matching method + path (after /api/v10) with ``status``; with
        ``every`` = n, only every n-th matching request. discord.py retries a 429 only when it carries ``Via``."""
        self._scripted.append(_Scripted(method.upper(), re.compile(path_regex), status, times, retry_after, via, every))

    def clear_scripts(self) -> None:
        self._scripted.clear()

    def add_text_channels(self, n: int) -> list[int]:
        """Add ``n`` text channels to the guild (before the bot connects: they are sent in GUILD_CREATE)."""
        start = EXTRA_CHANNEL_BASE + len(self.text_channel_ids) - 1
        added = list(range(start, start + n))
        self.text_channel_ids += added
        return added

    def limit_channel_writes(self, limit: int, window_seconds: float) -> None:
        """Allow ``limit`` message sends + edits per channel per window, announced as Discord does."""
        self._write_limit = (limit, window_seconds)

    def _take_scripted(self, method: str, path: str) -> _Scripted | None:
        for s in self._scripted:
            if s.times > 0 and s.method == method and s.pattern.fullmatch(path):
                s.seen += 1
                if s.seen % s.every:
                    continue
                s.times -= 1
                return s
        return None

    def _channel_bucket(self, method: str, path: str) -> tuple[bool, dict[str, str]]:
        """Whether a channel write is over the bucket, and the X-RateLimit-* headers to send."""
        match = re.fullmatch(r"/channels/(\d+)/messages(/\d+)?", path)
        if self._write_limit is None or match is None or method not in ("POST", "PATCH"):
            return False, {}
        limit, window = self._write_limit
        now = time.monotonic()
        start, used = self._write_windows.get(match.group(1), (now, 0))
        if now - start >= window:
            start, used = now, 0
        reset_after = window - (now - start)
        over = used >= limit
        if over:
            self.rate_limit_violations += 1
        else:
            used += 1
            self._write_windows[match.group(1)] = (start, used)
        return over, {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(limit - used),
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Bucket": "channel-writes-" + match.group(1),
        }

    # ------------------------------------------------------------------ queries for tests

    def bot_messages(self, channel_id: int | None = None) -> list[dict[str, Any]]:
        """Messages the bot created (interaction responses included), oldest first."""
        return [
            m
            for m in self.messages.values()
            if m["author"]["id"] == str(BOT_ID) and (channel_id is None or m["channel_id"] == str(channel_id))
        ]

    def replies_to(self, message_id: int) -> list[dict[str, Any]]:
        return [
            m for m in self.bot_messages() if (m.get("message_reference") or {}).get("message_id") == str(message_id)
        ]

    def matching(self, method: str, path_regex: str) -> list[Recorded]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r.method == method and pattern.fullmatch(r.path)]

    def interaction_messages(self, interaction: FakeInteraction) -> list[dict[str, Any]]:
        ids = ([interaction.original_id] if interaction.original_id else []) + interaction.followup_ids
        return [self.messages[i] for i in ids]

    def pinging_writes(self) -> list[Recorded]:
        """Sends and edits with text whose allowed_mentions was not "none" (so they could ping someone)."""

        def data(r: Recorded) -> dict[str, Any]:
            return r.body.get("data") or r.body if r.path.endswith("/callback") else r.body

        writes = [
            r
            for r in self.requests
            if r.method in ("POST", "PATCH") and isinstance(r.body, dict) and data(r).get("content")
        ]
        assert writes, "the bot wrote nothing"
        return [r for r in writes if data(r).get("allowed_mentions") != NO_MENTIONS]

    # ------------------------------------------------------------------ REST

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        rec = Recorded(request.method, path, dict(request.query), await self._body(request))
        self.requests.append(rec)
        try:
            scripted = self._take_scripted(request.method, path)
            over, bucket_headers = self._channel_bucket(request.method, path)
            if scripted is not None or over:
                retry_after = scripted.retry_after if scripted else float(bucket_headers["X-RateLimit-Reset-After"])
                via = {"Via": "1.1 google"} if scripted is None or scripted.via else {}
                resp = jresp(
                    {"message": "You are being rate limited.", "retry_after": retry_after, "global": False, "code": 0},
                    status=scripted.status if scripted else 429,
                    headers={**via, **bucket_headers},
                )
            else:
                resp = self._route(request.method, path, rec.body or {})
                resp.headers.update(bucket_headers)
                while self._gateway_outbox:  # sent before the REST answer, as Discord's gateway is quicker
                    await self.dispatch(*self._gateway_outbox.pop(0))
            rec.status = resp.status
            return resp
        finally:
            await self._notify()

    async def _body(self, request: web.Request) -> Any:
        if not request.can_read_body:
            return None
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            return json.loads(str(form.get("payload_json", "{}")))
        raw = await request.read()
        return json.loads(raw) if raw else None

    async def dispatch(self, event: str, d: Any) -> None:
        """Send a gateway dispatch (`FakeDiscord` has the gateway)."""
        raise NotImplementedError

    def _route(self, method: str, path: str, body: Any) -> web.Response:
        parts = path.strip("/").split("/")
        if parts[0] == "channels" and (response := self._channel_extras(method, parts, body)) is not None:
            return response
        if method == "GET" and path == "/users/@me":
            return jresp(dict(self.bot_user, verified=True, mfa_enabled=False, flags=0))
        if method == "GET" and path == "/oauth2/applications/@me":
            return jresp(
                {
                    "id": str(APP_ID),
                    "name": "llamarelay",
                    "description": "",
                    "icon": None,
                    "bot_public": True,
                    "bot_require_code_grant": False,
                    "owner": self.users[ALICE_ID],
                    "verify_key": "0" * 64,
                    "flags": 0,
                    "summary": "",
                }
            )
        if method == "PUT" and parts[0] == "applications" and parts[-1] == "commands":
            return jresp([self._register_command(cmd, guild_id=parts[3] if len(parts) == 5 else None) for cmd in body])
        if parts[0] == "channels" and len(parts) >= 3:
            return self._channel_route(method, parts, body)
        if method == "GET" and parts[0] == "guilds" and len(parts) == 4 and parts[2] == "members":
            return self._member(int(parts[1]), int(parts[3]))
        if parts[0] == "interactions" and method == "POST" and parts[-1] == "callback":
            return self._callback(parts[2], body)
        if parts[0] == "webhooks" and len(parts) >= 3:
            return self._webhook_route(method, parts, body)
        return jresp({"message": f"fake discord: no route for {method} {path}", "code": 0}, status=404)

    def _register_command(self, cmd: dict[str, Any], guild_id: str | None) -> dict[str, Any]:
        existing = self.commands.get(cmd["name"])
        cmd = dict(
            cmd,
            id=existing["id"] if existing else str(next(self._ids)),
            application_id=str(APP_ID),
            version="1",
            description=cmd.get("description") or "",
        )  # "" for context-menu commands
        if guild_id:
            cmd["guild_id"] = guild_id
        self.commands[cmd["name"]] = cmd
        return cmd

    def _channel_route(self, method: str, parts: list[str], body: Any) -> web.Response:
        cid = int(parts[1])
        if parts[2] == "typing" and method == "POST":
            return web.Response(status=204)
        if parts[2] == "messages" and method == "POST" and len(parts) == 3:
            nonce = body.get("nonce")
            if body.get("enforce_nonce") and nonce in self._nonces:
                return jresp(self.messages[self._nonces[nonce]])  # a retried send is not a new message
            in_guild = cid in GUILD_CHANNELS or cid in self.threads or cid in self.text_channel_ids
            extra = {"guild_id": str(GUILD_ID)} if in_guild else {}
            msg = self._new_message(
                cid,
                body.get("content") or "",
                flags=body.get("flags") or 0,
                reference=body.get("message_reference"),
                components=body.get("components") or [],
                **extra,
            )
            if nonce:
                self._nonces[nonce] = int(msg["id"])
            return jresp(msg)
        if parts[2] == "messages" and method == "PATCH" and len(parts) == 4:
            return self._edited(int(parts[3]), body)
        return jresp({"message": "fake discord: unsupported channel route", "code": 0}, status=404)

    def _member(self, guild_id: int, user_id: int) -> web.Response:
        """GET /guilds/{guild}/members/{user}, which bots may call without the Server Members intent."""
        if guild_id != GUILD_ID:
            return jresp({"message": "Unknown Guild", "code": 10004}, status=404)
        if user_id not in self.member_roles:
            return jresp({"message": "Unknown Member", "code": 10007}, status=404)
        return jresp(member_payload(self.users[user_id], self.member_roles[user_id]))

    def _callback(self, token: str, body: dict[str, Any]) -> web.Response:
        inter = self.interactions.get(token)
        if inter is None:
            return jresp({"message": "Unknown interaction", "code": 10062}, status=404)
        if inter.callbacks:
            return jresp({"message": "Interaction has already been acknowledged.", "code": 40060}, status=400)
        inter.callbacks.append(body)
        kind, data = body["type"], body.get("data") or {}
        flags = data.get("flags") or 0
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):  # a message, or "thinking…" (deferred) until the bot edits it
            msg = self._new_message(
                inter.channel_id,
                data.get("content") or "",
                flags=flags | (LOADING_FLAG if kind == 5 else 0),
                interaction_token=token,
                components=data.get("components") or [],
            )
            inter.original_id = int(msg["id"])
            resource["message"] = msg
        elif kind == 7 and inter.message_id is not None:  # UPDATE_MESSAGE: edit the message of the button
            self._edited(inter.message_id, data)
            resource["message"] = self.messages[inter.message_id]
        # JSON, never 204: discord.py reads data["interaction"]
        return jresp(
            {
                "interaction": {
                    "id": str(inter.id),
                    "type": 2,
                    "response_message_id": str(inter.original_id) if inter.original_id else None,
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(flags & EPHEMERAL_FLAG),
                },
                "resource": resource,
            }
        )

    def _webhook_route(self, method: str, parts: list[str], body: Any) -> web.Response:
        inter = self.interactions.get(parts[2])
        if inter is None:
            return jresp({"message": "Unknown Webhook", "code": 10015}, status=404)
        if inter.token in self.expired_tokens:
            return jresp({"message": "Invalid Webhook Token", "code": 50027}, status=401)
        if method == "POST" and len(parts) == 3:
            msg = self._new_message(
                inter.channel_id,
                body.get("content") or "",
                flags=body.get("flags") or 0,
                webhook_id=str(APP_ID),
                interaction_token=inter.token,
                components=body.get("components") or [],
            )
            inter.followup_ids.append(int(msg["id"]))
            return jresp(msg)
        if len(parts) == 5 and parts[3] == "messages":
            mid = inter.original_id if parts[4] == "@original" else int(parts[4])
            if method == "PATCH" and mid is not None:
                return self._edited(mid, body or {})
            if mid in self.messages:
                return jresp(self.messages[mid])
            return jresp({"message": "Unknown Message", "code": 10008}, status=404)
        return jresp({"message": "fake discord: unsupported webhook route", "code": 0}, status=404)

    def _new_message(
        self,
        channel_id: int | str,
        content: str,
        *,
        flags: int = 0,
        reference: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        msg = message_payload(next(self._ids), channel_id, self.bot_user, content, flags=flags, **extra)
        if reference:
            msg["type"] = 19  # a reply
            msg["message_reference"] = {
                k: str(reference[k]) for k in ("message_id", "channel_id", "guild_id") if reference.get(k) is not None
            }
        self._store(msg)
        return msg

    def _store(self, msg: dict[str, Any]) -> None:
        self.messages[int(msg["id"])] = msg
        self.contents[int(msg["id"])] = [msg["content"]]

    def _edited(self, mid: int, body: dict[str, Any]) -> web.Response:
        msg = self.messages.get(mid)
        if msg is None:
            return jresp({"message": "Unknown Message", "code": 10008}, status=404)
        if body.get("content") is not None:
            msg["content"] = body["content"]
            self.contents[mid].append(body["content"])
        if body.get("flags") is not None:
            msg["flags"] = body["flags"]
        if body.get("components") is not None:
            msg["components"] = body["components"]
        msg["flags"] &= ~LOADING_FLAG
        msg["edited_timestamp"] = now_iso()
        return jresp(msg)

    # ------------------------------------------------------------------ threads and history

    def _channel_extras(self, method: str, parts: list[str], body: Any) -> web.Response | None:
        """Thread creation from a message and reading a channel's history; None for the other routes."""
        if method == "POST" and len(parts) == 5 and parts[2] == "messages" and parts[4] == "threads":
            return self._start_thread(int(parts[1]), int(parts[3]), body)
        if method == "GET" and len(parts) == 3 and parts[2] == "messages":
            return self._history(int(parts[1]), self.requests[-1].query)  # this request, recorded just now
        return None

    def _start_thread(self, channel_id: int, message_id: int, body: dict[str, Any]) -> web.Response:
        """POST /channels/{channel}/messages/{message}/threads: a public thread whose id is the message's."""
        name = body.get("name") or ""
        if not 1 <= len(name) <= 100 or message_id not in self.messages:
            return jresp({"message": "Invalid Form Body", "code": 50035}, status=400)
        if message_id in self.threads:
            return jresp({"message": "A thread has already been created for this message", "code": 160004}, status=400)
        thread = {
            "id": str(message_id),
            "type": 11,
            "guild_id": str(GUILD_ID),
            "parent_id": str(channel_id),
            "owner_id": self.bot_user["id"],
            "name": name,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "locked": False,
                "archive_timestamp": now_iso(),
                "auto_archive_duration": body.get("auto_archive_duration") or 1440,
            },
        }
        self.threads[message_id] = thread
        self.messages[message_id]["thread"] = thread
        self._gateway_outbox.append(("THREAD_CREATE", dict(thread, newly_created=True)))
        return jresp(thread, status=201)

    def _history(self, channel_id: int, query: dict[str, str]) -> web.Response:
        """GET /channels/{channel}/messages: newest first, ``limit`` of those before ``before`` (after ``after``)."""
        before, after = int(query.get("before") or 1 << 64), int(query.get("after") or 0)
        found = sorted(
            (mid for mid, m in self.messages.items() if m["channel_id"] == str(channel_id) and after < mid < before),
            reverse=True,
        )
        return jresp([self.messages[mid] for mid in found[: int(query.get("limit") or 50)]])

    # ------------------------------------------------------------------ components

    def add_bot_message(
        self, channel_id: int, content: str, *, components: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """A message the bot sent earlier (e.g. before a crash), with these components."""
        extra = {"guild_id": str(GUILD_ID)} if channel_id in GUILD_CHANNELS or channel_id in self.threads else {}
        return self._new_message(channel_id, content, components=components or [], **extra)

    def buttons(self, message_id: int) -> dict[str, str]:
        """The buttons under a message now: label -> custom_id."""
        return {
            button.get("label") or "": button["custom_id"]
            for row in self.messages[message_id].get("components") or []
            for button in row.get("components") or []
            if button.get("type") == 2
        }
