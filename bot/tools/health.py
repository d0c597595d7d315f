"""A tool server's health as /status, /readyz and /metrics report it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["ServerState", "ServerHealth"]


class ServerState(StrEnum):
    STARTING = "starting"  # the first connection is being made
    UP = "up"  # initialized, its tools listed, answering pings
    DOWN = "down"  # failed or died; restarted after a delay


@dataclass(frozen=True)
class ServerHealth:
    """One server's state; ``reason`` says why it is down, ``restarts`` counts reconnections."""

    state: ServerState
    reason: str | None = None
    tools: int = 0
    restarts: int = 0

    @property
    def up(self) -> bool:
        return self.state is ServerState.UP

    def describe(self) -> str:
        """One line: "up, 3 tools", "starting", or "down: <reason>"."""
        if self.state is ServerState.UP:
            return f"up, {self.tools} tool{'s' if self.tools != 1 else ''}"
        if self.state is ServerState.DOWN:
            return f"down: {self.reason or 'unknown reason'}"
        return "starting"
