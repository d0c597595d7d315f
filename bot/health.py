"""What /readyz reports: whether the bot can answer now — the engine, the database (a write, not a read) and
every configured platform — asked of the core, so the ops adapter never reaches into the engine or the store."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.conversations import ConversationManager

__all__ = ["DATABASE_CHECK_SECONDS", "PASSING", "readiness"]

DATABASE_CHECK_SECONDS = 2.0  # a database slower than this to write one row cannot answer anyone either
PASSING = ("ok", "connected")  # the results of a check that passes


async def readiness(manager: ConversationManager) -> dict[str, str]:
    """Each check and its result ("ok" or "connected" when it passes): the engine, the database, and every
    configured platform."""
    checks: dict[str, str] = {}
    checks["engine"] = await manager.engine.readiness()
    try:
        await asyncio.wait_for(manager.check_store(), DATABASE_CHECK_SECONDS)
        checks["database"] = "ok"
    except TimeoutError:
        checks["database"] = f"no answer within {DATABASE_CHECK_SECONDS:g} s"
    except Exception as exc:
        checks["database"] = f"failing: {exc}"
    for name, connected in manager.platforms.status().items():
        checks[name] = "connected" if connected else "not connected"
    return checks
