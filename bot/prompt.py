"""Chat prompts: the GGUF's own Jinja2 chat template, rendered so message text can never become special tokens."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "Segment", "CHATML_TEMPLATE", "strip_markers"]

# Used when a GGUF carries no tokenizer.chat_template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Message text is swapped for these markers while the template renders, so afterwards we know exactly which
# characters came from people (tokenized as plain text) and which from the template (special tokens allowed).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")

Segment = tuple[str, bool]
"""A piece of the rendered prompt: (text, is_message_text)."""


def strip_markers(text: str) -> str:
    """Remove the private-use characters the renderer reserves, so user text cannot forge a marker."""
    return text.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")


class _IgnoreGenerationTags(jinja2.ext.Extension):
    """Pass-through for HuggingFace's ``{% generation %}`` tag, as transformers and llama.cpp accept it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class ChatTemplate:
    """A model's chat template, rendered like llama.cpp / transformers do (sandboxed Jinja2)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols])
        environment.globals.update(raise_exception=_raise_exception,
                                   strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self.source = source
        self._template = environment.from_string(source)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render_segments(self, messages: Sequence[dict[str, str]]) -> list[Segment]:
        """Render ``messages`` (role, content) with the generation prompt, split into template and text parts."""
        placeholders = [{"role": m["role"], "content": f"{_MARK_OPEN}{i}{_MARK_CLOSE}"}
                        for i, m in enumerate(messages)]
        rendered = self._template.render(messages=placeholders, add_generation_prompt=True,
                                         bos_token=self._bos_token, eos_token=self._eos_token)
        segments: list[Segment] = []
        position = 0
        for match in _MARKER.finditer(rendered):
            segments.append((rendered[position:match.start()], False))
            segments.append((messages[int(match.group(1))]["content"], True))
            position = match.end()
        segments.append((rendered[position:], False))
        return [segment for segment in segments if segment[0]]

    def tokenize(self, messages: Sequence[dict[str, str]],
                 tokenize: Callable[[str, bool], list[int]]) -> list[int]:
        """Token ids of the prompt; ``tokenize(text, parse_special)`` is called once per segment."""
        tokens: list[int] = []
        for text, is_message_text in self.render_segments(messages):
            tokens += tokenize(text, not is_message_text)
        return tokens
