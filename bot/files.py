"""Files sent with a message: which are read into the prompt (text-like, small enough), and how they appear.

Adapters fetch a file's bytes (or only its size and name, when it is too big or not text) and turn it into an
`Attachment` here; the core folds readable ones into the message under their names and lists skipped ones.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from bot.types import Attachment
from bot.wording import NOT_A_TEXT_FILE, NOT_UTF8_TEXT, file_skipped, file_too_large

__all__ = [
    "TEXT_SUFFIXES",
    "clean_name",
    "is_text_like",
    "not_worth_reading",
    "read_attachment",
    "skipped",
    "with_attachments",
]

TEXT_SUFFIXES = frozenset(
    {
        ".txt",
        ".md",
        ".markdown",
        ".py",
        ".js",
        ".ts",
        ".json",
        ".csv",
        ".tsv",
        ".log",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".xml",
        ".html",
        ".css",
        ".sh",
        ".sql",
        ".rs",
        ".go",
        ".java",
        ".c",
        ".h",
        ".cpp",
        ".rb",
        ".php",
        ".diff",
        ".patch",
    }
)
_TEXT_TYPES = (
    "text/",
    "application/json",
    "application/x-ndjson",
    "application/xml",
    "application/x-yaml",
    "application/toml",
    "application/javascript",
    "application/x-sh",
)
_FENCE_RUN = re.compile(r"`{3,}")


def is_text_like(name: str, content_type: str | None = None) -> bool:
    """True for the files worth reading: a text MIME type or a known text suffix."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    return media_type.startswith(_TEXT_TYPES) or PurePosixPath(name.lower()).suffix in TEXT_SUFFIXES


def skipped(name: str, why: str) -> Attachment:
    return Attachment(clean_name(name), skipped=why)


def not_worth_reading(name: str, content_type: str | None, size: int, max_bytes: int) -> Attachment | None:
    """Why a file is skipped, judged from what the platform reports before any download; None to read it."""
    if size > max_bytes:
        return skipped(name, file_too_large(max_bytes))
    if not is_text_like(name, content_type):
        return skipped(name, NOT_A_TEXT_FILE)
    return None


def read_attachment(name: str, content_type: str | None, data: bytes, max_bytes: int) -> Attachment:
    """The file as text when it is text-like, at most ``max_bytes`` and valid UTF-8; else why it is skipped."""
    if (reason := not_worth_reading(name, content_type, len(data), max_bytes)) is not None:
        return reason
    if b"\x00" in data:
        return skipped(name, NOT_A_TEXT_FILE)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return skipped(name, NOT_UTF8_TEXT)
    return Attachment(clean_name(name), text.replace("\r\n", "\n"))


def with_attachments(text: str, attachments: tuple[Attachment, ...]) -> tuple[str, list[str]]:
    """The message as stored and read by the model: its text, then each readable file under its name in a
    code block; and a note for each file that was skipped."""
    parts = [text] if text else []
    notes = []
    for attachment in attachments:
        if attachment.text is None:
            notes.append(file_skipped(attachment.name, attachment.skipped))
            continue
        fence = "`" * max(3, 1 + max((len(run) for run in _FENCE_RUN.findall(attachment.text)), default=0))
        parts.append(f"File {attachment.name}:\n{fence}\n{attachment.text.rstrip()}\n{fence}")
    return "\n\n".join(parts), notes


def clean_name(name: str) -> str:
    # A file name is shown to people and to the model: one line, no path.
    return " ".join(PurePosixPath(name.replace("\\", "/")).name.split())[:200] or "file"
