"""The core's registry of tool calls waiting for Run / Deny: answered, timed out, stale and forged presses."""

from __future__ import annotations

import asyncio

from bot.tools.approvals import Approvals, Verdict


async def test_an_answer_settles_the_wait_once() -> None:
    approvals = Approvals()
    pending = approvals.open("k", "u1", "Deleting a file")
    assert approvals.get(pending.id) is pending and approvals.waiting("k") == [pending]
    waiting = approvals.wait(pending, 5)
    await asyncio.sleep(0)
    assert approvals.answer(pending.id, run=False)
    assert await waiting is Verdict.DENY
    assert not approvals.answer(pending.id, run=True)  # a second press finds nothing waiting
    assert approvals.get(pending.id) is None and approvals.waiting("k") == []


async def test_an_unanswered_request_times_out_and_is_closed() -> None:
    approvals = Approvals()
    pending = approvals.open("k", "u1", "Deleting a file")
    assert await approvals.wait(pending, 0.05) is Verdict.TIMEOUT
    assert not approvals.answer(pending.id, run=True)


async def test_a_cancelled_wait_closes_the_request_and_ids_are_not_guessable() -> None:
    approvals = Approvals()
    first, second = approvals.open("k", "u1", "A"), approvals.open("k", "u1", "B")
    assert first.id != second.id and len(first.id) == 16
    waiting = approvals.wait(first, 5)
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert approvals.get(first.id) is None and not approvals.answer(first.id, run=True)
    assert not approvals.answer("0" * 16, run=True)


async def test_a_wait_cancelled_before_it_ran_closes_the_request() -> None:
    """/stop can cancel the wait in the same moment it was opened, before its task ran a step."""
    approvals = Approvals()
    pending = approvals.open("k", "u1", "Sleeping")
    waiting = approvals.wait(pending, 5)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert approvals.waiting("k") == [] and not approvals.answer(pending.id, run=True)
