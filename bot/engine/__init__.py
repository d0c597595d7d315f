"""The engine: llama.cpp in this process (`Engine`), or an OpenAI-compatible server (`bot.engine.remote`), both
behind the `InferenceEngine` protocol of `bot.engine.base`; `renders_template` says which one an engine is.

The shared types load here at once; the embedded engine's names load llama.cpp, so they are imported on
first use (``from bot.engine import Engine``), and a process on a remote server never loads llama.cpp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engine.base import (
    EngineStatus,
    Figures,
    FinishReason,
    InferenceEngine,
    PromptTooLong,
    QueuePosition,
    Retrying,
    renders_template,
)
from bot.engine.generation import Generation

if TYPE_CHECKING:
    from bot.engine.embedded import Engine
    from bot.engine.tokenizer import Tokenizer

__all__ = [
    "Engine",
    "EngineStatus",
    "Figures",
    "FinishReason",
    "Generation",
    "InferenceEngine",
    "PromptTooLong",
    "QueuePosition",
    "Retrying",
    "Tokenizer",
    "renders_template",
]

_LAZY = {"Engine": "bot.engine.embedded", "Tokenizer": "bot.engine.tokenizer"}


def __getattr__(name: str) -> Any:
    """Import the embedded engine's names when first asked for (they load llama.cpp)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bot.engine' has no attribute {name!r}")
