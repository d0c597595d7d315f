"""Block Kit for replies: the text as a section, the core's `Controls` as buttons, and the values they carry;
and the assistant greeting's model select (`model_select_blocks`).

Every button's value names the conversation and the stored reply it acts on (`ButtonValue`), so a press can be
answered after a restart without any state kept in memory. Slack sends back only values the bot set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bot.text import one_line
from bot.types import Controls, SessionKey
from bot.wording import MODEL_PICKER_LABEL, MODEL_PICKER_PLACEHOLDER

__all__ = [
    "STOP",
    "REGENERATE",
    "CONTINUE",
    "FEEDBACK",
    "RUN",
    "DENY",
    "TOOL_DETAILS",
    "MODEL_SELECT",
    "MAX_VALUE_CHARS",
    "SECTION_TEXT_LIMIT",
    "OPTION_TEXT_LIMIT",
    "MAX_OPTIONS",
    "ButtonValue",
    "reply_blocks",
    "button_blocks",
    "feedback_blocks",
    "without_buttons",
    "model_select_blocks",
]

STOP = "llamarelay_stop"
REGENERATE = "llamarelay_regenerate"
CONTINUE = "llamarelay_continue"
FEEDBACK = "llamarelay_feedback"
RUN = "llamarelay_run"  # a tool call waiting for approval: run it
DENY = "llamarelay_deny"  # … or not
TOOL_DETAILS = "llamarelay_tool_details"  # the stored reply's tool calls, shown to the presser alone
MODEL_SELECT = "llamarelay_model"  # the assistant greeting's select: which model answers that thread
MAX_VALUE_CHARS = 2000  # a button value's limit
SECTION_TEXT_LIMIT = 3000
"""Characters one section block's text may hold (a Block Kit limit, stricter than a message's ``text``)."""
OPTION_TEXT_LIMIT = 75  # a select option's text, and its description (Block Kit limits)
MAX_OPTIONS = 100  # options one static select may hold


@dataclass(frozen=True)
class ButtonValue:
    """What a button acts on: a conversation, its stored reply (none for Stop), 👍/👎 for feedback, the
    header that opens the message (a ``/ask`` question), which a regenerated answer keeps, and for Run / Deny
    the id of the tool call's approval request (`bot.tools.approvals`)."""

    key: SessionKey
    reply_id: int | None = None
    feedback: str = ""
    header: str = ""
    approval: str = ""

    def dump(self) -> str:
        value = {"k": str(self.key), "r": self.reply_id, "f": self.feedback, "h": self.header, "a": self.approval}
        text = json.dumps(value, separators=(",", ":"))
        if len(text) > MAX_VALUE_CHARS:  # a header is a nicety; the rest always fits
            text = json.dumps(value | {"h": ""}, separators=(",", ":"))
        return text

    @classmethod
    def load(cls, value: str) -> ButtonValue | None:
        """The value a button was given, or None when it is not one of ours."""
        try:
            data = json.loads(value)
            reply_id = data.get("r")
            if reply_id is not None and not isinstance(reply_id, int):
                return None
            return cls(
                SessionKey.parse(str(data["k"])),
                reply_id,
                str(data.get("f") or ""),
                str(data.get("h") or ""),
                str(data.get("a") or ""),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _button(text: str, action_id: str, value: ButtonValue, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "value": value.dump(),
        "text": {"type": "plain_text", "text": text, "emoji": True},
    }
    if style:
        button["style"] = style
    return button


def reply_blocks(
    mrkdwn: str, controls: Controls | None, key: SessionKey | None, header: str = ""
) -> list[dict[str, Any]]:
    """A reply message's blocks: its text (already mrkdwn, at most `SECTION_TEXT_LIMIT`), then its buttons.

    ``verbatim`` keeps Slack from linking names or mentions in the text on its own: the text is shown exactly
    as the bot escaped it.
    """
    section = {"type": "section", "text": {"type": "mrkdwn", "text": mrkdwn, "verbatim": True}}
    return [section, *button_blocks(controls, key, header)]


def button_blocks(controls: Controls | None, key: SessionKey | None, header: str = "") -> list[dict[str, Any]]:
    """The buttons for ``controls`` as an actions block (none when there is nothing to press); ``header`` is
    the text above the reply in this message, which Regenerate keeps."""
    buttons: list[dict[str, Any]] = []
    if controls is not None and key is not None:
        if controls.approval is not None:
            buttons.append(_button("▶️ Run", RUN, ButtonValue(key, approval=controls.approval), "primary"))
            buttons.append(_button("🚫 Deny", DENY, ButtonValue(key, approval=controls.approval), "danger"))
        if controls.stop:
            buttons.append(_button("⏹️ Stop", STOP, ButtonValue(key), "danger"))
        if controls.reply_id is not None:
            buttons.append(_button("🔄 Regenerate", REGENERATE, ButtonValue(key, controls.reply_id, header=header)))
            if controls.can_continue:
                buttons.append(_button("⏩ Continue", CONTINUE, ButtonValue(key, controls.reply_id)))
            if controls.tool_details:
                buttons.append(_button("🔧 Tool details", TOOL_DETAILS, ButtonValue(key, controls.reply_id)))
    return [{"type": "actions", "elements": buttons}] if buttons else []


def feedback_blocks(key: SessionKey, reply_id: int) -> list[dict[str, Any]]:
    """Slack's 👍/👎 feedback buttons, for the end of a natively streamed reply."""
    return [
        {
            "type": "context_actions",
            "elements": [
                {
                    "type": "feedback_buttons",
                    "action_id": FEEDBACK,
                    "positive_button": {
                        "text": {"type": "plain_text", "text": "👍"},
                        "accessibility_label": "Good answer",
                        "value": ButtonValue(key, reply_id, "good").dump(),
                    },
                    "negative_button": {
                        "text": {"type": "plain_text", "text": "👎"},
                        "accessibility_label": "Bad answer",
                        "value": ButtonValue(key, reply_id, "bad").dump(),
                    },
                }
            ],
        }
    ]


def without_buttons(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message's blocks minus its buttons (once the reply has moved on, they would act on the wrong text)."""
    return [block for block in blocks if block.get("type") not in ("actions", "context_actions")]


def _option(name: str, description: str) -> dict[str, Any]:
    option: dict[str, Any] = {
        "text": {"type": "plain_text", "text": one_line(name, OPTION_TEXT_LIMIT)},
        "value": name,
    }  # configured names are at most 64 characters: they fit a value
    if description:
        option["description"] = {"type": "plain_text", "text": one_line(description, OPTION_TEXT_LIMIT)}
    return option


def model_select_blocks(mrkdwn: str, models: list[tuple[str, str]], current: str) -> list[dict[str, Any]]:
    """A message's text (mrkdwn) with a select of ``models`` (name, description) under it, ``current`` chosen
    when it is one of them (a choice no longer configured shows the placeholder instead)."""
    options = [_option(name, description) for name, description in models[:MAX_OPTIONS]]
    select: dict[str, Any] = {
        "type": "static_select",
        "action_id": MODEL_SELECT,
        "options": options,
        "placeholder": {"type": "plain_text", "text": MODEL_PICKER_PLACEHOLDER},
    }
    if chosen := next((option for option in options if option["value"] == current), None):
        select["initial_option"] = chosen
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": mrkdwn}},
        {"type": "section", "text": {"type": "mrkdwn", "text": MODEL_PICKER_LABEL}, "accessory": select},
    ]
