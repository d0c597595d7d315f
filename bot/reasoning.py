"""Reasoning models: tells a reply's thinking (``<think>…</think>``) apart from its answer while it streams."""

from __future__ import annotations

__all__ = ["OPEN", "CLOSE", "ReasoningSplitter"]

OPEN, CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    """Feed it the model's text as it streams; `reasoning` and `answer` hold the two parts so far.

    A reply that opens with ``<think>`` (after optional whitespace), or whose prompt already opened one
    (``inside=True``: templates such as DeepSeek-R1's end the generation prompt with it), reasons until
    ``</think>``; everything after it is the answer. A tag split across deltas is held back until it is whole.
    """

    def __init__(self, *, inside: bool = False) -> None:
        self.reasoning = ""
        self.thinking = inside
        self._reasoned = inside
        self._undecided = not inside  # at the start: a reply may still open with <think>
        self._held = ""
        self._answer = ""

    @property
    def answer(self) -> str:
        """The reply without its reasoning (and without the blank lines that follow ``</think>``)."""
        return self._answer.lstrip() if self._reasoned else self._answer

    def feed(self, delta: str) -> None:
        text = self._held + delta
        self._held = ""
        if self._undecided:
            stripped = text.lstrip()
            if stripped.startswith(OPEN):
                self._undecided, self.thinking, self._reasoned = False, True, True
                text = stripped[len(OPEN) :]
            elif OPEN.startswith(stripped):  # "", "<", "<thi": not decided yet
                self._held = text
                return
            else:
                self._undecided = False
        if self.thinking:
            end = text.find(CLOSE)
            if end == -1:
                keep = _partial_tag_length(text, CLOSE)
                self.reasoning += text[: len(text) - keep]
                self._held = text[len(text) - keep :]
                return
            self.reasoning += text[:end]
            self.thinking = False
            text = text[end + len(CLOSE) :]
        self._answer += text

    def finish(self) -> None:
        """The reply ended: whatever was held back belongs to the part it was in."""
        if self.thinking:
            self.reasoning += self._held
        else:
            self._answer += self._held
        self._held = ""


def _partial_tag_length(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
