"""The sampling settings people may change per conversation (``/settings``): one table, which every adapter
renders its own way (Discord as bounded slash-command options, Slack as ``name=value`` text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError

from bot.config import SamplingSettings

__all__ = ["SETTINGS", "Tunable", "refused", "tunable"]


@dataclass(frozen=True)
class Tunable:
    """One setting of ``/settings``: its [sampling] field, how people see it, its type and bounds."""

    name: str
    label: str
    kind: type[int] | type[float]
    description: str

    @property
    def bounds(self) -> tuple[float | None, float | None, bool]:
        """(lowest, highest, whether the lowest itself is excluded), from [sampling]'s own validation."""
        low: float | None = None
        high: float | None = None
        above = False
        for rule in SamplingSettings.model_fields[self.name].metadata:
            if isinstance(rule, Ge):
                low = cast(float, rule.ge)
            elif isinstance(rule, Gt):
                low, above = cast(float, rule.gt), True
            elif isinstance(rule, Le):
                high = cast(float, rule.le)
            elif isinstance(rule, Lt):
                high = cast(float, rule.lt)
        return low, high, above

    def highest(self, n_ctx: int) -> float | None:
        """The highest value a conversation may set: a reply must leave room for its prompt in the window."""
        high = self.bounds[1]
        return min(high, n_ctx - 1) if self.name == "max_tokens" and high is not None else high


SETTINGS: tuple[Tunable, ...] = (
    Tunable("temperature", "Temperature", float, "Randomness: 0 always picks the likeliest word"),
    Tunable("max_tokens", "Max tokens", int, "Longest reply, in tokens"),
    Tunable("top_p", "Top p", float, "Sample only from the likeliest words up to this total probability"),
)


def tunable(name: str) -> Tunable | None:
    """The setting called ``name``, or None when /settings cannot change it."""
    return next((setting for setting in SETTINGS if setting.name == name), None)


def refused(error: ValueError) -> list[tuple[str, str]]:
    """Why a change of settings was refused, as (setting, reason) pairs; a plain ValueError (the core's own
    check) has no setting, only its reason."""
    if isinstance(error, ValidationError):
        return [(".".join(str(part) for part in e["loc"]), e["msg"][0].lower() + e["msg"][1:]) for e in error.errors()]
    return [("", str(error))]
