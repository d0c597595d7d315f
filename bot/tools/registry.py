"""The tools the servers offer: name -> server, schema, title and confirm flag, replaced whole per server."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolSpec", "ToolRegistry"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the model and the status line see it."""

    name: str
    server: str
    description: str
    input_schema: Mapping[str, Any] = field(hash=False, compare=False)
    title: str  # for "🔧 <title>…" while it runs
    confirm: bool = False  # the user approves each call first


class ToolRegistry:
    """Every server's current tools; a name two servers offer belongs to the first server listed in the config."""

    def __init__(self, server_order: list[str]) -> None:
        self._order = {name: index for index, name in enumerate(server_order)}
        self._by_server: dict[str, list[ToolSpec]] = {}

    def replace(self, server: str, tools: list[ToolSpec]) -> None:
        """Set ``server``'s tools (on start-up, and each time it says the list changed)."""
        self._by_server[server] = list(tools)
        for tool in tools:
            owner = self.get(tool.name)
            if owner is not None and owner.server != server:
                log.warning("tool server %s also offers a tool named %r: %s's is used", server, tool.name, owner.server)

    def drop(self, server: str) -> None:
        """Forget ``server``'s tools (it is down)."""
        self._by_server.pop(server, None)

    def get(self, name: str) -> ToolSpec | None:
        for server in sorted(self._by_server, key=lambda s: self._order.get(s, len(self._order))):
            for tool in self._by_server[server]:
                if tool.name == name:
                    return tool
        return None

    def tools(self) -> list[ToolSpec]:
        """Every usable tool, one per name, in config order of the servers."""
        seen: dict[str, ToolSpec] = {}
        for server in sorted(self._by_server, key=lambda s: self._order.get(s, len(self._order))):
            for tool in self._by_server[server]:
                seen.setdefault(tool.name, tool)
        return list(seen.values())

    def of_server(self, server: str) -> list[ToolSpec]:
        return list(self._by_server.get(server, []))
