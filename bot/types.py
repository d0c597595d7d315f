"""The few types every layer passes around: session keys, incoming messages, reply targets, reply statuses."""

from __future__ import annotations

import base64
import enum
import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Attachment",
    "Controls",
    "ImagePart",
    "SessionKey",
    "Incoming",
    "Phase",
    "ReplyStatus",
    "ReplyTarget",
    "log_name",
]


def log_name(key: SessionKey | str) -> str:
    """How logs name a conversation: its platform and a hash of its key. A key can hold a secret (the web
    page's browser id, which is that browser's cookie), so no log line carries the key itself."""
    text = str(key)
    return f"{text.split('/', 1)[0]}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class SessionKey:
    """Which conversation a message belongs to; ``str(key)`` is its primary key in the store.

    A channel session is platform + workspace (guild / team) + channel (+ thread). A DM session is
    platform + user only, so it can never equal a channel key and is never visible from a channel.
    """

    platform: str
    workspace: str = ""
    channel: str = ""
    thread: str = ""
    dm_user: str = ""

    def __post_init__(self) -> None:
        if not self.platform:
            raise ValueError("SessionKey needs a platform")
        if self.dm_user and (self.workspace or self.channel or self.thread):
            raise ValueError("a DM SessionKey holds only platform and dm_user")
        if not self.dm_user and not self.channel:
            raise ValueError("SessionKey needs a channel or a dm_user")
        for part in (self.platform, self.workspace, self.channel, self.thread, self.dm_user):
            if "/" in part:
                raise ValueError(f"SessionKey parts cannot contain '/': {part!r}")

    @classmethod
    def for_channel(cls, platform: str, workspace: str, channel: str, thread: str = "") -> SessionKey:
        return cls(platform, workspace=workspace, channel=channel, thread=thread)

    @classmethod
    def for_dm(cls, platform: str, user: str) -> SessionKey:
        return cls(platform, dm_user=user)

    @classmethod
    def parse(cls, text: str) -> SessionKey:
        """The key whose ``str()`` is ``text``."""
        parts = text.split("/")
        if len(parts) == 3 and parts[1] == "dm":
            return cls.for_dm(parts[0], parts[2])
        if len(parts) in (4, 5) and parts[1] == "ch":
            return cls.for_channel(parts[0], parts[2], parts[3], parts[4] if len(parts) == 5 else "")
        raise ValueError(f"not a session key: {text!r}")

    @property
    def is_private(self) -> bool:
        return bool(self.dm_user)

    @property
    def parent(self) -> SessionKey | None:
        """A thread's channel (whose settings the thread inherits until it sets its own); None otherwise."""
        return SessionKey.for_channel(self.platform, self.workspace, self.channel) if self.thread else None

    def __str__(self) -> str:
        if self.dm_user:
            return f"{self.platform}/dm/{self.dm_user}"
        parts = [self.platform, "ch", self.workspace, self.channel] + ([self.thread] if self.thread else [])
        return "/".join(parts)


@dataclass(frozen=True)
class Attachment:
    """A file sent with a message: its text when it could be read (see `bot.files`), else why it was skipped."""

    name: str
    text: str | None = None
    skipped: str = ""  # e.g. "not a text file", "larger than 200 kB"


@dataclass(frozen=True)
class ImagePart:
    """An image of a user's turn as stored and sent (see `bot.images`): PNG or JPEG bytes at the model's size."""

    name: str
    media_type: str  # image/png or image/jpeg
    data: bytes
    width: int
    height: int

    def data_url(self) -> str:
        """The image inline, as OpenAI's ``image_url`` parts take it."""
        return f"data:{self.media_type};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class Incoming:
    """One user message, normalized by an adapter: mentions already stripped or resolved."""

    key: SessionKey
    author_id: str
    author_name: str
    text: str
    event_id: str = ""
    attachments: tuple[Attachment, ...] = ()
    images: tuple[ImagePart, ...] = ()  # read and scaled by `bot.images`; its skipped ones are in attachments
    author_roles: frozenset[str] = frozenset()  # the author's role ids in the place (Discord), for tools' grants


@dataclass(frozen=True)
class Controls:
    """The buttons a platform may show under a reply's last message."""

    stop: bool = False  # while the reply is on its way
    reply_id: int | None = None  # once it is stored: Regenerate (and Continue) act on this reply
    can_continue: bool = False  # it was cut by the length limit, or stopped
    approval: str | None = None  # a tool call waits for Run / Deny: the id of its `bot.tools.approvals` request
    tool_details: bool = False  # the stored reply called tools: a button shows their arguments and results


class Phase(str, enum.Enum):
    """What a reply is doing while it has no text to show yet."""

    THINKING = "thinking"  # the model is reading the prompt or starting to write
    REASONING = "reasoning"  # the model is writing hidden reasoning
    WAITING = "waiting"  # for the previous reply of its conversation
    QUEUED = "queued"  # in the engine's queue, at ``ReplyStatus.position``
    RETRYING = "retrying"  # the model server is unreachable; the request is tried again
    TOOL = "tool"  # a tool call runs, named by ``ReplyStatus.tool`` (the tool's title)
    APPROVAL = "approval"  # a tool call waits for the user's Run / Deny, named by ``ReplyStatus.tool``


@dataclass(frozen=True)
class ReplyStatus:
    """A reply's status before its text: a typed value each adapter renders its own way.

    The shared rendering (the placeholder line) is `bot.wording.status_line`.
    """

    phase: Phase
    position: int | None = None  # the place in the engine's queue (1 = next), for QUEUED only
    tool: str = ""  # the tool's title, for TOOL and APPROVAL only

    def __post_init__(self) -> None:
        if (self.phase is Phase.QUEUED) != (self.position is not None):
            raise ValueError(
                f"a {self.phase.value} status takes {'a' if self.phase is Phase.QUEUED else 'no'} queue position"
            )
        names_a_tool = self.phase in (Phase.TOOL, Phase.APPROVAL)
        if names_a_tool != bool(self.tool):
            raise ValueError(f"a {self.phase.value} status takes {'a' if names_a_tool else 'no'} tool title")


class ReplyTarget(Protocol):
    """Where a reply goes: a thin transport implemented by each adapter, driven by `bot.delivery.Delivery`.

    Every call carries the message's whole text, and the `Controls` to show under it (None: no buttons; a
    platform without buttons ignores them). A call that fails raises (`bot.errors.MessageGone` when the
    message can no longer be edited); retries, pacing and fallbacks are the core's, never the target's.
    A target that appends instead of replacing (an event stream, Slack's native streaming) sends ``text``
    minus what it already sent for that handle.

    Optional attributes: ``measure(text) -> int`` when the platform counts length its own way (escaping makes
    text longer; used against ``max_length`` instead of ``len``), and ``bucket``, the name of the platform's
    rate bucket this target writes to (e.g. one Discord channel, one Slack workspace): every reply in one
    bucket shares its pace. Without one, the reply paces alone. ``burst``: writes the bucket allows back to back
    after a quiet spell (default 1). ``reference(handle) -> str | None``: where that message is, as a string
    the adapter's locator (`ConversationManager.locators`) turns back into a target and handle, so another
    process can rewrite the message if this one dies; None when it cannot be found again.

    ``asks_approval``: True where the target can show `Controls.approval`'s Run / Deny buttons and the adapter
    forwards presses to `bot.tools.approvals.Approvals`; only there are tools marked ``confirm`` offered.

    A reply's status (`ReplyStatus`) is shown as text rendered by `bot.wording.status_line`, unless the target
    renders statuses its own way: then it has ``post_status(status, controls)`` and ``edit_status(handle,
    status, controls)``, used instead of ``post`` and ``edit`` while the message shows a status (the web page
    sends status events, a Slack assistant thread sets the thread's status).
    """

    max_length: int
    """Longest text one message may hold; longer replies continue in new messages."""
    min_edit_interval: float
    """Seconds between two writes (posts or edits) in this target's rate bucket."""

    async def post(self, text: str, controls: Controls | None = None) -> Any:
        """Post the reply's first message and return a handle for `edit`."""
        ...

    async def post_continuation(self, text: str, controls: Controls | None = None) -> Any:
        """Post a further message of the reply (after the first, or instead of one that is gone)."""
        ...

    async def edit(self, handle: Any, text: str, controls: Controls | None = None) -> None:
        """Replace the text of a message posted by `post` or `post_continuation`."""
        ...
