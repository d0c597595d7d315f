"""`FakeDiscord`: the REST fake plus a gateway websocket, served by aiohttp on 127.0.0.1 (port 0).

The gateway says HELLO, answers heartbeats, sends READY and one GUILD_CREATE on IDENTIFY, and on RESUME
replays the dispatches the client missed, as Discord does. Tests push MESSAGE_CREATE and
INTERACTION_CREATE and can send op 7 RECONNECT.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from aiohttp import WSMsgType, web

from tests.fake_discord.payloads import (ALICE_ID, API_PREFIX, APP_ID, CHANNEL_ID, EVERYONE_PERMISSIONS, GUILD_ID,
                                         HEARTBEAT_INTERVAL_MS, MANAGE_GUILD, channel_payload,
                                         guild_create_payload, member_payload, message_payload)
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

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
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

    async def message_create(self, content: str, *, author_id: int = ALICE_ID, channel_id: int = CHANNEL_ID,
                             mention_bot: bool = True, dm: bool = False, mention_ids: tuple[int, ...] = ()) -> int:
        """Push a user's message (prefixed with the bot's mention unless told not to); returns its id."""
        author = self.users[author_id]
        mentions = [dict(self.users[u], member=member_payload(self.users[u], self.member_roles[u]))
                    for u in mention_ids]
        if mention_bot:
            content = f"<@{self.bot_user['id']}> {content}"
            mentions.append(self.bot_user)
        mid = next(self._ids)
        msg = message_payload(mid, self.dm_channel_id(author_id) if dm else channel_id, author, content,
                              mentions=mentions)
        if not dm:  # a DM has no guild_id, as on Discord
            msg["guild_id"] = str(GUILD_ID)
            member = member_payload(author, self.member_roles[author_id])
            msg["member"] = {k: v for k, v in member.items() if k != "user"}
        self._store(msg)
        await self.dispatch("MESSAGE_CREATE", msg)
        return mid

    async def slash(self, name: str, options: dict[str, str] | None = None, *, user_id: int = ALICE_ID,
                    channel_id: int = CHANNEL_ID, dm: bool = False, manage_guild: bool = False) -> FakeInteraction:
        """Push a slash-command INTERACTION_CREATE; returns the record of what the bot answers."""
        user = self.users[user_id]
        iid = next(self._ids)
        token = "itok-" + uuid.uuid4().hex
        if dm:
            channel_id = self.dm_channel_id(user_id)
        command = self.commands.get(name) or {"id": str(next(self._ids))}
        data: dict[str, Any] = {
            "id": str(iid), "application_id": str(APP_ID), "type": 2, "token": token, "version": 1,
            "attachment_size_limit": 8 * 1024 * 1024, "locale": "en-US", "entitlements": [],
            "app_permissions": str(EVERYONE_PERMISSIONS), "channel_id": str(channel_id),
            "data": {"id": command["id"], "name": name, "type": 1,
                     "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()]},
        }
        if dm:
            data.update(context=1, user=user, authorizing_integration_owners={"0": str(user_id)},
                        channel={"id": str(channel_id), "type": 1, "recipients": [user]})
        else:
            permissions = EVERYONE_PERMISSIONS | (MANAGE_GUILD if manage_guild else 0)
            data.update(context=0, guild_id=str(GUILD_ID), guild_locale="en-US",
                        guild={"id": str(GUILD_ID), "locale": "en-US", "features": []},
                        authorizing_integration_owners={"0": str(GUILD_ID)},
                        member=member_payload(user, self.member_roles[user_id], permissions=permissions),
                        channel=channel_payload(channel_id))
        record = FakeInteraction(iid, token, channel_id)
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
        await self.dispatch("READY", {
            "v": 10, "user": dict(self.bot_user, verified=True, mfa_enabled=False, flags=0),
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}], "session_id": self._session_id,
            # The client resumes here after op 7; it must be this fake, not Discord.
            "resume_gateway_url": self.gateway_url, "application": {"id": str(APP_ID), "flags": 0},
            "private_channels": [], "relationships": [],
        })
        members = [member_payload(self.users[u], roles) for u, roles in self.member_roles.items()]
        await self.dispatch("GUILD_CREATE", guild_create_payload(members + [member_payload(self.bot_user, [])],
                                                                 tuple(self.text_channel_ids)))

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
