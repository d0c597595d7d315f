"""Which conversation a Slack message, command, shortcut or button belongs to, decided in one place."""

from __future__ import annotations

from bot.types import SessionKey

__all__ = ["PLATFORM", "is_dm", "session_key"]

PLATFORM = "slack"


def is_dm(channel: str) -> bool:
    """Whether ``channel`` is a direct message with the bot (Slack's DM channel ids start with ``D``)."""
    return channel.startswith("D")


def session_key(team: str, channel: str, user: str, thread: str = "", *, own_thread: bool = False) -> SessionKey:
    """The conversation of a message in ``channel`` (and ``thread``): in a DM the user's own, whatever thread;
    else the channel's, or the thread's when given. ``own_thread``: an assistant thread, a conversation of its
    own even in the DM."""
    if is_dm(channel) and not own_thread:
        return SessionKey.for_dm(PLATFORM, user)
    return SessionKey.for_channel(PLATFORM, team, channel, thread)
