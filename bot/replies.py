"""The reply text → the messages that show it on a platform, and the one definition of a code fence.

A reply is stored and fed back exactly as the model wrote it; what a platform shows is derived from it by
`split_reply`, a pure function of (text, limit, measure). Adapters use `opening_fence` / `closes_fence`
so that their rendering (Slack's mrkdwn) and the splitter agree on where code blocks are.

Over 400 lines because splitting a reply is one algorithm (fences, lists, tables, limits) whose parts
are only meaningful together.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Piece", "Fence", "split_reply", "opening_fence", "closes_fence", "MIN_LIMIT"]

MIN_LIMIT = 64
"""The smallest limit for which every piece is guaranteed to fit (below it pieces still always shrink the rest)."""
FENCE_MAX = 10
"""A longer run of backticks or tildes is a divider, not a fence: it keeps the fence added at a cut short."""
LANGUAGE_MAX = 20

# A fence line may be indented (a code block inside a list item); Discord too ignores indentation.
_FENCE_LINE = re.compile(r"[ \t]*(`{3,}|~{3,})")
# After a cut, what follows becomes a line of its own: it must not become a fence line there (in a block,
# any run of three could close the reopened block).
_FENCE_AHEAD = re.compile(rf"`{{3,{FENCE_MAX}}}(?!`)|~{{3,{FENCE_MAX}}}(?!~)")
_FENCE_AHEAD_IN_BLOCK = re.compile(r"```|~~~")
_BLANKS = re.compile(r"[ \t]{2,}")
_FLAGS = re.compile("[\U0001f1e6-\U0001f1ff]+")
_LANGUAGE = re.compile(rf"[A-Za-z0-9_+#.-]{{1,{LANGUAGE_MAX}}}")
# Candidate cuts that turn out not to fit (the closing fence added, or a measure that is not additive)
# before bisecting for one that does.
_MAX_MISSES = 16
_SECANT_STEPS = 6


@dataclass(frozen=True)
class Fence:
    """An opening code-fence line.

    ``marker`` is the run of backticks or tildes; ``language`` the lone word after it (``python``), if any;
    ``code`` whatever else follows the marker, verbatim: code written on the fence line (```` ```print(1) ````).
    """

    marker: str
    language: str = ""
    code: str = ""


def opening_fence(line: str) -> Fence | None:
    """The fence ``line`` opens, or None: not a fence, or an inline ```` ```x``` ```` closed on the same line."""
    match = _FENCE_LINE.match(line)
    if match is None or len(match.group(1)) > FENCE_MAX:
        return None
    marker, info = match.group(1), line[match.end() :]
    if marker[0] == "`" and re.search(rf"(?<!`)`{{{len(marker)}}}(?!`)", info):
        return None  # a code span: closed by a run of the same length
    word = info.strip()
    if not word or _LANGUAGE.fullmatch(word):
        return Fence(marker, word)
    return Fence(marker, "", info)


def closes_fence(line: str, fence: Fence) -> bool:
    """Whether ``line`` closes the block ``fence`` opened: the same character, at least as many, nothing after."""
    match = _FENCE_LINE.match(line)
    return (
        match is not None
        and match.group(1)[0] == fence.marker[0]
        and len(match.group(1)) >= len(fence.marker)
        and not line[match.end() :].strip()
    )


@dataclass(frozen=True)
class Piece:
    """One platform message of a reply: an exact slice of the reply text, with fence lines added at cuts."""

    body: str
    reopen: str = ""  # e.g. "```python\n" when a code block continues from the previous piece
    close: str = ""  # e.g. "\n```" when the code block continues in the next piece

    @property
    def text(self) -> str:
        """What the platform message shows."""
        return self.reopen + self.body + self.close


def split_reply(text: str, limit: int, measure: Callable[[str], int] = len) -> list[Piece]:
    """The messages a reply needs on a platform whose messages hold ``limit`` as ``measure`` counts.

    The bodies joined give back ``text`` exactly and each is non-empty (but for an empty text), so every cut
    shrinks what remains; from `MIN_LIMIT` up, each piece's ``text`` fits. A cut falls after a paragraph, line
    or word break when one is near enough, else between grapheme clusters. A cut inside a code block closes it
    and reopens it (marker and language only) in the next piece, and no cut makes or breaks a fence line (a
    message starting with "~~~" cut from "a ~~~ b") unless no other cut fits: within a run of backticks or of
    blanks, or a one-line ```` ```code``` ````, longer than a message.

    Stable while streaming: if ``measure`` never shrinks as text is appended (``len`` does not), the pieces of
    ``text`` but its last are also the first pieces of any ``text + more``, unless ``text`` ends in an unfinished
    line that starts with ```` ` ```` or ``~`` after indentation, or ends in one of them: a fence may be being
    written, which moves the cut before it. A measure that converts Markdown (Slack's) can
    shrink: ``**bold**`` counts less than ``**bold*``, so a cut may move a little when such a construct ends.
    """
    if measure(text) <= limit or not text:
        return [Piece(text)]
    return _Splitter(text, limit, measure).pieces()


@dataclass(frozen=True)
class _Block:
    content: int  # a cut after this index is inside the block (the end of the language, or of the marker)
    end: int  # where the closing marker starts; a cut up to it is inside the block
    fence: Fence


class _Line(NamedTuple):
    """A line that starts with ` or ~: cut short, it could become or stop being a fence line."""

    start: int
    end: int
    role: str  # "text", "opening", "code" (inside a block) or "closing"
    fence: Fence | None  # the fence it opens, or the one of the block it is in
    run_start: int  # its run of backticks or tildes
    run_end: int
    blanks_end: int  # the end of the blanks after the run
    keeps_from: int  # an opening line, an inline ```x```: a cut after the run keeps the role from here on


class _Splitter:
    def __init__(self, text: str, limit: int, measure: Callable[[str], int]) -> None:
        self.text = text
        self.limit = limit
        self.measure = measure
        self.blocks: list[_Block] = []
        # Ranges [start, end) of fence lines, a cut in which would split them between pieces: avoided unless
        # nothing else fits (a fence line followed by thousands of spaces).
        self.zones: list[tuple[int, int]] = []
        self.lines: list[_Line] = []
        self._scan()
        self._block_starts = [block.content for block in self.blocks]
        self._zone_starts = [start for start, _ in self.zones]
        self._line_starts = [line.start for line in self.lines]
        self._flag_runs = [match.start() for match in _FLAGS.finditer(text)]  # runs of regional indicators
        blanks = [match.span() for match in _BLANKS.finditer(text)]
        self._blank_starts, self._blank_ends = [start for start, _ in blanks], [end for _, end in blanks]

    def _scan(self) -> None:
        fence: Fence | None = None
        content = start = 0
        for line in self.text.split("\n"):
            end = start + len(line)
            indent = len(line) - len(line.lstrip(" \t"))
            role = ""
            if fence is None:
                fence = opening_fence(line)
                role = "text" if fence is None else "opening"
                if fence is not None:
                    after_marker = start + indent + len(fence.marker)
                    if fence.code:  # code from the marker on: a cut after one character of it is fine
                        content, zone_end = after_marker, after_marker + 1
                    else:  # a fence and a language: a message needs the line, its newline and some code
                        content, zone_end = after_marker + len(line[after_marker - start :].rstrip()), end + 2
                    self.zones.append((start + indent + 1, zone_end))
            elif closes_fence(line, fence):
                role = "closing"
                self.blocks.append(_Block(content, start + indent, fence))
                self.zones.append((start + indent, end))
            else:
                role = "code"
            if line[indent : indent + 1] in ("`", "~"):
                self.lines.append(_line(self.text, start, end, indent, role, fence))
            if role == "closing":
                fence = None
            start = end + 1
        if fence is not None:
            self.blocks.append(_Block(content, len(self.text) + 1, fence))

    def pieces(self) -> list[Piece]:
        pieces: list[Piece] = []
        pos, reopen = 0, ""
        while True:
            fit_end = self._fit(pos, reopen)
            cut = fit_end if fit_end == len(self.text) else self._cut(pos, reopen, fit_end)
            if cut >= len(self.text):
                pieces.append(Piece(self.text[pos:], reopen))
                return pieces
            block = self._block_at(cut)
            reopen_next = "" if block is None else f"{block.fence.marker}{block.fence.language}\n"
            pieces.append(Piece(self.text[pos:cut], reopen, self._close(cut, block)))
            pos, reopen = cut, reopen_next

    def _fit(self, pos: int, reopen: str) -> int:
        """The last end at which ``reopen + text[pos:end]`` fits (``len(text)``: the rest is the last piece)."""
        text, n, limit = self.text, len(self.text), self.limit

        def value(end: int) -> int:
            return self.measure(reopen + text[pos:end])

        lo, v_lo = pos, value(pos)
        if v_lo > limit:
            return pos
        hi, v_hi = -1, 0
        step = max(1, limit - v_lo + 1)
        while hi < 0:  # bracket the boundary, doubling the step while it fits
            end = min(n, lo + step)
            v = value(end)
            if v > limit:
                hi, v_hi = end, v
            elif end == n:
                return n
            else:
                lo, v_lo, step = end, v, step * 2
        # Secant steps through the last two probes (the measure is near proportional to the length) land next
        # to the boundary in a few measures; bisection takes over if they have not.
        a, v_a, b, v_b = lo, v_lo, hi, v_hi
        for step in itertools.count():
            if hi - lo <= 1:
                break
            guess = (lo + hi) // 2
            if step < _SECANT_STEPS and v_b != v_a:
                guess = min(max(b + (limit - v_b) * (b - a) // (v_b - v_a), lo + 1), hi - 1)
            v = value(guess)
            if v <= limit:
                lo = guess
            else:
                hi = guess
            a, v_a, b, v_b = b, v_b, guess, v
        return lo

    def _cut(self, pos: int, reopen: str, fit_end: int) -> int:
        """Where the piece starting at ``pos`` ends: the best candidate that fits."""
        misses = 0
        for cut in self._candidates(pos, fit_end):
            if self._fits(pos, reopen, cut):
                return cut
            misses += 1
            if misses == _MAX_MISSES:
                break
        lo, hi = pos, fit_end + 1  # any cut that fits, by bisection
        while hi - lo > 1:
            middle = (lo + hi) // 2
            if self._fits(pos, reopen, middle):
                lo = middle
            else:
                hi = middle
        if lo > pos:
            return lo
        cut = pos + 1  # nothing fits (a limit below MIN_LIMIT): one grapheme cluster, to make progress
        while cut < len(self.text) and self._joins(cut) and cut - pos < 64:
            cut += 1
        return cut

    def _candidates(self, pos: int, fit_end: int) -> Iterator[int]:
        """Cuts in (pos, fit_end], best first: after a paragraph, line or word break, then between grapheme
        clusters, then (when nothing else fits) anywhere that makes or breaks no fence line."""
        text, window = self.text, fit_end - pos
        for separator, floor in (("\n\n", pos + window // 2), ("\n", pos + window // 3), (" ", pos)):
            at = text.rfind(separator, pos, fit_end)
            while at != -1 and at + len(separator) > floor:
                cut = at + len(separator)
                if cut > pos and self._clean(cut):
                    yield cut
                at = text.rfind(separator, pos, at + len(separator) - 1)
        for last_resort in (False, True):
            cut = fit_end
            while cut > pos:
                if self._keeps_fences(cut, last_resort=True) if last_resort else self._clean(cut):
                    yield cut
                    cut -= 1
                else:
                    cut = self._skip(cut, last_resort=last_resort)
        if fit_end > pos:
            yield fit_end

    def _skip(self, cut: int, *, last_resort: bool) -> int:
        """The next cut below a refused one worth trying: past the rest of a run refused for the same reason
        (blanks, a fence line, an inline span), so a window with no good cut costs no more than its length."""
        text = self.text
        line = self._line_at(cut)
        target = cut - 1
        if line is not None and line.role == "opening" and line.run_start < cut < line.keeps_from:
            target = line.run_start
        elif line is not None and line.role == "text" and line.run_end < cut < line.keeps_from:
            target = line.run_end
        elif text[cut] in " \t" and not (last_resort and line is not None and cut <= line.run_start):
            index = bisect_right(self._blank_starts, cut) - 1
            if index >= 0 and cut < self._blank_ends[index]:
                target = self._blank_starts[index]
        elif not last_resort:
            index = bisect_right(self._zone_starts, cut) - 1
            if index >= 0 and cut < self.zones[index][1]:
                target = self.zones[index][0] - 1
        return target if target < cut else cut - 1

    def _line_at(self, cut: int) -> _Line | None:
        """The line starting with ` or ~ that a cut at ``cut`` falls in (after its start), if any."""
        index = bisect_right(self._line_starts, cut) - 1
        return self.lines[index] if index >= 0 and cut <= self.lines[index].end else None

    def _fits(self, pos: int, reopen: str, cut: int) -> bool:
        return self.measure(reopen + self.text[pos:cut] + self._close(cut, self._block_at(cut))) <= self.limit

    def _close(self, cut: int, block: _Block | None) -> str:
        if block is None:
            return ""
        return block.fence.marker if self.text[cut - 1] == "\n" else "\n" + block.fence.marker

    def _block_at(self, cut: int) -> _Block | None:
        """The code block a cut at ``cut`` falls inside (so the pieces on both sides need a fence), if any."""
        index = bisect_right(self._block_starts, cut - 1) - 1
        if index >= 0 and cut <= self.blocks[index].end:
            return self.blocks[index]
        return None

    def _clean(self, cut: int) -> bool:
        """A cut that splits no grapheme cluster and no fence line, and makes or breaks no fence line."""
        if self._joins(cut):
            return False
        index = bisect_right(self._zone_starts, cut) - 1
        if index >= 0 and cut < self.zones[index][1]:
            return False
        return self._keeps_fences(cut)

    def _keeps_fences(self, cut: int, *, last_resort: bool = False) -> bool:
        """Whether a cut leaves each message's code blocks where the text has them.

        Mid-line, what follows the cut starts the next message's first line: "a ~~~ b" must not turn into a
        fence there. And the first part of the line must keep the role the whole line has in the text. As a
        last resort (a fence indented past a whole message), a cut may fall in the indentation of a fence line."""
        text = self.text
        if text[cut - 1] == "\n":
            return True
        line = self._line_at(cut)
        if last_resort and line is not None and line.role in ("opening", "closing") and cut <= line.run_start:
            return True  # the next message starts with that fence line
        if text[cut] in " \t":
            return False  # a cut goes after blanks, never before: what follows it must not hang on them
        if (_FENCE_AHEAD_IN_BLOCK if self._block_at(cut) else _FENCE_AHEAD).match(text, cut):
            return False
        return line is None or self._keeps_role(line, cut)

    def _keeps_role(self, line: _Line, cut: int) -> bool:
        """Whether the line cut short at ``cut`` plays the part the whole line plays (`opening_fence`,
        `closes_fence` on the head, computed from the line's run instead of parsing it again)."""
        run = min(cut, line.run_end) - line.run_start  # how much of the run the head holds
        if line.role == "text":  # must open no block
            if cut <= line.run_end or not 3 <= line.run_end - line.run_start <= FENCE_MAX:
                return not 3 <= run <= FENCE_MAX
            return cut >= line.keeps_from  # "```a b```": only once the closing run is in the head
        assert line.fence is not None
        marker = line.fence.marker
        if line.role == "code":  # must not close its block: "``` x" cut after "```"
            return not (self.text[line.run_start] == marker[0] and run >= len(marker) and cut <= line.blanks_end)
        if line.role == "closing":
            return run >= len(marker)
        # An opening line: "```python" keeps its language, "```var a=1" stays code (not language "var"); a run
        # of exactly the marker's length cut out of a longer one would close it as inline code.
        closing_at = cut - len(marker)  # where a run of the marker's length ending at the cut would start
        return cut >= line.keeps_from and not (
            marker[0] == "`"
            and closing_at > line.run_end
            and self.text[closing_at:cut] == marker
            and self.text[closing_at - 1] != "`"
        )

    def _joins(self, i: int) -> bool:
        """Whether ``text[i]`` belongs to the grapheme cluster of ``text[i - 1]`` (the common cases of UAX #29)."""
        text = self.text
        if i <= 0 or i >= len(text):
            return False
        before, char = text[i - 1], text[i]
        if before == _ZWJ or (before == "\r" and char == "\n"):
            return True
        code = ord(char)
        if (
            char in "\u200c\u200d"
            or 0xFE00 <= code <= 0xFE0F
            or 0x1F3FB <= code <= 0x1F3FF
            or 0xE0020 <= code <= 0xE007F
            or 0xE0100 <= code <= 0xE01EF
        ):
            return True  # joiners, variation selectors, skin tones, tag sequences (subdivision flags)
        if unicodedata.category(char) in ("Mn", "Mc", "Me"):
            return True
        if _regional(char) and _regional(before):  # flags are pairs of regional indicators
            run_start = self._flag_runs[bisect_right(self._flag_runs, i - 1) - 1]
            return (i - run_start) % 2 == 1
        return False


def _line(text: str, start: int, end: int, indent: int, role: str, fence: Fence | None) -> _Line:
    """What `_Splitter._keeps_role` needs to know of a line that starts with ` or ~."""
    run_start = start + indent
    run_end = run_start + 1
    while run_end < end and text[run_end] == text[run_start]:
        run_end += 1
    blanks_end = run_end
    while blanks_end < end and text[blanks_end].isspace():
        blanks_end += 1
    keeps_from = end + 1
    if role == "opening" and fence is not None and not fence.code:
        keeps_from = run_end + len(text[run_end:end].rstrip())  # the whole language
    elif role == "opening":
        word = blanks_end  # the head reads as code once it is no lone word of a language
        while word < end and word - blanks_end <= LANGUAGE_MAX and _LANGUAGE.fullmatch(text[word]):
            word += 1
        if word - blanks_end > LANGUAGE_MAX:
            keeps_from = word
        else:
            while word < end and text[word].isspace():
                word += 1
            keeps_from = word + 1
    elif role == "text" and 3 <= run_end - run_start <= FENCE_MAX:  # an inline ```x```: from its closing run
        closing = re.compile(rf"(?<!`)`{{{run_end - run_start}}}(?!`)").search(text, run_end, end)
        keeps_from = end + 1 if closing is None else closing.end()
    return _Line(start, end, role, fence, run_start, run_end, blanks_end, keeps_from)


_ZWJ = "\u200d"


def _regional(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF
