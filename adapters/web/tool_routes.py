"""The web page's tool routes: answer a tool call waiting for Run / Deny, and expand a reply's tool calls.

The waiting is the core's (`bot.tools.approvals`); who may answer is the access policy's question
(`Action.APPROVE_TOOL`: in a browser's own conversation, that browser asked). Results are sent as JSON text and
the page shows them with ``textContent`` only, inside a disclosure the user opens.
"""

from __future__ import annotations

from aiohttp import web

from adapters.web.api import ApiError, _conversation, _json_body, _state, current_browser, json_response
from bot.access import Action, Actor, Place
from bot.wording import APPROVAL_GONE, refusal_text

__all__ = ["tool_routes", "DETAILS_CHARS"]

DETAILS_CHARS = 100_000  # the disclosure scrolls: a generous cap, the store's results are capped already

tool_routes = web.RouteTableDef()


@tool_routes.post("/api/conversations/{conversation}/approvals/{approval}")
async def answer_approval(request: web.Request) -> web.Response:
    """Run or Deny a tool call waiting for approval (body ``{"run": true | false}``); ``404`` when it is no
    longer waiting, ``403`` when the policy says this browser may not answer it."""
    _, key = await _conversation(request)
    run = (await _json_body(request)).get("run")
    if not isinstance(run, bool):
        raise ApiError(400, "invalid_field", "'run' must be true (Run) or false (Deny).")
    state = _state(request)
    pending = state.manager.approvals.get(request.match_info["approval"])
    if pending is None or pending.key != str(key):
        raise ApiError(404, "approval_gone", APPROVAL_GONE)
    decision = await state.policy.check(
        Actor(current_browser.get()), Place(dm=True), Action.APPROVE_TOOL, owner=pending.owner
    )
    if decision.refusal is not None:
        raise ApiError(403, decision.refusal.value, refusal_text(decision))
    if not state.manager.approvals.answer(pending.id, run=run):
        raise ApiError(404, "approval_gone", APPROVAL_GONE)
    return json_response({"answered": True, "run": run})


@tool_routes.get("/api/conversations/{conversation}/replies/{reply_id:[0-9]+}/tools")
async def tool_details(request: web.Request) -> web.Response:
    """The tool calls of one reply of this conversation: tool, round, arguments (JSON text), result, failed."""
    _, key = await _conversation(request)
    calls = await _state(request).manager.tool_calls(key, int(request.match_info["reply_id"]))
    return json_response(
        {
            "calls": [
                {
                    "tool": c.tool,
                    "round": c.round,
                    "arguments": c.arguments,
                    "result": c.result[:DETAILS_CHARS],
                    "is_error": c.is_error,
                }
                for c in calls
            ]
        }
    )
