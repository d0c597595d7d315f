"""Whose turn it is: a conversation's messages are answered one at a time, in arrival order.

Two turns: this process's lock per conversation, and the store's (on PostgreSQL it spans every process, so
a message that landed on another process goes first). A request ended while it waits gives up its place.
"""

from __future__ import annotations

import asyncio
import contextlib

from bot.conversations.requests import Request
from bot.store import Store

__all__ = ["take_store_turn", "take_turn"]


async def take_turn(request: Request, turn: asyncio.Lock) -> bool:
    """Wait until earlier messages of the conversation are answered; False if this one was ended first."""
    acquire = asyncio.ensure_future(turn.acquire())
    wake = asyncio.ensure_future(request.wake.wait())
    try:
        await asyncio.wait({acquire, wake}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        if acquire.done() and not acquire.cancelled():
            turn.release()
        raise
    finally:
        wake.cancel()
        if not acquire.done():
            acquire.cancel()
    if acquire.done() and not acquire.cancelled():
        if request.ended is None:
            return True
        turn.release()
    return False


async def take_store_turn(request: Request, store: Store, held: contextlib.AsyncExitStack) -> bool:
    """Enter the store's turn of the conversation into ``held``; False if the request was ended while waiting."""
    if request.ended is not None:
        return False
    enter = asyncio.ensure_future(held.enter_async_context(store.turn(request.key)))
    wake = asyncio.ensure_future(request.wake.wait())
    try:
        await asyncio.wait({enter, wake}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        wake.cancel()
        if not enter.done():
            enter.cancel()
            await asyncio.wait({enter})  # it lets go of what it took before we go on
    if enter.cancelled():
        return False
    enter.result()  # a StoreError: the reply fails with its line
    return request.ended is None
