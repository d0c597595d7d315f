"""The Discord client: turns mentions, thread messages and DMs into `Incoming` messages for the core.

Which conversation a message belongs to: a guild channel's session, a thread's own session, or the
author's private DM session. With ``thread_per_conversation`` a mention in a channel opens a thread, which
the bot then follows without mentions. Access lists, the per-user rate limit and the bot/self filters are
applied here, before anything reaches the core; text files sent along are read within the configured size.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import discord

from adapters.discord.commands import LlamarelayTree
from adapters.discord.controls import BUTTONS
from adapters.discord.files import read_files
from adapters.discord.interactions import role_ids
from adapters.discord.targets import NO_MENTIONS, ChannelTarget, locate
from bot.access import AccessPolicy, Action, Actor, Decision, Place, Refusal
from bot.text import clean_text
from bot.types import Incoming, SessionKey, log_name
from bot.wording import refusal_text

if TYPE_CHECKING:
    from bot.config import DiscordSettings
    from bot.conversations import ConversationManager, ReplyResult

__all__ = ["DiscordBot", "PLATFORM", "thread_name"]

log = logging.getLogger(__name__)

PLATFORM = "discord"
TYPING_REFRESH_SECONDS = 8.0  # Discord shows "typing…" for about 10 s per request
ADMINS = "people with the Manage Server permission"  # who may change a channel's settings, in refusals
DM_ACCESS_CACHE_SECONDS = 60.0  # how long a DM user's looked-up membership is trusted
THREAD_NAME_MAX_CHARS = 100  # Discord's limit


def thread_name(question: str, fallback: str) -> str:
    """The name of a thread opened for ``question``: one plain line within Discord's 100 characters."""
    name = " ".join(clean_text(question).split()) or " ".join(clean_text(fallback).split()) or "Conversation"
    if len(name) > THREAD_NAME_MAX_CHARS:
        name = name[: THREAD_NAME_MAX_CHARS - 1].rstrip() + "…"
    return name


class DiscordBot(discord.Client):
    """discord.py client for llamarelay: message events here, slash commands in `LlamarelayTree`."""

    def __init__(self, manager: ConversationManager, settings: DiscordSettings, **options: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable "Message Content Intent" in the portal
        options.setdefault("allowed_mentions", NO_MENTIONS)
        super().__init__(intents=intents, **options)
        self.manager = manager
        self.settings = settings
        self.policy = AccessPolicy(
            servers=settings.allowed_guild_ids,
            channels=settings.allowed_channel_ids,
            roles=settings.allowed_role_ids,
            users=settings.allowed_user_ids,
            admins=settings.admin_user_ids,
            dms_enabled=settings.dms_enabled,
            messages_per_minute=settings.user_messages_per_minute,
        )
        self.tree = LlamarelayTree(self)
        self.add_dynamic_items(*BUTTONS)  # a reply's buttons work whenever they were sent, restarts included
        manager.locators[PLATFORM] = lambda key, reference: locate(self, reference)
        self._dm_access: dict[int, tuple[float, bool]] = {}  # user id -> (when looked up, allowed)
        self._closing = False

    async def setup_hook(self) -> None:
        """Sync slash commands once per start (not in on_ready, which fires again after reconnects)."""
        try:
            if self.settings.guild_ids:
                for guild_id in self.settings.guild_ids:
                    guild = discord.Object(guild_id)
                    self.tree.copy_global_to(guild=guild)
                    await self.tree.sync(guild=guild)
                log.info("slash commands synced to %d guild(s)", len(self.settings.guild_ids))
            else:
                await self.tree.sync()
                log.info("slash commands synced globally (Discord may take a while to show them)")
        except discord.HTTPException as exc:
            # Commands synced at an earlier start keep working; a failed sync should not stop the bot.
            log.error("could not sync slash commands: %s", exc)

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (%d guild(s))", self.user, len(self.guilds))
        self.manager.platforms.connected(PLATFORM)

    async def on_resumed(self) -> None:
        self.manager.platforms.connected(PLATFORM)

    async def on_disconnect(self) -> None:
        self.manager.platforms.disconnected(PLATFORM)

    # ------------------------------------------------------------------ sessions and access

    def session_for(self, channel: Any, user: discord.abc.User, guild_id: int | None) -> SessionKey:
        """The conversation a channel (or DM) belongs to; a thread has its own, apart from its parent's."""
        if guild_id is None or isinstance(channel, (discord.DMChannel, discord.GroupChannel)):
            return SessionKey.for_dm(PLATFORM, str(user.id))
        if isinstance(channel, discord.Thread):
            return SessionKey.for_channel(PLATFORM, str(guild_id), str(channel.parent_id), str(channel.id))
        return SessionKey.for_channel(PLATFORM, str(guild_id), str(channel.id))

    async def check(
        self,
        user: discord.abc.User,
        key: SessionKey,
        action: Action = Action.USE,
        *,
        manages_place: bool = False,
        owner: str = "",
    ) -> Decision:
        """The core's access policy for ``user`` in conversation ``key``: Discord's roles, and for a DM whether
        the user is a member of an allowed server. ``manages_place``: Manage Server, which may change settings."""
        actor = Actor(
            str(user.id),
            roles=role_ids(user),
            manages_place=manages_place,
            member_elsewhere=lambda: self._member_of_allowed_guild(user),
        )
        return await self.policy.check(actor, Place.of(key), action, owner=owner)

    async def refusal(
        self,
        user: discord.abc.User,
        key: SessionKey,
        action: Action = Action.USE,
        *,
        manages_place: bool = False,
        owner: str = "",
    ) -> str | None:
        """Why ``user`` may not do ``action`` in ``key``, in words, or None if they may (``owner``: whose tool
        call an `Action.APPROVE_TOOL` answers)."""
        decision = await self.check(user, key, action, manages_place=manages_place, owner=owner)
        return None if decision.allowed else refusal_text(decision, admins=ADMINS)

    async def _member_of_allowed_guild(self, user: discord.abc.User) -> bool:
        """Whether ``user`` passes the lists as a member of an allowed guild (looked up over REST); answers are
        kept a minute, so DM spam from strangers costs one lookup per minute, not one per message."""
        now = time.monotonic()
        known = self._dm_access.get(user.id)
        if known is not None and now - known[0] < DM_ACCESS_CACHE_SECONDS:
            return known[1]
        allowed: bool | None = False
        for guild in self._dm_guilds():
            try:
                member = await guild.fetch_member(user.id)  # REST: needs no Server Members intent
            except (discord.NotFound, discord.Forbidden):
                continue
            except discord.HTTPException as exc:
                log.warning("could not look up user %s in guild %s: %s", user.id, guild.id, exc)
                allowed = None  # unknown: refuse now, ask again next time
                continue
            roles = frozenset(str(role.id) for role in member.roles)
            if self.policy.listed(Actor(str(user.id), roles=roles)) and self._sees_an_allowed_channel(member, guild):
                allowed = True
                break
        if allowed is not None:
            self._dm_access[user.id] = (now, allowed)
        return bool(allowed)

    def _dm_guilds(self) -> list[discord.Guild]:
        """Guilds whose members may DM the bot: allowed ones that hold an allowed role and channel, if listed."""
        cfg = self.settings
        return [
            guild
            for guild in self.guilds
            if (not cfg.allowed_guild_ids or guild.id in cfg.allowed_guild_ids)
            and (not cfg.allowed_role_ids or any(guild.get_role(r) for r in cfg.allowed_role_ids))
            and (not cfg.allowed_channel_ids or any(guild.get_channel_or_thread(c) for c in cfg.allowed_channel_ids))
        ]

    def _sees_an_allowed_channel(self, member: discord.Member, guild: discord.Guild) -> bool:
        if not self.settings.allowed_channel_ids:
            return True
        channels = (guild.get_channel_or_thread(c) for c in self.settings.allowed_channel_ids)
        return any(c is not None and c.permissions_for(member).view_channel for c in channels)

    # ------------------------------------------------------------------ messages

    async def _addressed(self, message: discord.Message, key: SessionKey) -> bool:
        """True if the bot should answer: a DM, a real @mention (not @everyone), an always-answer channel, or
        a thread the bot opened for a conversation (``thread_per_conversation``)."""
        if message.guild is None:
            return True
        assert self.user is not None
        thread = message.channel if isinstance(message.channel, discord.Thread) else None
        if thread is not None and not self.settings.answer_in_threads:
            return False
        if any(user.id == self.user.id for user in message.mentions):
            return True
        channel_ids = {message.channel.id, getattr(message.channel, "parent_id", None)}
        if channel_ids & set(self.settings.always_answer_channel_ids):
            return True
        # Threads people opened keep needing a mention; only the bot's own are its conversations.
        return thread is not None and thread.owner_id == self.user.id and await self.manager.is_known(key)

    def prompt_text(self, message: discord.Message) -> str:
        """The message as the model should read it: no bot mention, other mentions as display names."""
        assert self.user is not None
        text = re.sub(rf"<@!?{self.user.id}>", "", message.content)
        for user in message.mentions:
            name = "@" + user.display_name
            text = re.sub(rf"<@!?{user.id}>", name.replace("\\", r"\\"), text)  # backslashes doubled: taken as is
        for role in message.role_mentions:
            text = text.replace(f"<@&{role.id}>", "@" + role.name)
        for channel in message.channel_mentions:
            text = text.replace(f"<#{channel.id}>", "#" + channel.name)
        return re.sub(r"[ \t]{2,}", " ", text).strip()

    async def on_message(self, message: discord.Message) -> None:
        if self._closing or self.user is None or message.author.id == self.user.id:
            return
        if message.author.bot and not self.settings.answer_bots:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        guild_id = message.guild.id if message.guild else None
        key = self.session_for(message.channel, message.author, guild_id)
        if not await self._addressed(message, key):
            return
        decision = await self.check(message.author, key, Action.ASK)
        if decision.refusal is Refusal.TOO_FAST:
            await self._send_quietly(message, refusal_text(decision))
            return
        if not decision.allowed:
            log.info("ignoring a message from user %s: not allowed here", message.author.id)
            return
        text = self.prompt_text(message)
        target = self.channel_target(message.channel, trigger=message)
        channel: discord.abc.Messageable = message.channel
        if (
            self.settings.thread_per_conversation
            and isinstance(message.channel, discord.TextChannel)
            and (text or message.attachments)
        ):  # an empty mention gets its answer where it was made
            fallback = message.attachments[0].filename if message.attachments else message.author.display_name
            if (thread := await self._open_thread(message, thread_name(text, fallback))) is not None:
                channel, target = thread, self.channel_target(thread)
                key = self.session_for(thread, message.author, guild_id)
        files, images = await read_files(message.attachments, self.manager.limits.max_file_bytes, self.manager.images)
        incoming = Incoming(
            key,
            str(message.author.id),
            message.author.display_name,
            text,
            event_id=str(message.id),
            attachments=files,
            images=images,
            author_roles=role_ids(message.author),
        )
        await self.answer(self.manager.respond(incoming, target), key, typing_in=channel)

    async def _open_thread(self, message: discord.Message, name: str) -> discord.Thread | None:
        """A public thread on ``message`` for its conversation; None (answer in the channel) if Discord refuses."""
        try:
            return await message.create_thread(name=name)
        except discord.HTTPException as exc:
            log.warning(
                "could not open a thread in channel %s (the bot needs Create Public Threads there); "
                "answering in the channel: %s",
                message.channel.id,
                exc,
            )
            return None

    def channel_target(
        self, channel: discord.abc.Messageable, *, trigger: discord.Message | None = None
    ) -> ChannelTarget:
        """Where a reply in ``channel`` goes (replying to ``trigger``, if given)."""
        return ChannelTarget(channel, trigger=trigger, min_edit_interval=self.settings.edit_interval)

    async def answer(
        self,
        reply: Coroutine[Any, Any, ReplyResult],
        key: SessionKey,
        *,
        typing_in: discord.abc.Messageable | None = None,
    ) -> None:
        """Await one reply of the core (`respond`, `regenerate`, `continue_reply`), which stores and delivers
        it, with a typing indicator meanwhile."""
        typing = asyncio.create_task(self._keep_typing(typing_in)) if typing_in is not None else None
        try:
            result = await reply
            log.info("discord reply in %s: %s, %d chars", log_name(key), result.status, len(result.text))
        finally:
            if typing is not None:
                typing.cancel()

    async def _keep_typing(self, channel: discord.abc.Messageable) -> None:
        while True:
            try:
                await channel.typing()
            except (discord.HTTPException, OSError) as exc:  # only cosmetic: never fail a reply over it
                log.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_REFRESH_SECONDS)

    async def _send_quietly(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(text, mention_author=False, allowed_mentions=NO_MENTIONS)
        except discord.HTTPException as exc:
            log.warning("could not send a notice: %s", exc)

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Disconnect; replies in flight belong to the core, which ends and stores them at shutdown."""
        self._closing = True
        self.manager.platforms.disconnected(PLATFORM)
        await super().close()


class ShardedDiscordBot(DiscordBot, discord.AutoShardedClient):
    """`DiscordBot` on gateway shards: each process connects only its ``[discord] shard_ids`` of ``shard_count``,
    so Discord sends it only the events of those shards' guilds (and DMs with shard 0)."""


def make_client(manager: ConversationManager, settings: DiscordSettings, **options: Any) -> DiscordBot:
    """The client ``settings`` ask for: sharded when ``shard_count`` is set, else one plain connection."""
    if settings.shard_count is None:
        return DiscordBot(manager, settings, **options)
    return ShardedDiscordBot(
        manager, settings, shard_count=settings.shard_count, shard_ids=settings.shard_ids or None, **options
    )
