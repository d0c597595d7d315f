"""Text helpers (`bot.text`): cleaning what users send, speaker names, one-line previews."""

from __future__ import annotations

from bot.text import clean_text, encodable, one_line, speaker_name


def test_control_and_zero_width_characters_are_removed() -> None:
    assert clean_text("he\u200bl\x00lo\r\nwor\u2060ld\x1b ") == "hello\nworld"


def test_lone_surrogates_become_replacement_characters() -> None:
    assert encodable("a\ud800b") == "a\ufffdb" and clean_text("a\udfffb").encode() == "a\ufffdb".encode()


def test_a_speaker_name_is_one_short_plain_line() -> None:
    assert speaker_name("  Ana\n\u200bMaria\t ") == "Ana Maria"
    assert len(speaker_name("x" * 100)) == 64


def test_a_preview_is_one_line_and_says_when_it_was_cut() -> None:
    assert one_line("What is\n  the   answer?", 40) == "What is the answer?"
    assert one_line("abcdefghij", 5) == "abcd…"
    assert one_line("a title that goes on and on", 16) == "a title that go…"
    assert one_line("a title that goes on and on", 16, whole_words=True) == "a title that…"
    assert one_line("averyveryverylongword here", 16, whole_words=True) == "averyveryverylo…"  # no word ends late
