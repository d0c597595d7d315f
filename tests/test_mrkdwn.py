"""Slack's mrkdwn conversion of code: code written on a fence line, inline triple backticks, nested fences."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.slack.mrkdwn import escape, to_mrkdwn
from tests.test_replies import code_mask, markdown


def visible(text: str) -> str:
    """Without the invisible joiners the conversion inserts (after "@" of "@everyone", inside "```")."""
    return text.replace("\u2060", "").replace("\u200b", "")


def plain(mrkdwn: str) -> str:
    """The characters a Slack user reads: escapes undone, inserted joiners removed."""
    return visible(mrkdwn).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("```print(1)```", "`print(1)`"),
        ("Run ```ls -l``` first", "Run `ls -l` first"),
        ("```print(1)\nprint(2)\n```", "```\nprint(1)\nprint(2)\n```"),
        ("```var a=1;if(a<2&&b){go()}\n```\nafter", "```\nvar a=1;if(a&lt;2&amp;&amp;b){go()}\n```\nafter"),
        ("```python\nx = 1\n```", "```\nx = 1\n```"),
        ("``` js \nx\n```", "```\nx\n```"),
        ("~~~\n**not bold**\n~~~", "```\n**not bold**\n```"),
        ("````\n```python\ninner\n```\n````", "```\n`\u200b``python\ninner\n`\u200b``\n```"),
        ("```\na\n```python\nb\n```", "```\na\n`\u200b``python\nb\n```"),  # "```python" inside code closes nothing
        ("- step:\n    ```bash\n    ls\n    ```", "• step:\n```\n    ls\n```"),
        ("```\nstill streaming", "```\nstill streaming\n```"),
    ],
)
def test_code_is_converted(markdown: str, mrkdwn: str) -> None:
    assert to_mrkdwn(markdown) == mrkdwn


def test_code_on_the_fence_line_is_no_longer_dropped() -> None:
    minified = "function f(a){return a<1?0:f(a-1)+1};" * 60
    assert minified in plain(to_mrkdwn(f"Here it is:\n```{minified}\n```"))
    assert "print(1)" in to_mrkdwn("```print(1)```\nand more")
    assert to_mrkdwn("```print(1)```\n**bold**").endswith("\n*bold*")  # the line after is not code


code_line = st.text(st.characters(exclude_characters="`\n", exclude_categories=("Cs",)), max_size=60)
fence_code = code_line.filter(lambda code: not re.fullmatch(r"\s*[A-Za-z0-9_+#.-]*\s*", code))  # not a language
prose = st.text(st.characters(exclude_characters="`~"), max_size=40)
words = st.text(st.characters(exclude_characters="`~*_[]\n"), max_size=40)  # no markup around the code


@settings(max_examples=150, deadline=None)
@given(before=prose, first=fence_code, lines=st.lists(code_line, max_size=5), closed=st.booleans(), after=prose)
def test_no_code_written_on_or_after_a_fence_line_is_lost(
    before: str, first: str, lines: list[str], closed: bool, after: str
) -> None:
    markdown = f"{before}\n```{first}\n" + "\n".join(lines) + ("\n```\n" + after if closed else "")
    shown = plain(to_mrkdwn(markdown))
    for line in [first, *lines]:
        assert visible(line) in shown


@settings(max_examples=150, deadline=None)
@given(before=words, code=code_line.filter(str.strip), after=words)
def test_inline_triple_backticks_on_one_line_are_code(before: str, code: str, after: str) -> None:
    shown = to_mrkdwn(f"{before}```{code}```{after}\n**next line**")
    assert f"`{escape(code)}`" in shown
    assert "```" not in shown and shown.endswith("\n*next line*")  # no block swallows the rest of the reply


@settings(max_examples=100, deadline=None)
@given(text=markdown())
def test_no_code_in_random_markdown_is_lost(text: str) -> None:
    shown, mask = plain(to_mrkdwn(text)), code_mask(text)
    start = 0
    for line in text.split("\n"):
        code = "".join(char for char, is_code in zip(line, mask[start:], strict=False) if is_code)
        assert visible(code) in shown, code
        start += len(line) + 1
