"""Conversations: every message from arrival to its stored, delivered reply (`ConversationManager`).

An index of small modules: `manager` (the lifecycle: respond, stop, reset, status, shutdown), `requests`
(request types and states), `window` (the history that fits, the prompt), `streaming` (the engine's stream,
metrics, checkpoints), `settings` (per-session settings inheritance), `redo` (may a reply be regenerated or
continued?), `turns` (one message at a time per conversation) and `leases` (replies of processes that died).
"""

from bot.conversations.manager import ConversationManager
from bot.conversations.redo import RedoRefusal, can_continue, can_continue_status
from bot.conversations.requests import ConversationStatus, Exchange, Locator, ReplyResult, State

__all__ = [
    "ConversationManager",
    "ConversationStatus",
    "Exchange",
    "Locator",
    "RedoRefusal",
    "ReplyResult",
    "State",
    "can_continue",
    "can_continue_status",
]
