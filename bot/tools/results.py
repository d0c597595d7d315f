"""A tool's answer as untrusted plain text for the model: content blocks flattened, control characters dropped,
cut at the size cap with a note."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mcp import types

__all__ = ["ToolResult", "result_text", "cut"]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: plain text to feed back to the model, whether it failed, and whether it was cut."""

    tool: str
    text: str
    is_error: bool = False
    cut: bool = False


def result_text(result: types.CallToolResult) -> str:
    """Every content block as text; what is not text (images, audio, links) becomes a one-line placeholder."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if text is not None else f"[binary resource {resource.uri}]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{block.type} content, {getattr(block, 'mime_type', None) or 'unknown type'}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, default=str))
    return _CONTROL.sub("", "\n".join(parts))


def cut(text: str, max_chars: int) -> tuple[str, bool]:
    """``text`` within ``max_chars``, with a note saying how much was left out; and whether it was cut."""
    if len(text) <= max_chars:
        return text, False
    return text[
        :max_chars
    ] + f"\n[cut: the tool returned {len(text):,} characters; only the first {max_chars:,} are shown]", True
