"""Who may do what, asked the same way by every adapter: each maps its platform's identities (admins, server
managers) onto these questions, so a rule is written once and cannot drift apart per platform."""

from __future__ import annotations

from bot.types import SessionKey

__all__ = ["may_change_settings"]


def may_change_settings(key: SessionKey, *, admin: bool) -> bool:
    """Whether a user may change conversation ``key``'s shared settings (system prompt, sampling): a DM is the
    user's own, so anyone; a channel and its threads are shared by everyone in them, so only an admin."""
    return key.is_private or admin
