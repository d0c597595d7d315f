"""ReasoningSplitter: thinking told apart from the answer however the model's text is cut into deltas."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.reasoning import ReasoningSplitter

words = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def split(text: str, cuts: list[int], *, inside: bool = False) -> ReasoningSplitter:
    splitter = ReasoningSplitter(inside=inside)
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for a, b in zip(points, points[1:]):
        splitter.feed(text[a:b])
    splitter.finish()
    return splitter


def test_a_think_block_is_reasoning_and_the_rest_is_the_answer() -> None:
    result = split("\n<think>\nLet me see: 2+2.\n</think>\n\nIt is 4.", [3, 9, 30, 33])
    assert result.reasoning.strip() == "Let me see: 2+2." and result.answer == "It is 4."


def test_a_reply_without_thinking_is_all_answer() -> None:
    result = split(" Hello <think> is a tag", [2, 8])
    assert result.reasoning == "" and result.answer == " Hello <think> is a tag"


def test_a_prompt_that_opened_the_block_starts_inside_it() -> None:
    result = split("weighing it up</think>Yes.", [5], inside=True)
    assert result.reasoning == "weighing it up" and result.answer == "Yes."


def test_thinking_that_never_ends_has_no_answer() -> None:
    result = split("<think>on and on", [3])
    assert result.thinking and result.reasoning == "on and on" and result.answer == ""


@settings(max_examples=300, deadline=None)
@given(reasoning=words, answer=words, cuts=st.lists(st.integers(0, 120), max_size=12))
def test_any_cut_into_deltas_gives_the_same_parts(reasoning: str, answer: str, cuts: list[int]) -> None:
    reasoning, answer = reasoning.replace("</think>", ""), answer.lstrip()
    text = f"<think>{reasoning}</think>{answer}"
    result = split(text, cuts)
    assert result.reasoning == reasoning and result.answer == answer
    assert split(text, []).answer == result.answer


@settings(max_examples=300, deadline=None)
@given(text=words, cuts=st.lists(st.integers(0, 60), max_size=8))
def test_text_that_does_not_open_with_think_is_kept_whole(text: str, cuts: list[int]) -> None:
    if text.lstrip().startswith("<think>"):
        return
    assert split(text, cuts).answer == text
