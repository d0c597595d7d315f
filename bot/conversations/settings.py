"""Per-session settings: a thread inherits its channel's system prompt, sampling and model until it sets its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bot.config import SamplingSettings, Settings
from bot.store import Store
from bot.text import clean_text
from bot.types import SessionKey

__all__ = ["SessionSettings"]


def _key(key: SessionKey | str) -> SessionKey:
    return SessionKey.parse(key) if isinstance(key, str) else key


class SessionSettings:
    """The configured defaults, overridden by a channel's settings, overridden by a conversation's own."""

    def __init__(self, store: Store, settings: Settings, n_ctx: Callable[[], int]) -> None:
        self._store = store
        self._settings = settings
        self._n_ctx = n_ctx  # the engine's context window, which max_tokens must stay below

    async def system_prompt(self, key: SessionKey | str) -> str:
        """The conversation's own system prompt, else its channel's (a thread inherits), else the default."""
        key = _key(key)
        for owner in (key, key.parent):
            if owner is not None and (prompt := await self._store.system_prompt(str(owner))) is not None:
                return prompt
        return self._settings.conversation.system_prompt

    async def set_system_prompt(self, key: SessionKey, prompt: str | None) -> None:
        """Set this session's system prompt; None restores the configured default."""
        await self._store.set_system_prompt(str(key), None if prompt is None else clean_text(prompt))

    async def model(self, key: SessionKey | str) -> str | None:
        """The name of the model the conversation chose, else its channel's (a thread inherits); None: the default."""
        key = _key(key)
        for owner in (key, key.parent):
            if owner is not None and (name := await self._store.model(str(owner))) is not None:
                return name
        return None

    async def set_model(self, key: SessionKey, name: str | None) -> None:
        """Choose this session's model by its configured name; None goes back to inheriting (or the default)."""
        await self._store.set_model(str(key), name)

    async def sampling(self, key: SessionKey | str) -> SamplingSettings:
        """The configured sampling with the channel's overrides, then the conversation's own (a thread inherits)."""
        key = _key(key)
        overrides = {
            **(await self._store.sampling(str(key.parent)) if key.parent else {}),
            **await self._store.sampling(str(key)),
        }
        base = self._settings.sampling
        return SamplingSettings.model_validate({**base.model_dump(), **overrides}) if overrides else base

    async def set_sampling(self, key: SessionKey, **overrides: Any) -> None:
        """Override sampling settings for one session (validated like config.toml's [sampling])."""
        merged = {**await self._store.sampling(str(key)), **overrides}
        sampling = SamplingSettings.model_validate({**self._settings.sampling.model_dump(), **merged})
        n_ctx = self._n_ctx()
        if sampling.max_tokens >= n_ctx:
            raise ValueError(f"max_tokens must be below the {n_ctx}-token context window")
        await self._store.set_sampling(str(key), merged)
