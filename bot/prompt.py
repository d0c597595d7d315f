"""Chat prompts: the GGUF's own Jinja2 chat template, rendered so message text can never become special tokens.

Any conversation renders: roles are made to alternate first, a template that rejects a system role gets the
system prompt folded into the first user turn, and one that does not compile is replaced by ChatML.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bot.errors import PromptError
from bot.types import ImagePart

__all__ = ["ChatTemplate", "Prompt", "Segment", "CHATML_TEMPLATE", "alternate_roles", "strip_markers"]

log = logging.getLogger(__name__)

# Used when a GGUF carries no tokenizer.chat_template, or one that does not compile.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TURN_SEPARATOR = "\n\n"
"""Joins merged turns of one role, and the system prompt to the first user turn when it is folded in."""

# Message text is swapped for these markers while the template renders, so afterwards we know exactly which
# characters came from people (tokenized as plain text) and which from the template (special tokens allowed).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")

Segment = tuple[str, bool]
"""A piece of the rendered prompt: (text, is_message_text)."""


@dataclass(frozen=True)
class Prompt:
    """A prompt both engines can take: the embedded one reads ``tokens``, a remote server ``messages``."""

    messages: list[dict[str, Any]]  # system prompt, kept turns, the message answered (str content; a remote tool
    # round adds OpenAI tool_calls and tool messages)
    tokens: list[int]  # the rendered prompt (for a remote server, an upper estimate of its length)
    prefix: str = ""  # Continue: the reply so far, which the model goes on from (already in ``tokens``)
    turns_from: int | None = None  # the oldest stored message kept, when older ones had to be left out
    # Index in ``messages`` of a user turn -> its images, in order (a str stands for one no longer stored).
    images: Mapping[int, Sequence[ImagePart | str]] = field(default_factory=dict)


def strip_markers(text: str) -> str:
    """Remove the private-use characters the renderer reserves, so user text cannot forge a marker."""
    return text.replace(_MARK_OPEN, "").replace(_MARK_CLOSE, "")


def alternate_roles(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation as strict chat templates (Mistral, Llama-2, Gemma) demand it.

    Leading system messages become one system prompt (left out when blank). After it, turns with blank content
    are dropped, consecutive turns of one role are merged (joined with a blank line), leading assistant turns
    are dropped, and an empty user turn is added if the conversation does not end with one. Any role other
    than system (at the start) and assistant counts as user.
    """
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    system = _join(m["content"] for m in messages[:start])
    turns: list[tuple[str, list[str]]] = []
    for message in messages[start:]:
        role = "assistant" if message["role"] == "assistant" else "user"
        if not message["content"].strip() or (not turns and role == "assistant"):
            continue
        if turns and turns[-1][0] == role:
            turns[-1][1].append(message["content"])
        else:
            turns.append((role, [message["content"]]))
    if not turns or turns[-1][0] != "user":
        turns.append(("user", []))
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": role, "content": _join(parts)} for role, parts in turns
    ]


def _join(parts: Iterable[str]) -> str:
    return TURN_SEPARATOR.join(part for part in parts if part.strip())


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
            trim_blocks=True, lstrip_blocks=True, extensions=[_IgnoreGenerationTags, jinja2.ext.loopcontrols]
        )
        environment.globals.update(
            raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt)
        )
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as exc:
            log.warning("the model's chat template does not compile (%s); using ChatML instead", exc)
            source = CHATML_TEMPLATE
            self._template = environment.from_string(source)
        self.source = source
        """The template text in use (ChatML if the model's own did not compile)."""
        self.folds_system: bool | None = None
        """Whether the system prompt goes into the first user turn; None until a render with one has shown it."""
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render_segments(self, messages: Sequence[dict[str, str]]) -> list[Segment]:
        """Render ``messages`` (role, content) with the generation prompt, split into template and text parts.

        Raises:
            PromptError: the template fails on this conversation however it is laid out.
        """
        conversation = alternate_roles(messages)
        has_system = conversation[0]["role"] == "system"
        layouts = [False, True] if has_system else [False]  # as given, then with the system prompt folded in
        if self.folds_system:
            layouts.reverse()
        failure: str | None = None
        system_ignored: tuple[str, list[dict[str, str]]] | None = None
        for fold in layouts:
            laid_out = _fold_system(conversation) if fold else conversation
            try:
                rendered = self._render(laid_out)
            except Exception as exc:  # the template is foreign code: any error it raises is a prompt failure
                failure = failure or (
                    str(exc) if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
                )
                continue
            if _mark(len(laid_out) - 1) not in rendered:
                failure = failure or "the template left out the message being answered"
                continue
            if has_system and not fold and _mark(0) not in rendered:  # e.g. Phi-3: the system turn is skipped
                system_ignored = system_ignored or (rendered, laid_out)
                continue
            if has_system and self.folds_system is not fold:
                if fold:
                    log.info(
                        "the chat template rejects a system role (%s); the system prompt goes into the first user turn",
                        failure or "it leaves the system prompt out",
                    )
                self.folds_system = fold
            return _split(rendered, laid_out)
        if system_ignored is not None:
            return _split(*system_ignored)
        raise PromptError(f"The model's chat template cannot format this conversation: {_shorten(failure)}")

    def tokenize(self, messages: Sequence[dict[str, str]], tokenize: Callable[[str, bool], list[int]]) -> list[int]:
        """Token ids of the prompt; ``tokenize(text, parse_special)`` is called once per segment."""
        tokens: list[int] = []
        for text, is_message_text in self.render_segments(messages):
            tokens += tokenize(text, not is_message_text)
        return tokens

    def _render(self, messages: list[dict[str, str]]) -> str:
        placeholders = [{"role": m["role"], "content": _mark(i)} for i, m in enumerate(messages)]
        return self._template.render(
            messages=placeholders, add_generation_prompt=True, bos_token=self._bos_token, eos_token=self._eos_token
        )


def _mark(index: int) -> str:
    return f"{_MARK_OPEN}{index}{_MARK_CLOSE}"


def _fold_system(conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system prompt as the head of the first user turn (``conversation`` opens with system, then user)."""
    system, first, *rest = conversation
    return [{"role": "user", "content": _join([system["content"], first["content"]])}, *rest]


def _split(rendered: str, messages: list[dict[str, str]]) -> list[Segment]:
    """Template text and message text, each marker replaced by the message it stands for."""
    segments: list[Segment] = []
    position = 0
    for match in _MARKER.finditer(rendered):
        segments.append((strip_markers(rendered[position : match.start()]), False))
        segments.append((messages[int(match.group(1))]["content"], True))
        position = match.end()
    segments.append((strip_markers(rendered[position:]), False))
    return [segment for segment in segments if segment[0]]


def _shorten(text: str | None, limit: int = 200) -> str:
    text = " ".join((text or "unknown error").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
