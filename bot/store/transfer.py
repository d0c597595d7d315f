"""`llamarelay export` / `import`: every conversation as JSON lines, so history moves between backends.

The file opens with a header line, then each session followed by its messages in order:
``{"type": "session", "key": ..., "system_prompt": ..., "sampling": {...}, "created_at": ..., "model": ...}`` and
``{"type": "message", "id": ..., "session_key": ..., "role": ..., ...every column}``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bot.errors import StoreError
from bot.store import ADDED_FIELDS, MESSAGE_FIELDS, SESSION_FIELDS, Store

__all__ = ["export_jsonl", "import_jsonl"]

FORMAT = "llamarelay-export"
FORMAT_VERSION = 1
LINES_PER_WRITE = 1000


async def export_jsonl(store: Store, path: Path) -> tuple[int, int]:
    """Write every session and message of ``store`` to ``path``; (sessions, messages) written."""
    header = {"type": FORMAT, "version": FORMAT_VERSION, "schema": await store.schema_version()}
    counts = {"session": 0, "message": 0}
    lines = [json.dumps(header)]
    try:
        with path.open("w", encoding="utf-8") as file:
            async for kind, record in store.dump():
                counts[kind] += 1
                lines.append(json.dumps({"type": kind, **record}, ensure_ascii=False))
                if len(lines) >= LINES_PER_WRITE:
                    await asyncio.to_thread(file.write, "\n".join(lines) + "\n")
                    lines = []
            await asyncio.to_thread(file.write, "\n".join(lines) + "\n" if lines else "")
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc}") from None
    return counts["session"], counts["message"]


async def import_jsonl(store: Store, path: Path) -> tuple[int, int]:
    """Load a file written by `export_jsonl` into ``store``, which must hold no conversation yet."""
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
    if not text.strip():
        raise StoreError(f"{path} is empty")
    sessions: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}:{number}: not JSON: {exc}") from None
        kind = record.pop("type", None) if isinstance(record, dict) else None
        if number == 1:
            if kind != FORMAT or record.get("version") != FORMAT_VERSION:
                raise StoreError(f"{path} is not a llamarelay export (version {FORMAT_VERSION})")
            continue
        fields = {"session": SESSION_FIELDS, "message": MESSAGE_FIELDS}.get(kind or "")
        if fields is None:
            raise StoreError(f"{path}:{number}: expected a session or a message")
        record = {**ADDED_FIELDS[str(kind)], **record}  # an export of an older llamarelay lacks the newer fields
        if set(record) != set(fields):
            raise StoreError(f"{path}:{number}: a {kind} has exactly these fields: {', '.join(fields)}")
        (sessions if kind == "session" else messages).append(record)
    await store.load(sessions, messages)
    return len(sessions), len(messages)
