"""llama.cpp's tokenizer for one vocabulary, made safe for text people wrote."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable, Sequence
from typing import Any

import llama_cpp

from bot.errors import EngineError

__all__ = ["Tokenizer"]

# Tokens plain text must never become: chat markers, BOS/EOS, and added tokens such as Qwen's <think>.
_SPECIAL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
_LONGEST_MATCHED_TEXT = 128  # longer token texts are left to the fallback in Tokenizer._plain_run


class Tokenizer:
    """llama.cpp's tokenizer for one vocabulary, made safe for text people wrote.

    llama.cpp matches USER_DEFINED tokens (``<think>`` or ``<tool_call>`` in Qwen vocabularies) even with
    special parsing off, so a user could type the model's own markers. Here each such text is cut out and
    spelt with ordinary one-character (or one-byte) tokens: plain text never yields a CONTROL or
    USER_DEFINED token, while template text (``special=True``) still does.
    """

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab
        self._pieces: dict[int, bytes] = {}  # each token's text, as generation asks for it (every token, every reply)
        attributes = [llama_cpp.llama_vocab_get_attr(vocab, t) for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]
        self.special_ids = frozenset(t for t, attr in enumerate(attributes) if attr & _SPECIAL_ATTRS)
        """Ids of CONTROL and USER_DEFINED tokens."""
        matched = {self._text(t) for t, attr in enumerate(attributes) if attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED}
        self._matched = _literal_pattern(t for t in matched if 0 < len(t) <= _LONGEST_MATCHED_TEXT)
        # Built at load (off the event loop) when the vocabulary has USER_DEFINED tokens, else on first need.
        self._spellings = self._ordinary_short_pieces() if self._matched else None

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``; with ``special=False`` no special token comes out, whatever the text says."""
        tokens = self._tokenize(text, special)
        if special or self.special_ids.isdisjoint(tokens):
            return tokens
        plain: list[int] = []
        position = 0
        for match in self._matched.finditer(text) if self._matched else ():
            plain += self._plain_run(text[position : match.start()])
            plain += self._spell(match.group())
            position = match.end()
        return plain + self._plain_run(text[position:])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "ignore")

    def is_special(self, token: int) -> bool:
        return token in self.special_ids

    def piece(self, token: int, special: bool = False) -> bytes:
        if not special:
            if (known := self._pieces.get(token)) is None:
                known = self._pieces[token] = self._piece(token, False)
            return known
        return self._piece(token, True)

    def _piece(self, token: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[:n]

    def _tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8", "replace")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, special)
        if n < 0:
            raise EngineError(f"cannot tokenize a text of {len(data)} bytes")
        return list(buffer[:n])

    def _text(self, token: int) -> str:
        """The token's text as llama.cpp matches it in input (not its display piece)."""
        return (llama_cpp.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def _plain_run(self, text: str) -> list[int]:
        """Tokens of text holding no USER_DEFINED token's text; spelt out should a merge still reach a special id."""
        tokens = self._tokenize(text, False) if text else []
        return tokens if self.special_ids.isdisjoint(tokens) else self._spell(text)

    def _spell(self, text: str) -> list[int]:
        """``text`` as ordinary tokens of one character each, or of one byte where no such token exists."""
        if self._spellings is None:
            self._spellings = self._ordinary_short_pieces()
        tokens: list[int] = []
        for char in text:
            data = char.encode("utf-8", "replace")
            if data in self._spellings:
                tokens.append(self._spellings[data])
            elif all(bytes([b]) in self._spellings for b in data):
                tokens += [self._spellings[bytes([b])] for b in data]
            else:  # a vocabulary without byte tokens: its own reading of this one character, minus specials
                tokens += [t for t in self._tokenize(char, False) if t not in self.special_ids]
        return tokens

    def _ordinary_short_pieces(self) -> dict[bytes, int]:
        """Ordinary tokens whose piece is one byte or one whole character, by that piece."""
        spellings: dict[bytes, int] = {}
        ordinary = llama_cpp.LLAMA_TOKEN_ATTR_NORMAL | llama_cpp.LLAMA_TOKEN_ATTR_BYTE
        for token in range(llama_cpp.llama_vocab_n_tokens(self._vocab)):
            if token in self.special_ids or not llama_cpp.llama_vocab_get_attr(self._vocab, token) & ordinary:
                continue
            piece = self.piece(token)
            if len(piece) == 1 or _one_character(piece):
                spellings.setdefault(piece, token)
        return spellings


def _one_character(data: bytes) -> bool:
    try:
        return len(data.decode("utf-8")) == 1
    except UnicodeDecodeError:
        return False


def _literal_pattern(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of ``texts``, the longest at each place; built as a trie, so thousands of texts
    (Gemma's vocabulary has that many) cost hardly more per character than a few."""
    end = ""
    trie: dict[str, Any] = {}
    for text in texts:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[end] = {}

    def build(node: dict[str, Any]) -> str:
        branches = []
        for char, child in sorted(node.items()):
            if char == end:
                continue
            literal = re.escape(char)
            while len(child) == 1 and end not in child:  # a chain without branches is one literal
                [(char, child)] = child.items()
                literal += re.escape(char)
            branches.append(literal + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end in node else body

    return re.compile(build(trie)) if trie else None
