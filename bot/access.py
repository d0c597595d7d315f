"""Who may do what, asked the same way by every adapter: allow-lists, admins, DMs, the per-user rate limit and
who may change a conversation's shared settings.

Each adapter maps its platform's identities onto an `Actor` (who) and a `Place` (where), asks
`AccessPolicy.check` one question, and renders the `Decision` it gets (`bot.wording.refusal_text` holds the
words, once).
Approving a tool call (Run / Deny) is `Action.APPROVE_TOOL`: only the user who asked, or an admin.
Which tools a conversation may use is `AccessPolicy.tools_for`: the ``[[tools.allow]]`` grants, matched against
the place's session key, the actor's id and roles, and the tool's name. No grant, no tools.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Protocol, TypeVar

from bot.ratelimit import RateLimiter
from bot.types import SessionKey

if TYPE_CHECKING:
    from bot.config import ToolGrant

__all__ = ["AccessPolicy", "Action", "Actor", "Decision", "Place", "Refusal"]


class Action(enum.Enum):
    """What the actor wants to do; each asks the allow-lists first."""

    USE = "use"  # a command or button that starts no new answer (/status, /reset, Stop)
    ASK = "ask"  # a new answer from the model: counts one message against the rate limit
    SET_SYSTEM_PROMPT = "set_system_prompt"  # change a conversation's shared system prompt
    SET_SAMPLING = "set_sampling"  # change a conversation's shared sampling settings (/settings)
    APPROVE_TOOL = "approve_tool"  # Run or Deny a tool call: the asker (``owner``) or an admin
    SET_MODEL = "set_model"  # change which model answers a shared conversation (/model)


class Refusal(enum.Enum):
    """Why a `Decision` says no; `bot.wording.refusal_text` words each one."""

    NOT_LISTED = "not_listed"  # the user is on none of the allow-lists
    SERVER_NOT_ALLOWED = "server_not_allowed"  # a server/workspace outside the allow-list
    CHANNEL_NOT_ALLOWED = "channel_not_allowed"  # a channel (and thread) outside the allow-list
    DMS_OFF = "dms_off"  # direct messages are switched off
    DM_NOT_ALLOWED = "dm_not_allowed"  # a DM from someone the platform finds in no allowed server
    TOO_FAST = "too_fast"  # over the per-minute message limit
    ADMINS_ONLY = "admins_only"  # a shared conversation's settings: admins only
    NOT_YOURS = "not_yours"  # someone else's tool call: only the one who asked, or an admin, may approve it


@dataclass(frozen=True)
class Place:
    """Where a request comes from: a DM, or a channel (and maybe its thread) of a server or workspace."""

    dm: bool
    server: str = ""
    channels: frozenset[str] = frozenset()  # the channel and, in a thread, the thread: either may be listed
    key: str = ""  # the conversation's session key, which ``[[tools.allow]]`` places match ("" = none known)

    @classmethod
    def of(cls, key: SessionKey | str) -> Place:
        """The place of conversation ``key`` (a DM key is a DM; a channel key names its server and channels)."""
        key = SessionKey.parse(key) if isinstance(key, str) else key
        if key.is_private:
            return cls(dm=True, key=str(key))
        return cls(
            dm=False, server=key.workspace, channels=frozenset(c for c in (key.channel, key.thread) if c), key=str(key)
        )


@dataclass(frozen=True)
class Actor:
    """Who asks: the platform's user id, their roles, and whether the platform makes them an admin of the place.

    ``manages_place``: the platform's own say (Discord's Manage Server); configured admins need no flag.
    ``member_elsewhere``: for a DM, asks the platform whether the user passes the lists as a member of an
    allowed server (Discord looks it up over REST); None where a platform cannot tell.
    """

    id: str
    roles: frozenset[str] = frozenset()
    manages_place: bool = False
    member_elsewhere: Callable[[], Awaitable[bool]] | None = None


@dataclass(frozen=True)
class Decision:
    """The policy's answer: allowed, or the reason why not (with what the rate limit's words need)."""

    refusal: Refusal | None = None
    action: Action = Action.USE
    per_minute: int = 0
    retry_after: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.refusal is None


class _Named(Protocol):
    @property
    def name(self) -> str: ...


NamedT = TypeVar("NamedT", bound=_Named)


def _ids(values: Iterable[object]) -> frozenset[str]:
    return frozenset(str(value) for value in values)


def _grants(grant: ToolGrant, actor: Actor, key: str, tool: str) -> bool:
    """Whether this one grant lets ``actor`` use ``tool`` in the conversation whose session key is ``key``."""
    place = any(fnmatchcase(key, pattern) for pattern in grant.places)
    who = (
        (not grant.users and not grant.roles)
        or (bool(actor.id) and actor.id in grant.users)
        or bool(actor.roles & set(grant.roles))
    )
    return place and who and any(fnmatchcase(tool, pattern) for pattern in grant.tools)


class AccessPolicy:
    """One platform's allow-lists, admins, DM switch and rate limit; empty lists allow everyone.

    Admins pass every list and have no rate limit. A DM is answered when direct messages are on and the user
    is allowed somewhere: listed, or (where the platform can tell) a member of an allowed server who passes
    its lists.

    ``tool_grants`` (``[[tools.allow]]``) say which tools each place may use, apart from the lists above: a message
    that reaches the model has passed them already, and tools are opt-in on top, for admins too.
    """

    def __init__(
        self,
        *,
        servers: Iterable[object] = (),
        channels: Iterable[object] = (),
        roles: Iterable[object] = (),
        users: Iterable[object] = (),
        admins: Iterable[object] = (),
        dms_enabled: bool = True,
        messages_per_minute: int = 0,
        limiter: RateLimiter | None = None,
        tool_grants: Sequence[ToolGrant] = (),
    ) -> None:
        self.servers, self.channels, self.roles = _ids(servers), _ids(channels), _ids(roles)
        self.users, self.admins = _ids(users), _ids(admins)
        self.dms_enabled = dms_enabled
        self.limiter = limiter or RateLimiter(messages_per_minute)
        self.tool_grants = list(tool_grants)

    def is_admin(self, actor: Actor) -> bool:
        return actor.id in self.admins

    async def check(self, actor: Actor, place: Place, action: Action = Action.USE, *, owner: str = "") -> Decision:
        """May ``actor`` do ``action`` in ``place``? An `Action.ASK` that passes counts against the limit.
        ``owner``: for `Action.APPROVE_TOOL`, the user whose message started the call ("" = none known)."""
        admin = self.is_admin(actor)
        refusal = None if admin else await self._refusal(actor, place)
        if refusal is not None:
            return Decision(refusal, action)
        if action is Action.ASK and not admin and not self.limiter.allow(actor.id):
            return Decision(Refusal.TOO_FAST, action, self.limiter.per_minute, self.limiter.retry_after(actor.id))
        if action in (Action.SET_SYSTEM_PROMPT, Action.SET_SAMPLING, Action.SET_MODEL) and not self.may_change_settings(
            place, admin=admin or actor.manages_place
        ):
            return Decision(Refusal.ADMINS_ONLY, action)
        if action is Action.APPROVE_TOOL and not self.may_approve(actor, owner, admin=admin):
            return Decision(Refusal.NOT_YOURS, action)
        return Decision(None, action)

    @staticmethod
    def may_approve(actor: Actor, owner: str, *, admin: bool) -> bool:
        """A tool call acts for the user who asked, so they decide; an admin (configured, or the platform's
        manager of the place) may decide for anyone."""
        return admin or actor.manages_place or (bool(owner) and actor.id == owner)

    def may_use_tool(self, actor: Actor, place: Place, tool: str) -> bool:
        """Whether the model answering ``actor`` in ``place`` may call ``tool``: some grant names the place (a
        session-key pattern), the tool (a name pattern) and, if it lists users or roles, the actor's id or one of
        their roles. An unknown actor (id "", as for a Regenerate) passes only grants open to everyone; a place
        whose key is unknown passes none."""
        return bool(place.key) and any(_grants(grant, actor, place.key, tool) for grant in self.tool_grants)

    def tools_for(self, actor: Actor, place: Place, tools: Iterable[NamedT]) -> list[NamedT]:
        """The ``tools`` (anything with a ``name``) that ``actor`` may have the model use in ``place``, in order."""
        return [tool for tool in tools if self.may_use_tool(actor, place, tool.name)]

    @staticmethod
    def may_change_settings(place: Place, *, admin: bool) -> bool:
        """A DM is the user's own, so anyone; a channel and its threads are shared, so only an admin."""
        return place.dm or admin

    def listed(self, actor: Actor) -> bool:
        """True unless user or role lists are set and ``actor`` is on neither."""
        return (not self.users and not self.roles) or actor.id in self.users or bool(actor.roles & self.roles)

    async def _refusal(self, actor: Actor, place: Place) -> Refusal | None:
        if place.dm:
            if not self.dms_enabled:
                return Refusal.DMS_OFF
            return await self._dm_refusal(actor)
        if self.servers and place.server not in self.servers:
            return Refusal.SERVER_NOT_ALLOWED
        if self.channels and not place.channels & self.channels:
            return Refusal.CHANNEL_NOT_ALLOWED
        return None if self.listed(actor) else Refusal.NOT_LISTED

    async def _dm_refusal(self, actor: Actor) -> Refusal | None:
        if not (self.servers or self.channels or self.roles or self.users) or actor.id in self.users:
            return None  # a public bot: to keep strangers out of its DMs, set a list
        if self.users and not self.roles:
            return Refusal.NOT_LISTED  # only the listed users, wherever they are members
        if actor.member_elsewhere is None or await actor.member_elsewhere():
            return None
        return Refusal.DM_NOT_ALLOWED
