"""The reply text → platform messages (`split_reply`): properties over random Markdown, and the issue's cases."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapters.slack.mrkdwn import to_mrkdwn
from bot.replies import FENCE_MAX, LANGUAGE_MAX, MIN_LIMIT, Fence, Piece, closes_fence, opening_fence, split_reply

Measure = Callable[[str], int]


def slack_measure(text: str) -> int:
    return len(to_mrkdwn(text))


PLATFORMS = {"discord": (len, 2000), "slack": (slack_measure, 3500), "web": (len, sys.maxsize)}
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# ---------------------------------------------------------------- random Markdown, as a model might write it

WORDS = [
    "word",
    "reply",
    "naïve",
    "日本語の文章です。",
    "中文字符",
    "한국어",  # prose, CJK
    "😀",
    "👩‍👩‍👧‍👦",
    "🇯🇵🇫🇷",
    "👍🏽",
    "❤️",
    "1️⃣",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",  # emoji: ZWJ, flags, skin tone, variation selectors
    "e\u0301",
    "a\u0308\u0301",
    "Z̷̢̛a̸l̵g̴o",  # combining marks
    "a<b",
    "x&y",
    "<!here>",
    "<@U123>",
    "@everyone",
    "&amp;",  # what Slack escapes
    "**bold**",
    "_it_",
    "~~gone~~",
    "`code`",
    "[link](https://example.com)",
    "<https://a.example>",
    "```print(1)```",
    "```x``` and",
    "#",
    "-",
    ">",
    "`",
    "``",
    "~~~",
    "\t",
    "1.",
]
UNITS = ["x", "日本", "👩‍👩‍👧", "e\u0301", "&<>", "ab_c", "🇯🇵", "=", "var a=1;", "`", "~", " ", "\u200d"]

word = st.sampled_from(WORDS) | st.text(min_size=1, max_size=6)
paragraph = st.lists(word, min_size=1, max_size=60).map(" ".join)
long_line = st.builds(lambda unit, count: unit * count, st.sampled_from(UNITS), st.integers(1, 1500))
big_paragraph = st.builds(lambda text, count: " ".join([text] * count), paragraph, st.integers(1, 40))


@st.composite
def code_blocks(draw: st.DrawFn) -> str:
    """A fenced code block: ``` or ~~~ (long or indented), with a language, code or nothing on the opening line."""
    marker = draw(st.sampled_from(["```", "```", "````", "~~~", "`" * FENCE_MAX]))
    indent = draw(st.sampled_from(["", "", "  ", "    ", "\t"]))
    info = draw(
        st.sampled_from(["", "python", " js ", "c++", "objective-c", "   "])
        | long_line
        | paragraph
        | st.text(max_size=30)
    )
    lines = draw(
        st.lists(paragraph | long_line | st.sampled_from(["", "```python", "  ```", "~~~", "````"]), max_size=20)
    )
    text = indent + marker + info + "\n" + "\n".join(lines)
    if draw(st.booleans()):
        text += "\n" + indent + marker + draw(st.sampled_from(["", "`", "  "]))
    return text


inline_code = st.builds(
    lambda code, after: f"```{code}```{after}",
    st.text(st.characters(exclude_characters="`\n"), min_size=1, max_size=40),
    paragraph,
)
line_markup = st.builds(lambda mark, text: mark + text, st.sampled_from(["# ", "- ", "  * ", "> ", "1. "]), paragraph)
fence_soup = st.text(alphabet=" \t\n`~ax", max_size=200)  # dense in what makes and breaks fence lines
block = (
    paragraph
    | big_paragraph
    | long_line
    | code_blocks()
    | inline_code
    | line_markup
    | fence_soup
    | st.text(max_size=40)
)


@st.composite
def markdown(draw: st.DrawFn) -> str:
    blocks = draw(st.lists(block, max_size=10))
    separators = draw(
        st.lists(st.sampled_from(["\n\n", "\n", " ", "", "\r\n"]), min_size=len(blocks), max_size=len(blocks))
    )
    return "".join(b + s for b, s in zip(blocks, separators, strict=True))


# ---------------------------------------------------------------- the properties


def open_fence(text: str) -> Fence | None:
    """The fence left open at the end of ``text``, read by the splitter's own definition."""
    fence: Fence | None = None
    for line in text.split("\n"):
        if fence is None:
            fence = opening_fence(line)
        elif closes_fence(line, fence):
            fence = None
    return fence


def code_mask(text: str) -> list[bool]:
    """For each character: is it code (inside a fenced block, or written on its opening line)?"""
    mask: list[bool] = []
    fence: Fence | None = None
    for line in text.split("\n"):
        if fence is None:
            fence = opening_fence(line)
            code = len(fence.code) if fence is not None else 0
            mask += [False] * (len(line) - code) + [True] * code + [False]
        elif closes_fence(line, fence):
            fence = None
            mask += [False] * (len(line) + 1)
        else:
            mask += [True] * (len(line) + 1)
    return mask[: len(text)]


def assert_code_kept(text: str, pieces: list[Piece]) -> None:
    """Each message leaves no code block open and shows as code exactly what is code in the text."""
    for piece in pieces[:-1]:
        assert open_fence(piece.text) is None, f"a message leaves a code block open: {piece!r}"
    in_text, start = code_mask(text), 0
    for piece in pieces:
        in_piece = code_mask(piece.text)[len(piece.reopen) :]
        for i, char in enumerate(piece.body):
            assert char.isspace() or in_piece[i] == in_text[start + i], f"code changed at {i} in {piece!r}"
        start += len(piece.body)


def long_inline_span(text: str, limit: int) -> bool:
    """Whether a line opens with a ```code``` span that might not fit a message whole (Slack's escaping: x5)."""
    for line in text.split("\n"):
        opening = re.match(rf"[ \t]*(`{{3,{FENCE_MAX}}})(?!`)", line)
        if opening and opening_fence(line) is None:
            closing = re.compile(rf"(?<!`){opening.group(1)}(?!`)").search(line, opening.end())
            if closing is not None and 5 * closing.end() > limit:
                return True
    return False


def check(text: str, limit: int, measure: Measure) -> list[Piece]:
    pieces = split_reply(text, limit, measure)
    assert pieces, "always at least one piece"
    assert "".join(p.body for p in pieces) == text, "nothing lost, nothing doubled"
    if measure(text) <= limit:
        assert pieces == [Piece(text)]
    assert all(p.body for p in pieces) or pieces == [Piece("")], "every cut shrinks what remains"
    assert pieces[0].reopen == "" and pieces[-1].close == ""
    for before, after in zip(pieces, pieces[1:], strict=False):
        assert bool(before.close) == bool(after.reopen)
        if after.reopen:
            # Only the fence and its language, never the rest of a long opening line.
            assert re.fullmatch(
                rf"(`{{3,{FENCE_MAX}}}|~{{3,{FENCE_MAX}}})[A-Za-z0-9_+#.-]{{0,{LANGUAGE_MAX}}}\n", after.reopen
            ), after.reopen
            marker = after.reopen[: len(after.reopen) - len(after.reopen.lstrip("`~"))]
            assert before.close == (marker if before.body.endswith("\n") else "\n" + marker)
    if limit >= MIN_LIMIT:
        for piece in pieces:
            assert measure(piece.text) <= limit, (len(piece.text), piece)
    # Code blocks are kept in every message, unless no cut can keep them: within a run of backticks longer
    # than a fence (in a code block any part of it would close the reopened block), of blanks (a message of
    # nothing else leaves no cut near a fence), or a one-line ```code```, that is longer than a message holds.
    long_runs = rf"`{{{FENCE_MAX + 1}}}|~{{{FENCE_MAX + 1}}}|[ \t]{{16}}"
    if limit >= MIN_LIMIT and not re.search(long_runs, text) and not long_inline_span(text, limit):
        assert_code_kept(text, pieces)
    return pieces


@pytest.mark.parametrize("platform", PLATFORMS)
@PROPERTY
@given(text=markdown())
def test_pieces_give_back_the_text_and_fit_the_platform(platform: str, text: str) -> None:
    measure, limit = PLATFORMS[platform]
    pieces = check(text, limit, measure)
    assert split_reply(text, limit, measure) == pieces, "deterministic"
    if platform == "web":
        assert pieces == [Piece(text)]


@pytest.mark.parametrize("measure", [len, slack_measure], ids=["len", "slack"])
@PROPERTY
@given(text=markdown(), limit=st.integers(MIN_LIMIT, 400))
def test_pieces_fit_small_limits(measure: Measure, text: str, limit: int) -> None:
    check(text, limit, measure)


@pytest.mark.parametrize("measure", [len, slack_measure], ids=["len", "slack"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=markdown(), limit=st.integers(-3, MIN_LIMIT - 1))
def test_below_the_minimum_limit_every_cut_still_shrinks_the_rest(measure: Measure, text: str, limit: int) -> None:
    check(text, limit, measure)


def may_become_a_fence(text: str) -> bool:
    """What `split_reply` promises no stability for: an unfinished fence line, or a fence marker being written."""
    unfinished = text.rsplit("\n", 1)[-1].lstrip(" \t")
    return unfinished.startswith(("`", "~")) or text.endswith(("`", "~"))


@PROPERTY
@given(text=markdown(), more=markdown(), limit=st.sampled_from([2000, 97]) | st.integers(MIN_LIMIT, 400))
def test_pieces_before_the_last_are_stable_while_the_text_grows(text: str, more: str, limit: int) -> None:
    shorter = split_reply(text, limit)
    assume(not may_become_a_fence(text))
    longer = split_reply(text + more, limit)
    assert longer[: len(shorter) - 1] == shorter[:-1]


@PROPERTY
@given(text=markdown(), cut=st.integers(0, 10_000), limit=st.integers(MIN_LIMIT, 400))
def test_streaming_a_reply_never_needs_fewer_messages_later(text: str, cut: int, limit: int) -> None:
    shorter = split_reply(text[:cut], limit)
    assume(not may_become_a_fence(text[:cut]))
    assert len(shorter) <= len(split_reply(text, limit))


@pytest.mark.parametrize("more", ["```py\nx\n```", "word\n\n"])
def test_trailing_blanks_do_not_move_a_cut_whatever_follows(more: str) -> None:
    for text in ("a" * 63 + "  ", "word\n\n`\n\nword\n\n" + " " * 50):  # found by hypothesis
        assert split_reply(text, 64)[:-1] == split_reply(text + more, 64)[:-1]


# ---------------------------------------------------------------- the cases from the issue, and the cut rules


def test_empty_reply_is_one_empty_piece() -> None:
    assert split_reply("", 2000) == [Piece("")]
    assert split_reply("", 0) == [Piece("")]
    assert split_reply("short", 2000) == [Piece("short")]


@pytest.mark.parametrize("opening", ["```", "```js", "~~~"])
def test_a_long_line_after_a_fence_needs_a_bounded_number_of_pieces(opening: str) -> None:
    # The old split copied the whole opening line into every next message and never ended.
    minified = "var a=1;function f(b){return b*2}" * 75  # ~2,500 characters on one line
    for text in (f"Here:\n{opening}{minified}\n```\nDone.", f"Here:\n{opening}\n{minified}\n```\nDone."):
        pieces = check(text, 2000, len)
        assert len(pieces) == 2
        assert pieces[1].reopen in ("```\n", "```js\n", "~~~\n")


def test_a_reopened_fence_carries_only_the_fence_and_language() -> None:
    code = "\n".join(f"print({i})" for i in range(400))
    pieces = check(f"Look:\n```python\n{code}\n```\nDone.", 500, len)
    assert len(pieces) > 4
    assert all(p.reopen == "```python\n" for p in pieces[1:])
    assert all(p.close == "```" for p in pieces[:-1])  # each cut falls after a whole line of code
    assert pieces[-1].text.endswith("```\nDone.")


def test_inline_triple_backticks_are_not_an_open_fence() -> None:
    text = "Try ```print(1)``` or:\n```print(2)```\n" + "and then some more words " * 200
    pieces = check(text, 2000, len)
    assert len(pieces) == 3
    assert all(p.reopen == p.close == "" for p in pieces)


WORDS6 = "word\n\n" * 6


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("say a ~~~ b " * 40, 64),  # a cut before "~~~" would start a message with a fence
        (WORDS6 + "```\n``` " + "x" * 53 + "\n\nword\n\n", 64),  # cut after "```", a code line would close the block
        ("```var " + "a=1;" * 40 + "\n```\nafter", 64),  # cut after "```var", the code would read as language "var"
        ("word\n\n    ````" + " " * 52 + "\n````\n\nword\n\n", 64),  # a cut at the closing fence of an empty block
        ("word\n\n" + " " * 62 + "```\n\nword\n\n", 64),  # a fence indented by more than a message holds
        (WORDS6 + "`" * 112 + "\nword\n```\n\n" + "x" * 90 + "\n\n", 109),  # a divider, not a fence
        (WORDS6 + "```\n" + "`" * 112 + "\nword\n\n" + "x" * 94 + "\n\n", 109),  # a closing line of 112 backticks
    ],
)
def test_no_cut_makes_or_breaks_a_fence_line(text: str, limit: int) -> None:
    # Cases hypothesis found; each failed before the rule it names.
    assert_code_kept(text, check(text, limit, len))


def test_a_cut_prefers_a_paragraph_then_a_line_then_a_word() -> None:
    assert [p.body for p in split_reply("a" * 60 + "\n\n" + "b" * 60, 100)] == ["a" * 60 + "\n\n", "b" * 60]
    assert [p.body for p in split_reply("a" * 60 + "\n" + "b" * 60, 100)] == ["a" * 60 + "\n", "b" * 60]
    assert split_reply("aaa " * 30, 50)[0].body == "aaa " * 12
    assert [p.body for p in split_reply("x" * 250, 100)] == ["x" * 100, "x" * 100, "x" * 50]


@pytest.mark.parametrize("cluster", ["👩‍👩‍👧‍👦", "e\u0301", "🇯🇵", "👍🏽", "❤️", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "\r\n"])
def test_a_hard_cut_keeps_grapheme_clusters_whole(cluster: str) -> None:
    for limit in (MIN_LIMIT, 101, 2000):
        pieces = check(cluster * (3 * limit // len(cluster) + 1), limit, len)
        assert len(pieces) > 1
        assert all(len(p.body) % len(cluster) == 0 for p in pieces), [len(p.body) for p in pieces]


def test_slack_pieces_fit_after_escaping() -> None:
    text = "a < b && c > d " * 1000
    pieces = check(text, 3500, slack_measure)
    assert len(pieces) >= 4  # escaping makes each piece hold far fewer characters than 3500
    assert all(len(to_mrkdwn(p.text)) <= 3500 for p in pieces)


CODE = "\n".join(f"    total += values[{i}] & mask  # <{i}>" for i in range(40))
SECTION = f"## Part\n\nSome **bold** text with a [link](https://example.com) & more.\n\n```python\n{CODE}\n```\n\n"
MARKUP = [
    "word",
    "naïve",
    "日本語",
    "👩‍👩‍👧‍👦",
    "a<b",
    "x&y",
    "**b**",
    "`c`",
    "e\u0301",
    "_i_",
    "[l](https://x.y)",
    "~~s~~",
]
PROSE = " ".join(MARKUP[i * 7 % len(MARKUP)] + ("\n" if i % 13 == 0 else "") for i in range(30_000))


@pytest.mark.parametrize("text", [SECTION * 60, PROSE], ids=["code", "markup"])
def test_100_kb_with_slacks_measure_is_fast(text: str) -> None:
    text = text[:100_000]
    measured = 0

    def counting(piece: str) -> int:
        nonlocal measured
        measured += len(piece)
        return slack_measure(piece)

    started = time.perf_counter()
    pieces = split_reply(text, 3500, counting)
    elapsed = time.perf_counter() - started
    assert "".join(p.body for p in pieces) == text and len(pieces) >= 29
    assert measured < 20 * len(text), measured  # a few measures of one message per piece, never of the rest
    assert elapsed < 1.0, elapsed
