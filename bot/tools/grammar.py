"""GBNF grammars that make a model's tool call valid: one of the offered tools, by name, with arguments that fit
its JSON schema, in the model's own syntax. Built with llama.cpp's JSON-schema converter (as llama-server does)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from bot.tools.registry import ToolSpec
from bot.tools.syntax import ARGUMENTS_KEY, CLOSING, OPENING, ToolSyntax

__all__ = ["call_grammar", "call_schema"]


def call_schema(tools: Sequence[ToolSpec], syntax: ToolSyntax) -> dict[str, Any]:
    """The JSON schema of one call to any of ``tools``: ``{"name": <const>, <arguments key>: <its schema>}``."""
    if not tools:
        raise ValueError("a tool-call grammar needs at least one tool")
    key = ARGUMENTS_KEY[syntax]
    return {
        "anyOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", key],
                "properties": {"name": {"const": tool.name}, key: _arguments_schema(tool)},
            }
            for tool in tools
        ]
    }


def call_grammar(tools: Sequence[ToolSpec], syntax: ToolSyntax, *, with_opening: bool = False) -> str:
    """A GBNF grammar (rule ``root``) for what follows a call's opening: the call's JSON and, for Hermes, the
    closing tag; Mistral's list holds one call or more. ``with_opening`` puts the opening first, for a
    grammar applied from the reply's start or lazily from the opening on."""
    converter = SchemaConverter(
        prop_order={"name": 0, ARGUMENTS_KEY[syntax]: 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    schema = call_schema(tools, syntax)
    for index, alternative in enumerate(schema["anyOf"]):  # each tool's "#/$defs/…" stays its own
        alternative["properties"][ARGUMENTS_KEY[syntax]] = converter.resolve_refs(
            alternative["properties"][ARGUMENTS_KEY[syntax]], f"tool{index}:"
        )
    converter.visit(schema, "call")
    if syntax is ToolSyntax.HERMES:
        body = f"space call space {_literal(CLOSING)}"
    elif syntax is ToolSyntax.MISTRAL:
        body = '"[" space call ("," space call)* "]"'
    else:
        body = "call"
    opening = f"{_literal(OPENING[syntax])} " if with_opening else ""
    return f"root ::= {opening}{body}\n{converter.format_grammar()}\n"


def _arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    schema = copy.deepcopy(dict(tool.input_schema))
    schema.pop("title", None)  # "addArguments": no use to the grammar
    if schema.get("type") == "object" and "properties" not in schema:
        schema["properties"] = {}  # an object with no arguments: "{}" rather than any object at all
    return schema


def _literal(text: str) -> str:
    return json.dumps(text)  # GBNF string literals escape like JSON's
