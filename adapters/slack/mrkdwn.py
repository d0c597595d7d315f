"""Model Markdown → Slack mrkdwn, with every ping in model output made harmless.

Slack's ``text`` field is mrkdwn: ``*bold*``, ``_italic_``, ``~strike~``, ``<url|label>`` links, and ``&``,
``<``, ``>`` must be escaped. An unescaped ``<!channel>``, ``<!here>``, ``<!everyone>``, ``<@U…>``,
``<#C…>`` or ``<!subteam^…>`` would notify people, so model text is escaped everywhere and the only ``<``
this module emits opens an ``http(s)``/``mailto`` link it built itself. `from_slack` goes the other way:
a user's Slack markup to the plain text the model reads.
"""

from __future__ import annotations

import re

from bot.replies import Fence, closes_fence, opening_fence

__all__ = ["escape", "to_mrkdwn", "neutralize_markdown", "from_slack"]

# A word joiner after "@" stops "@everyone" / "@channel" / "@here" being linked by any parse mode.
_WORD_JOINER = "\u2060"
_PLAIN_BROADCAST = re.compile(r"@(?=(?:everyone|channel|here)\b)", re.IGNORECASE)
_SAFE_URL = re.compile(r"^(?:https?://|mailto:)[^\s<>|]+$", re.IGNORECASE)

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_RULE = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(.*)$")
_QUOTE = re.compile(r"^\s{0,3}>\s?(.*)$")

# A line with none of the characters that markup, escaping or a broadcast word start with is left as it is.
_PLAIN = re.compile(r"[^#*_+\->`!\[<~&@]*")
_SLACK_MARKUP = re.compile(r"<([^<>]*)>")

_INLINE = re.compile(
    r"(?=[`!\[<*_~])(?:"  # every construct starts with one of these: elsewhere, fail at once
    r"(?P<code>(?<!`)(?P<ticks>`+)(?!`)(?P<code_text>.+?)(?<!`)(?P=ticks)(?!`))"  # whole runs: no backtracking
    r"|(?P<link>!?\[(?P<label>[^\]\n]*)\]\((?P<url>[^)\s]+)(?:\s+\"[^\"\n]*\")?\))"
    r"|(?P<autolink><(?P<auto_url>(?:https?://|mailto:)[^\s<>|]+)>)"
    r"|\*\*(?=\S)(?P<bold>.+?)(?<=\S)\*\*"
    r"|(?<!\w)__(?=\S)(?P<bold2>.+?)(?<=\S)__(?!\w)"
    r"|~~(?=\S)(?P<strike>.+?)(?<=\S)~~"
    r"|(?<![*\w])\*(?=[^\s*])(?P<italic>.+?)(?<=[^\s*])\*(?![*\w])"
    r"|(?<![_\w])_(?=[^\s_])(?P<italic2>.+?)(?<=[^\s_])_(?![_\w]))"
)


def escape(text: str) -> str:
    """Escape Slack's three control characters and de-fang plain ``@everyone``-style words."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _PLAIN_BROADCAST.sub("@" + _WORD_JOINER, text)


def neutralize_markdown(text: str) -> str:
    """Make Markdown safe for ``markdown_text`` (native streaming) without changing its formatting.

    Only inserts characters right after a ``<`` or ``@``, so the result of a longer text always starts
    with the result of its prefix, which the append-only stream relies on.
    """
    text = re.sub(r"<(?=[!@#])", "<" + _WORD_JOINER, text)
    return _PLAIN_BROADCAST.sub("@" + _WORD_JOINER, text)


def to_mrkdwn(markdown: str) -> str:
    """Convert the model's Markdown (bold, italics, links, code, lists, headings) to Slack mrkdwn."""
    out: list[str] = []
    fence: Fence | None = None
    code: list[str] = []
    for line in markdown.split("\n"):
        if fence is None:
            fence = opening_fence(line)  # the splitter's definition, so both see the same code blocks
            if fence is None:
                out.append(_line(line))  # an inline ```x``` on one line included
            else:
                # A language has no meaning in Slack; code written on the fence line is code.
                code = [fence.code] if fence.code else []
        elif closes_fence(line, fence):
            out.append(_code_block(code))
            fence = None
        else:
            code.append(line)
    if fence is not None:
        # Mid-stream the closing fence has not arrived yet; close it so the partial reply renders.
        out.append(_code_block(code))
    return _only_own_links("\n".join(out))


def _code_block(lines: list[str]) -> str:
    body = escape("\n".join(lines)).replace("```", "`\u200b``")
    return f"```\n{body}\n```" if body else "```\n```"


def _line(line: str) -> str:
    if _PLAIN.fullmatch(line):
        return line
    if m := _HEADING.match(line):
        return f"*{_inline(m.group(1))}*" if m.group(1) else ""
    if _RULE.match(line):
        return "──────────"
    if m := _BULLET.match(line):
        return f"{m.group(1)}• {_inline(m.group(2))}"
    if m := _QUOTE.match(line):
        return f">{' ' if m.group(1) else ''}{_inline(m.group(1))}"
    return _inline(line)


def _inline(text: str) -> str:
    parts: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        parts.append(escape(text[pos : m.start()]))
        parts.append(_token(m))
        pos = m.end()
    parts.append(escape(text[pos:]))
    return "".join(parts)


def _token(m: re.Match[str]) -> str:
    if m.group("code"):
        return f"`{escape(m.group('code_text'))}`"
    if m.group("link"):
        return _link(m.group("url"), m.group("label"))
    if m.group("autolink"):
        return _link(m.group("auto_url"), "")
    for name, mark in (("bold", "*"), ("bold2", "*"), ("strike", "~"), ("italic", "_"), ("italic2", "_")):
        inner = m.group(name)
        if inner is not None:
            return f"{mark}{_inline(inner)}{mark}"
    return escape(m.group(0))


def _link(url: str, label: str) -> str:
    label = re.sub(r"[*_~`]", "", label).strip()
    if not _SAFE_URL.match(url):
        # Not a web link (maybe "!channel" or "@U123" in disguise): show it as plain text instead.
        return escape(f"{label} ({url})" if label else url)
    if not label or label == url:
        return f"<{escape(url)}>"
    return f"<{escape(url)}|{escape(label)}>"


def _only_own_links(text: str) -> str:
    # Belt and braces: every "<" left must open a web link this module built.
    return re.sub(r"<(?!(?:https?://|mailto:)[^\s<>|]+(?:\|[^<>]*)?>)", "&lt;", text, flags=re.IGNORECASE)


def from_slack(text: str, bot_user_id: str | None = None) -> str:
    """A user's Slack text as plain words: the bot's own mention removed, other mentions and links readable."""

    def plain(m: re.Match[str]) -> str:
        target, _, label = m.group(1).partition("|")
        if target.startswith("@"):
            return "" if bot_user_id and target[1:] == bot_user_id else f"@{label or target[1:]}"
        if target.startswith("#"):
            return f"#{label or target[1:]}"
        if target.startswith("!"):
            command = target[1:].split("^", 1)[0]
            if command in ("here", "channel", "everyone"):
                return f"@{command}"
            return label or f"@{command}"
        return f"{label} ({target})" if label and label != target else target

    text = _SLACK_MARKUP.sub(plain, text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"[ \t]{2,}", " ", text).strip()
