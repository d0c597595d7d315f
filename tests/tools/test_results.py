"""A tool's answer as the model reads it: plain text from every kind of content block, cut with a note."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from mcp import types

from bot.tools.results import cut, result_text


def test_every_content_block_becomes_plain_text() -> None:
    result = types.CallToolResult(
        content=[
            types.TextContent(type="text", text="\x1b[31mred\x1b[0m and a bell\x07\ttab\nline"),
            types.ImageContent(type="image", data="aGk=", mime_type="image/png"),
            types.EmbeddedResource(type="resource", resource=types.TextResourceContents(uri="file:///a.txt", text="A")),
            types.EmbeddedResource(
                type="resource", resource=types.BlobResourceContents(uri="file:///b.bin", blob="aGk=")
            ),
            types.ResourceLink(type="resource_link", uri="https://example.com/doc", name="doc"),
        ]
    )
    assert result_text(result).split("\n") == [
        "[31mred[0m and a bell\ttab",
        "line",
        "[image content, image/png]",
        "A",
        "[binary resource file:///b.bin]",
        "[resource https://example.com/doc]",
    ]


def test_structured_content_alone_is_given_as_json() -> None:
    result = types.CallToolResult(content=[], structured_content={"temperature": 21.5, "city": "Zürich"})
    assert result_text(result) == '{"temperature": 21.5, "city": "Zürich"}'


@given(text=st.text(max_size=300), cap=st.integers(1, 200))
def test_a_cut_keeps_the_start_and_says_how_much_there_was(text: str, cap: int) -> None:
    shown, was_cut = cut(text, cap)
    assert was_cut == (len(text) > cap)
    if was_cut:
        assert shown.startswith(text[:cap]) and f"the tool returned {len(text):,} characters" in shown
    else:
        assert shown == text
