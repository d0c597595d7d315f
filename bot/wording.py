"""Every line the core shows users, once: statuses, notes under replies, refusals, and shortcut prompts.

Adapters render statuses their own way where a platform has a better place for them; `status_line` is the
shared default (the placeholder message a reply shows before its text).
"""

from __future__ import annotations

import math

from bot.access import Action, Decision, Refusal
from bot.types import Phase, ReplyStatus

__all__ = [
    "ASK_ABOUT_QUESTION",
    "EMPTY_FILE",
    "EMPTY_MESSAGE",
    "NOT_A_TEXT_FILE",
    "NOT_UTF8_TEXT",
    "file_skipped",
    "file_too_large",
    "tool_call_unreadable",
    "tool_not_offered",
    "tool_asking",
    "tool_denied",
    "tool_approval_timed_out",
    "TOOL_DENIED_RESULT",
    "TOOL_TIMED_OUT_RESULT",
    "APPROVAL_GONE",
    "APPROVED",
    "DENIED",
    "NO_TOOL_CALLS",
    "tool_rounds_used",
    "tool_running",
    "tools_used",
    "EMPTY_REPLY",
    "LENGTH_NOTE",
    "NOTHING_TO_CONTINUE",
    "NOT_SAVED",
    "NOT_STORED",
    "PLATFORM_REFUSED",
    "REASONING",
    "RESET_NOTE",
    "SERVER_RETRYING",
    "SHUTTING_DOWN",
    "SHUTTING_DOWN_REASON",
    "STALE_REPLY",
    "STOPPED_NOTE",
    "SYSTEM_PROMPT_TOO_LONG",
    "TAKEN_OVER_NOTE",
    "THINKING",
    "TRUNCATED_MARK",
    "WAITING_FOR_PREVIOUS",
    "conversation_place",
    "failed",
    "message_cut",
    "queued_line",
    "asked_about",
    "refusal_text",
    "something_went_wrong",
    "status_line",
    "summarize_request",
    "too_many_waiting",
    "NOT_DOWNLOADED",
    "cannot_see_images",
    "image_unseen",
    "answered_by",
    "model_changed",
    "model_line",
    "model_list",
    "unknown_model",
    "MODEL_PICKER_LABEL",
    "MODEL_PICKER_PLACEHOLDER",
]

# -- statuses: what a reply shows before its text ------------------------------------------------------------

THINKING = "💭 Thinking…"
REASONING = "🤔 Thinking it through…"
WAITING_FOR_PREVIOUS = "⏳ Waiting for the previous reply in this conversation…"
SERVER_RETRYING = "⚠️ The model server is unreachable; retrying…"


def tool_running(title: str) -> str:
    return f"🔧 {title}…"


def tool_asking(title: str) -> str:
    """The status of a ``confirm = true`` call waiting for Run / Deny."""
    return f"🔐 {title}: waiting for approval. Run or Deny?"


def queued_line(position: int) -> str:
    return f"⏳ Queued: #{position} in line…"


def status_line(status: ReplyStatus) -> str:
    """The placeholder line for ``status``: what a platform without a status display shows."""
    if status.phase is Phase.QUEUED:
        assert status.position is not None
        return queued_line(status.position)
    if status.phase is Phase.TOOL:
        return tool_running(status.tool)
    if status.phase is Phase.APPROVAL:
        return tool_asking(status.tool)
    return {
        Phase.THINKING: THINKING,
        Phase.REASONING: REASONING,
        Phase.WAITING: WAITING_FOR_PREVIOUS,
        Phase.RETRYING: SERVER_RETRYING,
    }[status.phase]


# -- notes under a reply -------------------------------------------------------------------------------------

SHUTTING_DOWN_REASON = "The bot is shutting down; please send your message again in a moment."
SHUTTING_DOWN = f"⚠️ {SHUTTING_DOWN_REASON}"
STOPPED_NOTE = "⏹️ Stopped."
LENGTH_NOTE = "✂️ (reached the reply length limit)"
RESET_NOTE = "🧹 The conversation was reset before this message was answered."
TAKEN_OVER_NOTE = "⚠️ The bot process writing this reply stopped; this is as far as it got."
NOT_SAVED = "⚠️ I could not save your message (database problem), so I can't answer it; please try again."
NOT_STORED = "⚠️ This reply could not be saved (database problem), so I won't remember it."
EMPTY_MESSAGE = "⚠️ Your message is empty. Write something and I'll answer."
EMPTY_REPLY = "⚠️ The model gave an empty reply; try rephrasing."
PLATFORM_REFUSED = "⚠️ The platform would not take this reply."
SYSTEM_PROMPT_TOO_LONG = (
    "The system prompt is too long for the model's context window; shorten it or raise [engine] n_ctx."
)
# Appended, in the prompt, to a message cut to fit the context window.
TRUNCATED_MARK = "\n[… the rest of this message was cut to fit the context window]"


def failed(reason: object) -> str:
    """A reply that failed for a reason the user can act on (the model, the template, the database)."""
    return f"⚠️ {reason}"


def something_went_wrong(error: BaseException) -> str:
    return f"⚠️ Something went wrong on my side ({type(error).__name__}); your message is saved, please try again."


def message_cut(kept: int, length: int) -> str:
    return f"⚠️ Your message was too long, so only its first {kept:,} of {length:,} characters were read."


def too_many_waiting(limit: int) -> str:
    return (
        f"⚠️ {limit} messages are already waiting in this conversation; please wait for their answers "
        "before sending more."
    )


# -- tools: the footer of a reply that used them, and what a call that could not run says ---------------------


def tools_used(titles: list[str]) -> str:
    """The compact footer of a reply that called tools: each tool once, in order, with a count when repeated."""
    counts: dict[str, int] = {}
    for title in titles:
        counts[title] = counts.get(title, 0) + 1
    return "🔧 Used: " + ", ".join(f"{title} ×{n}" if n > 1 else title for title, n in counts.items())


def tool_rounds_used(rounds: int) -> str:
    return (
        f"⚠️ The model asked for more tools after {rounds} round{'s' if rounds > 1 else ''} of tool calls, "
        "the most one reply may use ([tools] max_rounds)."
    )


def tool_not_offered(name: str) -> str:
    """What the model reads back for a call of a tool this place may not use (or that does not exist)."""
    return f"the tool {name!r} is not available here"


def tool_denied(title: str) -> str:
    """The note under a reply whose tool call the user denied."""
    return f"🚫 {title} was denied, so it did not run."


def tool_approval_timed_out(title: str, seconds: float) -> str:
    """The note under a reply whose tool call nobody approved in time."""
    return f"⏱️ No one approved {title} within {_duration(seconds)}, so it did not run ([tools] approval_timeout)."


def _duration(seconds: float) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{int(seconds // 60)} minutes"
    return f"{seconds:g} s"


# What the model reads back for a call the user did not approve.
TOOL_DENIED_RESULT = "the user denied this tool call; it did not run. Do not try it again in this reply"
TOOL_TIMED_OUT_RESULT = "no one approved this tool call in time; it did not run. Do not try it again in this reply"
# A press on Run / Deny for a call no longer waiting (answered, timed out, stopped, or the bot restarted).
APPROVAL_GONE = "🕰️ This tool call is no longer waiting for approval."
APPROVED = "▶️ Running it."
DENIED = "🚫 Denied; it will not run."
NO_TOOL_CALLS = "This reply used no tools, or their record is gone."


def tool_call_unreadable(reason: str) -> str:
    return f"your tool call could not be read ({reason}); write it again as the format asks"


# -- models (/model): which model answers a conversation -----------------------------------------------------


def answered_by(name: str) -> str:
    """The compact footer of a reply written by a model other than the default."""
    return f"🧠 {name}"


def model_line(name: str, loaded: bool) -> str:
    """The Model line of /status for a conversation's own model."""
    return name if loaded else f"{name} (loads on its next reply)"


def model_list(current: str, models: list[tuple[str, str]]) -> str:
    """What /model without a name shows: the conversation's model, then every configured one (name, details)."""
    lines = [f"🧠 This conversation uses `{current}`. The models:"]
    lines += [
        f"{'▸' if name == current else '•'} `{name}`{f' — {details}' if details else ''}" for name, details in models
    ]
    return "\n".join([*lines, "Pick one with /model followed by its name."])


def model_changed(name: str, by: str) -> str:
    return f"🧠 This conversation now uses `{name}` (set by {by}); its next reply comes from it."


MODEL_PICKER_LABEL = "🧠 Model:"  # beside a surface's model picker (Slack's assistant greeting)
MODEL_PICKER_PLACEHOLDER = "Pick a model"


def unknown_model(name: str, names: list[str]) -> str:
    """The line for a /model name that is not configured, naming it (its start, if long) and the choices."""
    shown = name if len(name) <= 80 else name[:80] + "…"
    return f"⚠️ There is no model called {shown!r}; the models are: {', '.join(names)}."


# -- attached files ------------------------------------------------------------------------------------------

NOT_A_TEXT_FILE = "not a text file"
NOT_UTF8_TEXT = "not UTF-8 text"
EMPTY_FILE = "it is empty"


def file_too_large(max_bytes: int) -> str:
    return f"larger than {max_bytes // 1000:,} kB"


NOT_DOWNLOADED = "could not be downloaded"


def cannot_see_images(seeing: list[str]) -> str:
    """The note under a reply to a message with images, from a model that cannot read them: ``seeing`` are the
    configured models that can."""
    if seeing:
        return f"🖼️ I can't see images with this model; try `/model {seeing[0]}`."
    return "🖼️ I can't see images with this model, and no configured model reads images."


def image_unseen(name: str) -> str:
    """What a model without vision reads in place of an image of the conversation, so it knows one is there."""
    return f"[An image, {name}, is attached; this model cannot see images.]"


def file_skipped(name: str, reason: str) -> str:
    """The note under a reply for an attached file the model did not read."""
    return f"📎 I skipped {name}: {reason}."


# -- access refused (`bot.access`): allow-lists, DMs, the rate limit, shared settings ------------------------

REFUSALS = {
    Refusal.NOT_LISTED: "🚫 Sorry, you're not on the list of people allowed to use this bot.",
    Refusal.SERVER_NOT_ALLOWED: "🚫 I'm not enabled in this server.",
    Refusal.CHANNEL_NOT_ALLOWED: "🚫 I'm not enabled in this channel.",
    Refusal.DMS_OFF: "🚫 Direct messages are turned off for this bot; mention me in a channel instead.",
    Refusal.DM_NOT_ALLOWED: "🚫 Sorry, I answer direct messages only from people allowed to use me in a server.",
    Refusal.NOT_YOURS: "🚫 Only the person who asked, or an admin, can approve or deny this tool call.",
}
_SHARED = {
    Action.SET_SYSTEM_PROMPT: "a channel's system prompt; in a DM with me it is yours to change",
    Action.SET_SAMPLING: "a channel's settings; in a DM with me they are yours to change",
    Action.SET_MODEL: "a channel's model; in a DM with me it is yours to change",
}


def refusal_text(decision: Decision, *, admins: str = "admins") -> str:
    """The line a user sees for a refused ``decision``; ``admins`` says who the platform's admins are."""
    if decision.refusal is Refusal.TOO_FAST:
        return (
            f"⏳ Easy there! You can send {decision.per_minute} messages a minute; "
            f"try again in {max(1, math.ceil(decision.retry_after))} s."
        )
    if decision.refusal is Refusal.ADMINS_ONLY:
        return f"🚫 Only {admins} can change {_SHARED.get(decision.action, _SHARED[Action.SET_SAMPLING])}."
    assert decision.refusal is not None, "an allowed decision has no refusal to show"
    return REFUSALS[decision.refusal]


# -- Regenerate and Continue refused -------------------------------------------------------------------------

STALE_REPLY = "That is no longer the latest answer in this conversation."
NOTHING_TO_CONTINUE = "That answer was not cut short, so there is nothing to continue."

# -- /status: where a conversation is ------------------------------------------------------------------------


def conversation_place(state: str | None, position: int | None, waiting: int) -> str:
    """The "This conversation" line of /status for a `bot.conversations.State` value (None: nothing queued)."""
    if state in ("queued", "generating") and position is not None:
        place = "generating now" if position == 0 else f"#{position} in the queue"
    else:
        place = {
            "waiting": "waiting for the previous reply",
            "prompting": "reading the conversation",
            "delivering": "sending the last of a reply",
        }.get(state or "", "nothing queued")
    if waiting:
        place += f", {waiting} more message{'s' if waiting > 1 else ''} waiting"
    return place


# -- prompts the shortcuts write for users (Discord's context menus, Slack's message shortcuts) ---------------

ASK_ABOUT_QUESTION = "What do you make of this message?"  # when the user asks nothing in particular


def asked_about(author: str, quote: str, question: str) -> str:
    """A question about one message: who wrote it, the message (already quoted, as data), then the question."""
    return f"{author} wrote:\n{quote}\n\n{question}"


def summarize_request(left_out: int) -> str:
    """The request that opens a summary prompt; ``left_out``: older messages that did not fit."""
    older = f" ({left_out} older messages left out)" if left_out else ""
    return f"Summarize this conversation: the main points, decisions and open questions, briefly{older}."
