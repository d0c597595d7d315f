"""One root exception; each subclass carries a message fit to show a user or an operator."""

from __future__ import annotations

__all__ = [
    "LlamarelayError",
    "ConfigError",
    "ModelLoadError",
    "QueueFull",
    "EngineError",
    "StoreError",
    "PromptError",
    "MessageGone",
]


class LlamarelayError(Exception):
    """Base of every error llamarelay raises on purpose; ``str(error)`` is meant for people."""


class ConfigError(LlamarelayError):
    """config.toml is missing, malformed, or holds a value out of range."""


class ModelLoadError(LlamarelayError):
    """The GGUF model file is missing or llama.cpp cannot load it."""


class QueueFull(LlamarelayError):
    """The engine's request queue is full; the request was refused rather than left hanging."""


class EngineError(LlamarelayError):
    """llama.cpp failed while generating."""


class StoreError(LlamarelayError):
    """The SQLite database cannot be opened or written."""


class PromptError(LlamarelayError):
    """The model's chat template cannot format this conversation."""


class MessageGone(Exception):
    """Raised by a reply target: that message can no longer be edited (deleted, or its token expired).

    Delivery then shows the text in a new message instead. Not a LlamarelayError: users never see it.
    """
