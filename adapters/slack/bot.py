"""The Slack bot: a slack-bolt `AsyncApp` whose listeners hand mentions, DMs, thread follow-ups, slash commands,
buttons, message shortcuts and assistant threads to the core.

Socket Mode (``AsyncSocketModeHandler``) when an app-level token is given, else HTTP (Events API) mode on
``[slack] http_host:http_port`` + ``http_path``, where bolt verifies every request's signature.

A channel mention answered in a thread makes that thread a conversation (its key is the channel plus the
mention's ts); later messages in a thread the bot knows are answered without a mention.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from adapters.http import Listener
from adapters.slack.assistant import register_assistant
from adapters.slack.commands import register_commands
from adapters.slack.controls import register_controls
from adapters.slack.files import read_files, read_images
from adapters.slack.mrkdwn import from_slack
from adapters.slack.sessions import PLATFORM, is_dm, session_key
from adapters.slack.shortcuts import register_shortcuts
from adapters.slack.targets import NativeStreamTarget, UpdateTarget, locate
from bot.access import AccessPolicy, Action, Actor, Decision, Place, Refusal
from bot.config import Secrets, Settings, SlackSettings
from bot.conversations import ConversationManager, ReplyResult
from bot.errors import ConfigError
from bot.types import Attachment, ImagePart, Incoming, SessionKey
from bot.wording import refusal_text

__all__ = ["SlackBot", "run_slack"]

log = logging.getLogger(__name__)

DEDUPE_TTL_SECONDS = 900.0  # Slack retries for about 5 minutes; keep ids well past that
RATE_LIMIT_RETRIES = 3  # 429s absorbed by slack-sdk's retry handler before a call fails
# Message subtypes that are a person writing; edits, deletions, joins and the like are not answered.
ANSWERED_SUBTYPES = (None, "file_share", "thread_broadcast")
IGNORED_EVENT_SUBTYPES = ("message_changed", "message_deleted")
NAME_TTL_SECONDS = 3600.0  # display names are looked up (users.info) at most this often per person
NAME_CACHE_SIZE = 5000

ADMINS = "admins (`admin_user_ids` under `[slack]` in config.toml)"  # who may change a channel's settings


class SlackBot:
    """llamarelay on Slack. `start()` connects (Socket Mode or HTTP), `close()` disconnects cleanly."""

    def __init__(
        self,
        manager: ConversationManager,
        settings: SlackSettings,
        *,
        bot_token: str,
        app_token: str | None = None,
        signing_secret: str | None = None,
    ) -> None:
        self.manager = manager
        self.settings = settings
        self.client = AsyncWebClient(token=bot_token, base_url=settings.api_base_url or AsyncWebClient.BASE_URL)
        # Without it a 429 from chat.update would surface as an error; with it the call waits and retries.
        self.client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES))
        self._bot_token = bot_token
        self._api_host = urlsplit(self.client.base_url).hostname or ""
        self._app_token = app_token
        self._signing_secret = signing_secret
        self.policy = AccessPolicy(
            channels=settings.allowed_channel_ids,
            users=settings.allowed_user_ids,
            admins=settings.admin_user_ids,
            dms_enabled=settings.dms_enabled,
            messages_per_minute=settings.user_messages_per_minute,
        )
        self._names: dict[str, tuple[str, float]] = {}  # user id → (display name, when to look it up again)
        self.app = AsyncApp(
            client=self.client,
            signing_secret=signing_secret or "",
            name="llamarelay",
            before_authorize=self._drop_edits,
        )
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.error(self._on_error)
        register_commands(self)
        register_controls(self)
        register_shortcuts(self)
        register_assistant(self)
        manager.locators[PLATFORM] = lambda key, reference: locate(self.client, key, reference)
        self._socket: AsyncSocketModeHandler | None = None
        self._listener: Listener | None = None  # HTTP mode
        self._http: aiohttp.ClientSession | None = None  # file downloads

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the bot token, then connect: Socket Mode with an app token, else serve HTTP."""
        try:
            await self.client.auth_test()
        except SlackApiError as exc:
            raise ConfigError(f"Slack rejected SLACK_BOT_TOKEN ({exc.response.get('error')})") from None
        if not self._app_token and not self._signing_secret:
            raise ConfigError("Slack HTTP mode needs SLACK_SIGNING_SECRET (or set SLACK_APP_TOKEN for Socket Mode)")
        self._http = aiohttp.ClientSession()  # for files shared with messages
        try:
            await self._connect()
        except BaseException:
            await self.close()
            raise
        self.manager.platforms.connected(PLATFORM)

    async def _connect(self) -> None:
        if self._app_token:
            self._socket = AsyncSocketModeHandler(self.app, app_token=self._app_token)
            await self._socket.connect_async()
            log.info("connected to Slack in Socket Mode")
            return
        s = self.settings
        listener = Listener(
            self.app.web_app(path=s.http_path, port=s.http_port),
            s.http_host,
            s.http_port,
            section="slack",
            keys_prefix="http_",
        )
        url = await listener.start()  # a taken port is a ConfigError naming [slack] http_port's section
        self._listener = listener
        log.info("serving Slack events on %s%s", url, s.http_path.lstrip("/"))

    @property
    def http_port(self) -> int:
        """The port HTTP mode listens on (the real one when configured as 0)."""
        assert self._listener is not None, "HTTP mode is not running"
        return self._listener.port

    async def close(self) -> None:
        """Stop receiving; replies in flight belong to the core, which ends and stores them at shutdown."""
        self.manager.platforms.disconnected(PLATFORM)
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- middleware and errors -------------------------------------------------------------------

    @staticmethod
    async def _drop_edits(body: dict[str, Any], next: Any) -> BoltResponse | None:
        # Acknowledged (so Slack does not redeliver) but never handed to a listener.
        if body.get("event", {}).get("subtype") in IGNORED_EVENT_SUBTYPES:
            return BoltResponse(status=200, body="")
        return await next()

    @staticmethod
    async def _on_error(error: Exception, body: dict[str, Any]) -> None:
        log.error("Slack listener failed on a %s request", body.get("type") or body.get("command"), exc_info=error)

    # -- events ----------------------------------------------------------------------------------

    async def _on_mention(self, event: dict[str, Any], body: dict[str, Any], context: AsyncBoltContext) -> None:
        await self._answer(event, body, context)

    async def _on_message(self, event: dict[str, Any], body: dict[str, Any], context: AsyncBoltContext) -> None:
        if event.get("subtype") not in ANSWERED_SUBTYPES or event.get("bot_id"):
            return  # other bots (and our own posts) are never answered: no bot loops
        channel = str(event.get("channel") or "")
        if is_dm(channel):
            await self._answer(event, body, context)
        elif context.bot_user_id and f"<@{context.bot_user_id}" in event.get("text", ""):
            # A mention also arrives as app_mention; whichever comes first is answered (see first_delivery).
            await self._answer(event, body, context)
        elif (
            event.get("thread_ts")
            and channel
            and await self.manager.is_known(
                session_key(self.team_of(body, context), channel, str(event.get("user") or ""), event["thread_ts"])
            )
        ):
            # A thread the bot answered in (or was mentioned in) is a conversation: no mention needed there.
            await self._answer(event, body, context, addressed=False)

    async def _answer(
        self, event: dict[str, Any], body: dict[str, Any], context: AsyncBoltContext, *, addressed: bool = True
    ) -> None:
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not user or not channel or not ts:
            return
        team = self.team_of(body, context)
        if not await self.first_delivery(body.get("event_id"), team, channel, ts):
            log.debug("event %s for message %s/%s already answered", body.get("event_id"), channel, ts)
            return
        thread = event.get("thread_ts")
        # In a channel the answer opens a thread (with reply_in_thread): that thread is the conversation.
        reply_thread = thread or (ts if self.settings.reply_in_thread and not is_dm(channel) else None)
        key = session_key(team, channel, user, reply_thread or "")
        decision = await self.check(user, channel, Action.ASK)
        if not decision.allowed and not addressed and decision.refusal is not Refusal.TOO_FAST:
            return  # someone the bot does not answer, talking in a thread it follows: not spoken to, no notice
        if not decision.allowed:
            await self._refuse(
                refusal_text(decision, admins=ADMINS), channel=channel, user=user, thread_ts=reply_thread
            )
            return
        name, (attachments, images) = await asyncio.gather(
            self.display_name(user, event.get("user_profile")), self.read_files(event.get("files") or [])
        )
        incoming = Incoming(
            key,
            user,
            name,
            from_slack(event.get("text", ""), context.bot_user_id),
            event_id=str(body.get("event_id") or ""),
            attachments=attachments,
            images=images,
        )
        target: UpdateTarget
        if self.settings.native_streaming:
            target = NativeStreamTarget(
                self.client,
                channel,
                thread_ts=reply_thread or ts,
                team_id=team,
                user_id=user,
                key=key,
                edit_interval=self.settings.edit_interval,
            )
        else:
            target = UpdateTarget(
                self.client,
                channel,
                team_id=team,
                key=key,
                thread_ts=reply_thread,
                edit_interval=self.settings.edit_interval,
            )
        await self.reply(incoming, target)

    async def first_delivery(self, event_id: str | None, team: str, channel: str, ts: str) -> bool:
        """False for a redelivered event, and for the second of app_mention + message about one message."""
        if event_id and not await self.manager.claim_event(f"{PLATFORM}:event:{event_id}", DEDUPE_TTL_SECONDS):
            return False
        return await self.manager.claim_event(f"{PLATFORM}:message:{team}:{channel}:{ts}", DEDUPE_TTL_SECONDS)

    async def _refuse(self, text: str, *, channel: str, user: str, thread_ts: str | None) -> None:
        if is_dm(channel):
            try:
                await self.client.chat_postMessage(channel=channel, text=text, thread_ts=thread_ts)
            except SlackApiError as exc:
                log.info("could not tell %s why they were refused: %s", user, exc.response.get("error"))
        else:
            await self.tell(channel, user, text, thread_ts=thread_ts)

    # -- shared with the slash commands ----------------------------------------------------------

    async def check(self, user: str, channel: str, action: Action = Action.USE, *, owner: str = "") -> Decision:
        """The core's access policy for ``user`` in ``channel`` (a DM, or a channel of the lists); ``owner``:
        whose tool call an `Action.APPROVE_TOOL` answers."""
        place = Place(dm=True) if is_dm(channel) else Place(dm=False, channels=frozenset({channel}))
        return await self.policy.check(Actor(user), place, action, owner=owner)

    async def refusal(self, user: str, channel: str, action: Action = Action.USE, *, owner: str = "") -> str | None:
        """Why ``user`` may not do ``action`` in ``channel``, in words, or None when they may."""
        decision = await self.check(user, channel, action, owner=owner)
        return None if decision.allowed else refusal_text(decision, admins=ADMINS)

    @staticmethod
    def team_of(body: dict[str, Any], context: AsyncBoltContext) -> str:
        """The workspace of an event or command (``team_id``) or of an interaction (``team.id``)."""
        team = body.get("team_id")
        if not team and isinstance(body.get("team"), dict):
            team = body["team"].get("id")
        return str(team or context.team_id or "")

    async def tell(self, channel: str, user: str, text: str, *, thread_ts: str | None = None) -> None:
        """Show ``text`` to ``user`` alone (an ephemeral message); a failure is only logged."""
        try:
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text, thread_ts=thread_ts)
        except SlackApiError as exc:
            log.info("could not tell %s privately: %s", user, exc.response.get("error"))

    async def display_name(self, user: str, profile: dict[str, Any] | None = None) -> str:
        """The name people see for ``user``: from the event's profile when it has one, else ``users.info``
        (needs ``users:read``; cached). Falls back to the user id."""
        profile = profile or {}
        if name := profile.get("display_name") or profile.get("real_name"):
            return str(name)
        now = time.monotonic()
        cached = self._names.get(user)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            found = (await self.client.users_info(user=user)).get("user") or {}
            details = found.get("profile") or {}
            name = (
                details.get("display_name")
                or details.get("real_name")
                or found.get("real_name")
                or found.get("name")
                or user
            )
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:  # a name is a nicety, never a failure
            log.info("users.info for %s failed (%s); using the id as the name", user, exc)
            name = user
        if len(self._names) >= NAME_CACHE_SIZE:
            self._names.clear()
        self._names[user] = (str(name), now + NAME_TTL_SECONDS)
        return str(name)

    async def read_files(self, files: list[dict[str, Any]]) -> tuple[tuple[Attachment, ...], tuple[ImagePart, ...]]:
        """A message's files for the core (see `adapters.slack.files`): text files read or skipped (with the
        images skipped), and its images."""
        if not files:
            return (), ()
        assert self._http is not None, "the bot is not started"
        texts, (images, skipped_images) = await asyncio.gather(
            read_files(
                self._http,
                files,
                token=self._bot_token,
                api_host=self._api_host,
                max_bytes=self.manager.limits.max_file_bytes,
            ),
            read_images(self._http, files, token=self._bot_token, api_host=self._api_host, images=self.manager.images),
        )
        return texts + skipped_images, images

    async def reply(self, incoming: Incoming, target: UpdateTarget) -> ReplyResult:
        """Stream the core's answer to ``incoming`` into ``target``, then end any native stream it opened."""
        return await self.deliver(self.manager.respond(incoming, target), target)

    def running_in(self, team: str, channel: str) -> list[SessionKey]:
        """Conversations in ``channel`` (the channel's own and its threads') with a reply on its way."""
        return [
            key
            for key in self.manager.running()
            if key.platform == PLATFORM and key.workspace == team and key.channel == channel
        ]

    async def deliver(self, answer: Awaitable[ReplyResult], target: UpdateTarget) -> ReplyResult:
        """Await a core reply (respond, regenerate, continue) streaming into ``target``, then close ``target``."""
        try:
            return await answer
        finally:
            try:
                await target.close()
            except SlackApiError as exc:
                log.warning("could not finish a streamed reply: %s", exc.response.get("error"))


async def run_slack(manager: ConversationManager, settings: Settings, secrets: Secrets) -> None:
    """Run the Slack bot until cancelled, then disconnect cleanly (the lead's `llamarelay run` calls this)."""
    if not secrets.slack_bot_token:
        raise ConfigError("SLACK_BOT_TOKEN is not set")
    bot = SlackBot(
        manager,
        settings.slack,
        bot_token=secrets.slack_bot_token,
        app_token=secrets.slack_app_token,
        signing_secret=secrets.slack_signing_secret,
    )
    await bot.start()
    try:
        await asyncio.Event().wait()
    finally:
        try:
            await bot.close()
        except Exception:  # shutting down anyway; say why it was untidy
            log.exception("the Slack connection did not close cleanly")
