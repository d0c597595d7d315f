"""Which tools a conversation may use: the ``[[tools.allow]]`` grants matched against its session key and the
asking user. No grant, no tools: a place that matches none never offers the model any."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from bot.config import ToolGrant
from bot.tools.registry import ToolSpec
from bot.types import SessionKey

__all__ = ["ToolAccess"]


class ToolAccess:
    """The grants of ``[[tools.allow]]``: each names places (session-key patterns), optionally users, and tools."""

    def __init__(self, grants: Sequence[ToolGrant]) -> None:
        self._grants = list(grants)

    def may_use(self, key: SessionKey | str, user_id: str, tool: str) -> bool:
        """Whether ``user_id`` may have the model call ``tool`` in conversation ``key``; an unknown user ("")
        passes only grants open to everyone."""
        place = str(key)
        return any(any(fnmatchcase(place, pattern) for pattern in grant.places)
                   and (not grant.users or user_id in grant.users)
                   and any(fnmatchcase(tool, pattern) for pattern in grant.tools)
                   for grant in self._grants)

    def offered(self, key: SessionKey | str, user_id: str, tools: Sequence[ToolSpec]) -> list[ToolSpec]:
        """The ``tools`` this place and user may use, in their order."""
        return [tool for tool in tools if self.may_use(key, user_id, tool.name)]
