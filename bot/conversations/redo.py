"""The redo rule: the one place that decides whether a reply may be regenerated or continued now.

Discord's and Slack's buttons, the web API and the core itself ask `refusal`; each says the answer its own way.
"""

from __future__ import annotations

import enum

from bot.store import Status, StoredMessage
from bot.wording import LENGTH_NOTE

__all__ = ["RedoRefusal", "can_continue", "can_continue_status", "refusal"]


class RedoRefusal(str, enum.Enum):
    """Why a reply may not be regenerated or continued now."""

    STALE = "stale_reply"  # it is no longer the conversation's latest answer
    BUSY = "reply_in_progress"  # the conversation is answering (this reply, or a newer message)
    NOTHING_TO_CONTINUE = "nothing_to_continue"  # Continue on a reply that was not cut short


def can_continue_status(status: str, notes: list[str] | str) -> bool:
    """Whether a reply that ended so can be continued: cut by the length limit, stopped or interrupted."""
    lines = notes.splitlines() if isinstance(notes, str) else notes
    return status in (Status.STOPPED, Status.INTERRUPTED) or (status == Status.COMPLETE and LENGTH_NOTE in lines)


def can_continue(reply: StoredMessage) -> bool:
    """Whether a stored message is a reply that Continue can go on with."""
    return reply.role == "assistant" and bool(reply.content.strip()) and can_continue_status(reply.status, reply.notes)


def refusal(latest: StoredMessage | None, reply_id: int, *, continuing: bool, answering: bool) -> RedoRefusal | None:
    """Why reply ``reply_id`` may not be redone now, or None when it may.

    ``latest`` is the conversation's newest reply (None when its newest message is not a reply);
    ``answering``: the conversation has a message on its way to a reply.
    """
    if latest is None and answering:  # a newer message is being answered: its reply will be the latest
        return RedoRefusal.BUSY
    if latest is None or latest.id != reply_id:
        return RedoRefusal.STALE
    if answering or latest.status == Status.GENERATING:
        return RedoRefusal.BUSY
    if continuing and not can_continue(latest):
        return RedoRefusal.NOTHING_TO_CONTINUE
    return None
