"""Text helpers the core and the adapters share: cleaning what users send, speaker names, one-line previews."""

from __future__ import annotations

import re
import unicodedata

from bot.prompt import strip_markers

__all__ = ["clean_text", "encodable", "one_line", "quoted", "speaker_name"]

SPEAKER_NAME_CHARS = 64  # a display name longer than this is cut before the model reads it

# Zero-width and bidi-control characters are invisible and only confuse the tokenizer.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with lone surrogates (valid in JSON and Python, never in UTF-8) replaced by U+FFFD.

    Not `bot.store.storable`, which removes what a database refuses (NUL); this removes what UTF-8 cannot hold.
    """
    return _SURROGATE.sub("\ufffd", text)


def clean_text(text: str) -> str:
    """Normalize a user message: encodable, no control or zero-width characters, Unix newlines, trimmed."""
    text = encodable(text)
    text = strip_markers(_INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    return text.strip()


def speaker_name(name: str) -> str:
    """A display name as the model reads it before a user's words: one short plain line."""
    return " ".join(clean_text(name).split())[:SPEAKER_NAME_CHARS]


def one_line(text: str, limit: int, *, whole_words: bool = False) -> str:
    """``text`` on one line of at most ``limit`` characters, ending in "…" when cut (a preview or a title).

    ``whole_words``: a cut ends on a whole word when one ends in the second half of the line.
    """
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    if whole_words and " " in cut[limit // 2 :]:
        cut = cut.rsplit(" ", 1)[0].rstrip()
    return cut + "…"


def quoted(text: str) -> str:
    """Text shown as a Markdown quote, with a blank line after it (reasoning above the answer)."""
    text = text.strip()
    return "".join(f"> {line}\n" for line in text.splitlines()) + "\n" if text else ""
