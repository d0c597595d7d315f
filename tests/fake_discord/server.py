"""`FakeDiscord`: the REST fake plus a gateway websocket, served by aiohttp on 127.0.0.1 (port 0).

The gateway says HELLO, answers heartbeats, sends READY and one GUILD_CREATE on IDENTIFY, and on RESUME
replays the dispatches the client missed, as Discord does. Tests push MESSAGE_CREATE (with attachments the
fake serves over HTTP) and INTERACTION_CREATE (slash and context-menu commands, button presses, modal
submissions) and can send op 7 RECONNECT.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import WSMsgType, web

from tests.fake_discord.payloads import (
    ALICE_ID,
    API_PREFIX,
    APP_ID,
    CHANNEL_ID,
    EVERYONE_PERMISSIONS,
    GUILD_CHANNELS,
    GUILD_ID,
    HEARTBEAT_INTERVAL_MS,
    MANAGE_GUILD,
    channel_payload,
    guild_create_payload,
    member_payload,
    message_payload,
)
from tests.fake_discord.rest import FakeInteraction, FakeRest

__all__ = ["FakeDiscord"]


class FakeDiscord(FakeRest):
    """Use as ``async with FakeDiscord() as fake:``; point discord.py at ``api_base_url`` and ``gateway_url``."""

    def __init__(self) -> None:
        super().__init__()
        self.gateway_ops: list[int] = []  # every op the client sent
        self.identify_count = 0
        self.resume_count = 0
        self.replayed_count = 0  # dispatches sent again on RESUME because the client had not seen them
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._ws: web.WebSocketResponse | None = None  # the socket of the current session
        self._sockets: set[web.WebSocketResponse] = set()
        self._send_lock = asyncio.Lock()
        self._session_id = ""
        self._seq = 0
        self._sent: list[dict[str, Any]] = []  # this session's dispatches, for replay on RESUME
        self.nicks: dict[int, str] = {}  # server nicknames, shown as the members' display names
        self.files: dict[int, bytes] = {}  # attachment id -> its bytes, served at /attachments/{id}/{name}
        self.downloads: list[int] = []  # attachment ids the bot fetched

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{aid}/{name}", self._attachment)
        app.router.add_route("*", API_PREFIX + "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ------------------------------------------------------------------ pushing events

    def dm_channel_id(self, user_id: int) -> int:
        return user_id + 50_000_000_000_000_000

    async def message_create(
        self,
        content: str,
        *,
        author_id: int = ALICE_ID,
        channel_id: int = CHANNEL_ID,
        mention_bot: bool = True,
        dm: bool = False,
        mention_ids: tuple[int, ...] = (),
        files: Sequence[tuple[str, bytes, str | None]] = (),
    ) -> int:
        """Push a user's message (prefixed with the bot's mention unless told not to); returns its id.
        ``files`` are attachments: (file name, bytes, content type)."""
        author = self.users[author_id]
        mentions = [
            dict(self.users[u], member=member_payload(self.users[u], self.member_roles[u])) for u in mention_ids
        ]
        if mention_bot:
            content = f"<@{self.bot_user['id']}> {content}"
            mentions.append(self.bot_user)
        mid = next(self._ids)
        msg = message_payload(
            mid,
            self.dm_channel_id(author_id) if dm else channel_id,
            author,
            content,
            mentions=mentions,
            attachments=[self._attachment_payload(*f) for f in files],
        )
        if not dm:  # a DM has no guild_id, as on Discord
            msg["guild_id"] = str(GUILD_ID)
            member = member_payload(author, self.member_roles[author_id])
            msg["member"] = {k: v for k, v in member.items() if k != "user"}
            msg["member"]["nick"] = self.nicks.get(author_id)
        self._store(msg)
        await self.dispatch("MESSAGE_CREATE", msg)
        return mid

    async def slash(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user_id: int = ALICE_ID,
        channel_id: int = CHANNEL_ID,
        dm: bool = False,
        manage_guild: bool = False,
    ) -> FakeInteraction:
        """Push a slash-command INTERACTION_CREATE; returns the record of what the bot answers.

        Option values are sent as given; each gets the type the command registered for it."""
        command = self.commands.get(name) or {"id": str(next(self._ids))}
        types = {option["name"]: option["type"] for option in command.get("options") or []}
        return await self._interact(
            2,
            {
                "id": command["id"],
                "name": name,
                "type": 1,
                "options": [{"name": k, "type": types.get(k, 3), "value": v} for k, v in (options or {}).items()],
            },
            user_id=user_id,
            channel_id=channel_id,
            dm=dm,
            manage_guild=manage_guild,
        )

    async def _interact(
        self,
        kind: int,
        inner: dict[str, Any],
        *,
        user_id: int,
        channel_id: int,
        dm: bool,
        manage_guild: bool = False,
        message: dict[str, Any] | None = None,
    ) -> FakeInteraction:
        """Push an INTERACTION_CREATE of ``kind`` (2 command, 3 component, 5 modal submit) with data ``inner``."""
        user = self.users[user_id]
        iid = next(self._ids)
        token = "itok-" + uuid.uuid4().hex
        if dm:
            channel_id = self.dm_channel_id(user_id)
        data: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(APP_ID),
            "type": kind,
            "token": token,
            "version": 1,
            "attachment_size_limit": 8 * 1024 * 1024,
            "locale": "en-US",
            "entitlements": [],
            "app_permissions": str(EVERYONE_PERMISSIONS),
            "channel_id": str(channel_id),
            "data": inner,
        }
        if message is not None:
            data["message"] = message
        if dm:
            data.update(
                context=1,
                user=user,
                authorizing_integration_owners={"0": str(user_id)},
                channel={"id": str(channel_id), "type": 1, "recipients": [user]},
            )
        else:
            permissions = EVERYONE_PERMISSIONS | (MANAGE_GUILD if manage_guild else 0)
            data.update(
                context=0,
                guild_id=str(GUILD_ID),
                guild_locale="en-US",
                guild={"id": str(GUILD_ID), "locale": "en-US", "features": []},
                authorizing_integration_owners={"0": str(GUILD_ID)},
                member=dict(
                    member_payload(user, self.member_roles[user_id], permissions=permissions),
                    nick=self.nicks.get(user_id),
                ),
                channel=self.threads.get(channel_id) or channel_payload(channel_id),
            )
        record = FakeInteraction(iid, token, channel_id, message_id=int(message["id"]) if message else None)
        self.interactions[token] = record
        await self.dispatch("INTERACTION_CREATE", data)
        return record

    async def dispatch(self, event: str, d: Any) -> None:
        """Send an op 0 dispatch with the next sequence number; kept for replay if the client reconnects."""
        self._seq += 1
        frame = {"op": 0, "t": event, "s": self._seq, "d": d}
        self._sent.append(frame)
        if self._ws is not None and not self._ws.closed:
            await self._send(self._ws, frame)

    async def reconnect(self) -> None:
        """Send op 7 RECONNECT: the client must come back on a new socket with op 6 RESUME."""
        if self._ws is not None:
            await self._send(self._ws, {"op": 7, "d": None})

    # ------------------------------------------------------------------ gateway

    async def _send(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        async with self._send_lock:
            if not ws.closed:
                await ws.send_str(json.dumps(frame))  # text frames are read as plain JSON: no zlib needed

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        await self._send(ws, {"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                self.gateway_ops.append(data["op"])
                if data["op"] == 1:
                    await self._send(ws, {"op": 11, "d": None})
                elif data["op"] == 2:
                    await self._identify(ws)
                elif data["op"] == 6:
                    await self._resume(ws, data["d"])
                await self._notify()
        finally:
            self._sockets.discard(ws)
            if self._ws is ws:
                self._ws = None
            await self._notify()
        return ws

    async def _identify(self, ws: web.WebSocketResponse) -> None:
        self.identify_count += 1
        self._session_id, self._seq, self._sent, self._ws = uuid.uuid4().hex, 0, [], ws
        await self.dispatch(
            "READY",
            {
                "v": 10,
                "user": dict(self.bot_user, verified=True, mfa_enabled=False, flags=0),
                "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                "session_id": self._session_id,
                # The client resumes here after op 7; it must be this fake, not Discord.
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(APP_ID), "flags": 0},
                "private_channels": [],
                "relationships": [],
            },
        )
        members = [member_payload(self.users[u], roles) for u, roles in self.member_roles.items()]
        guild = guild_create_payload(members + [member_payload(self.bot_user, [])], tuple(self.text_channel_ids))
        guild["threads"] += list(self.threads.values())  # active threads, those the bot created included
        await self.dispatch("GUILD_CREATE", guild)

    async def _resume(self, ws: web.WebSocketResponse, d: dict[str, Any]) -> None:
        if d.get("session_id") != self._session_id:
            await self._send(ws, {"op": 9, "d": False})  # INVALID_SESSION: identify again
            return
        self.resume_count += 1
        self._ws = ws
        for frame in self._sent:
            if frame["s"] > (d.get("seq") or 0):
                self.replayed_count += 1
                await self._send(ws, frame)
        await self.dispatch("RESUMED", {})

    # ------------------------------------------------------------------ buttons, context menus, modals

    async def press(self, message_id: int, label: str, *, user_id: int = ALICE_ID) -> FakeInteraction:
        """Press the button labelled ``label`` (a substring) under a message, as ``user_id``."""
        msg = self.messages[message_id]
        matches = [custom_id for text, custom_id in self.buttons(message_id).items() if label in text]
        assert len(matches) == 1, f"no single {label!r} button under {message_id}: {self.buttons(message_id)}"
        return await self._interact(
            3,
            {"custom_id": matches[0], "component_type": 2},
            user_id=user_id,
            channel_id=int(msg["channel_id"]),
            dm=self._in_dm(msg),
            message=msg,
        )

    async def context_menu(self, name: str, message_id: int, *, user_id: int = ALICE_ID) -> FakeInteraction:
        """Use the message command ``name`` (Apps menu) on a message."""
        msg = self.messages[message_id]
        command = self.commands[name]
        assert command.get("type") == 3, f"{name!r} is not a message command: {command}"
        inner = {
            "id": command["id"],
            "name": name,
            "type": 3,
            "target_id": str(message_id),
            "resolved": {"messages": {str(message_id): msg}},
        }
        return await self._interact(2, inner, user_id=user_id, channel_id=int(msg["channel_id"]), dm=self._in_dm(msg))

    def _in_dm(self, msg: dict[str, Any]) -> bool:
        return int(msg["channel_id"]) not in GUILD_CHANNELS and int(msg["channel_id"]) not in self.threads

    async def submit_modal(
        self, opened: FakeInteraction, values: dict[str, str], *, user_id: int = ALICE_ID
    ) -> FakeInteraction:
        """Submit the modal the bot answered ``opened`` with; ``values`` by text input label."""
        [callback] = opened.callbacks
        assert callback["type"] == 9, f"the bot answered with type {callback['type']}, not a modal"
        inputs = {
            label: (custom_id, wrapper) for label, custom_id, wrapper in _text_inputs(callback["data"]["components"])
        }
        answers = []
        for label, value in values.items():
            custom_id, wrapper = inputs[label]
            field = {"type": 4, "custom_id": custom_id, "value": value}
            # As Discord answers: in a label (type 18) or an action row (type 1), like the modal it showed.
            answers.append({"type": 18, "component": field} if wrapper == 18 else {"type": 1, "components": [field]})
        dm = opened.channel_id == self.dm_channel_id(user_id)
        return await self._interact(
            5,
            {"custom_id": callback["data"]["custom_id"], "components": answers},
            user_id=user_id,
            channel_id=opened.channel_id,
            dm=dm,
        )

    # ------------------------------------------------------------------ attachments

    def _attachment_payload(self, name: str, data: bytes, content_type: str | None) -> dict[str, Any]:
        aid = next(self._ids)
        self.files[aid] = data
        url = f"http://127.0.0.1:{self.port}/attachments/{aid}/{name}"
        return {
            "id": str(aid),
            "filename": name,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            **({"content_type": content_type} if content_type else {}),
        }

    async def _attachment(self, request: web.Request) -> web.Response:
        aid = int(request.match_info["aid"])
        self.downloads.append(aid)
        if aid not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[aid], content_type="application/octet-stream")


def _text_inputs(components: list[dict[str, Any]], label: str = "", wrapper: int = 1) -> list[tuple[str, str, int]]:
    """(label, custom_id, wrapper type) of each text input of a modal, in rows (type 1) or labels (type 18)."""
    found = []
    for component in components:
        if component["type"] == 1:
            found += _text_inputs(component["components"])
        elif component["type"] == 18:
            found += _text_inputs([component["component"]], component.get("label", ""), 18)
        elif component["type"] == 4:
            found.append((component.get("label") or label, component["custom_id"], wrapper))
    return found
