"""Tool calls waiting for the user's Run / Deny: the core's one registry of them.

The reply loop opens a request for a ``confirm = true`` call and waits on it; an adapter shows Run / Deny
buttons carrying the request's id, asks the access policy whether the presser may answer
(`bot.access.Action.APPROVE_TOOL`, with the request's ``owner``), and forwards the answer here. Requests live
in memory only: after a restart a press finds nothing waiting and is told so.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from dataclasses import dataclass, field

__all__ = ["Approvals", "PendingApproval", "Verdict"]


class Verdict(enum.Enum):
    """How a request for approval ended."""

    RUN = "run"
    DENY = "deny"
    TIMEOUT = "timeout"


@dataclass(eq=False)
class PendingApproval:
    """One call waiting: where (the conversation's key), whose it is, and what it would run."""

    id: str
    key: str
    owner: str  # the user whose message led to the call ("" = none known: only an admin may answer)
    tool: str  # the tool's title
    answer: asyncio.Future[Verdict] = field(repr=False)


class Approvals:
    """Every pending request, by id; `wait` opens one and returns its verdict, `answer` settles one."""

    def __init__(self) -> None:
        self._pending: dict[str, PendingApproval] = {}

    def open(self, key: str, owner: str, tool: str) -> PendingApproval:
        """A new request; its id goes into the buttons (unguessable, so a stale or forged press finds nothing)."""
        pending = PendingApproval(secrets.token_hex(8), key, owner, tool, asyncio.get_running_loop().create_future())
        self._pending[pending.id] = pending
        return pending

    def wait(self, pending: PendingApproval, timeout: float) -> asyncio.Task[Verdict]:
        """A task giving ``pending``'s verdict, or TIMEOUT after ``timeout`` seconds. The request is closed when the
        task ends, however it ends: cancelled by /stop too, even before it ran a step."""
        task = asyncio.create_task(self._verdict(pending, timeout), name=f"approval of {pending.tool}")
        task.add_done_callback(lambda _: self.close(pending))
        return task

    @staticmethod
    async def _verdict(pending: PendingApproval, timeout: float) -> Verdict:
        try:
            return await asyncio.wait_for(asyncio.shield(pending.answer), timeout)
        except TimeoutError:
            return Verdict.TIMEOUT

    def get(self, approval_id: str) -> PendingApproval | None:
        """The request still waiting under ``approval_id``, or None."""
        return self._pending.get(approval_id)

    def answer(self, approval_id: str, run: bool) -> bool:
        """Settle a request (the presser was checked by the adapter); False when it is no longer waiting."""
        pending = self._pending.pop(approval_id, None)
        if pending is None or pending.answer.done():
            return False
        pending.answer.set_result(Verdict.RUN if run else Verdict.DENY)
        return True

    def close(self, pending: PendingApproval) -> None:
        self._pending.pop(pending.id, None)
        if not pending.answer.done():
            pending.answer.cancel()

    def waiting(self, key: str) -> list[PendingApproval]:
        """The requests waiting in conversation ``key`` (for tests and /status)."""
        return [pending for pending in self._pending.values() if pending.key == key]
