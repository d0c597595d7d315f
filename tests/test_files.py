"""Files sent with a message: what is read, what is skipped, and how they reach the model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.files import read_attachment, with_attachments


def test_text_files_are_read_and_others_skipped_with_a_reason() -> None:
    assert read_attachment("notes.md", None, b"# Title\r\nbody", 1000).text == "# Title\nbody"
    assert read_attachment("data", "text/csv; charset=utf-8", b"a,b\n1,2", 1000).text == "a,b\n1,2"
    assert read_attachment("photo.png", "image/png", b"\x89PNG\r\n", 1000).skipped == "not a text file"
    assert read_attachment("fake.txt", None, b"abc\x00def", 1000).skipped == "not a text file"
    assert read_attachment("latin1.txt", None, "café".encode("latin-1"), 1000).skipped == "not UTF-8 text"
    assert read_attachment("big.log", None, b"x" * 2001, 2000).skipped == "larger than 2 kB"
    assert read_attachment("../../etc/passwd.txt", None, b"x", 10).name == "passwd.txt"


def test_files_follow_the_message_under_their_names_and_skips_become_notes() -> None:
    code = read_attachment("a.py", None, b"print('```')\n", 1000)
    text, notes = with_attachments("What does this do?", (code, read_attachment("x.bin", None, b"\x00", 10)))
    assert text == "What does this do?\n\nFile a.py:\n````\nprint('```')\n````"
    assert notes == ["📎 I skipped x.bin: not a text file."]


@settings(max_examples=200, deadline=None)
@given(body=st.text(max_size=300))
def test_a_file_cannot_break_out_of_its_code_block(body: str) -> None:
    file = read_attachment("f.txt", None, body.encode("utf-8", "surrogatepass"), 10_000)
    if file.text is None:
        return
    text, _ = with_attachments("", (file,))
    fence = text.split("\n")[1]
    assert text.endswith("\n" + fence) and fence not in file.text


def test_a_message_asked_about_is_quoted_and_a_summary_keeps_the_newest() -> None:
    from bot.context import ask_about, summarize

    assert ask_about("Ana", "line one\nline two", " Is this right? ") == (
        "Ana wrote:\n> line one\n> line two\n\nIs this right?"
    )
    text = summarize([("Ana", "old " * 50), ("Bo", "newer"), ("Cy", "newest")], max_chars=40)
    assert text.endswith("Bo: newer\nCy: newest") and "(1 older messages left out)" in text
