"""Replies that call tools on a remote model server: the same loop as `bot.conversations.tools`, over OpenAI's
``tools`` / ``tool_calls`` API. The server applies the model's template and parses its calls; each round's
calls run here (approval, status, /stop, stored) and go back as ``tool`` messages, up to ``[tools] max_rounds``;
a last round with ``tool_choice: "none"`` then answers."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from bot.config import SamplingSettings
from bot.conversations.requests import Exchange, Request, State
from bot.conversations.streaming import outcome
from bot.conversations.tools import ROUND_SEPARATOR, Toolbox, ToolRunner
from bot.engine import QueuePosition
from bot.engine.remote import RemoteCall, RemoteEngine, RemoteGeneration, Retrying
from bot.metrics import Metrics, TokenTimer
from bot.prompt import Prompt
from bot.store import Status, Store
from bot.tools.approvals import Approvals
from bot.tools.registry import ToolSpec
from bot.tools.syntax import ToolCall, tool_definitions
from bot.types import Phase, ReplyStatus
from bot.wording import tool_call_unreadable, tool_rounds_used, tools_used

__all__ = ["RemoteToolRounds"]


class RemoteToolRounds(ToolRunner):
    """Runs a reply whose model, on a remote server, is offered tools, round by round."""

    def __init__(
        self,
        engine: RemoteEngine,
        store: Store,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        approvals: Approvals | None = None,
    ) -> None:
        super().__init__(store, metrics, clock=clock, approvals=approvals)
        self._engine = engine

    def offer(self, system: str, tools: Sequence[ToolSpec]) -> str:
        """The system prompt as it is: the tools go in the request's ``tools``, for the server's template."""
        return system

    async def run(
        self,
        request: Request,
        exchange: Exchange,
        prompt: Prompt,
        sampling: SamplingSettings,
        notes: list[str],
        *,
        box: Toolbox,
        tools: list[ToolSpec],
        plain_system: str,
    ) -> tuple[str, list[str]]:
        """Answer with ``prompt``, offering ``tools``: (status, ``notes`` + its own)."""
        definitions = tool_definitions(tools)
        messages = [dict(m) for m in prompt.messages]
        current = prompt
        used: list[str] = []
        request.text = exchange.prefix
        rounds = 0
        final = False
        while True:
            text, generation = await self._round(
                request, current, sampling, definitions, "none" if final else "auto", separate=rounds > 0
            )
            calls = [] if final else generation.tool_calls  # "none": a call now is not run
            if request.ended is not None or request.delivery.failed or not calls:
                status, own = outcome(request, generation, request.text)
                if final and generation.tool_calls:
                    status = Status.COMPLETE if request.text.strip() else Status.FAILED
                    own = [tool_rounds_used(rounds)]
                return status, notes + own + ([tools_used(used)] if used else [])
            rounds += 1
            messages.append(
                {"role": "assistant", "content": text, "tool_calls": [_call_message(call) for call in calls]}
            )
            for remote in calls:
                call, problem = _read(remote)
                if call is None:
                    result: str | None = tool_call_unreadable(problem)
                else:
                    result = await self._call(request, exchange, box, tools, call, rounds, used, notes)
                    if result is None:  # stopped while it ran
                        return Status.STOPPED, notes + [request.ended or ""] + ([tools_used(used)] if used else [])
                messages.append({"role": "tool", "tool_call_id": remote.id, "content": result})
            final = rounds >= box.settings.max_rounds  # one more round to answer, with tool_choice "none"
            request.state = State.PROMPTING
            current = dataclasses.replace(
                prompt,
                messages=[dict(m) for m in messages],
                tokens=self._engine.chat_tokens(messages),
                prefix="",
                turns_from=None,
            )

    async def _round(
        self,
        request: Request,
        prompt: Prompt,
        sampling: SamplingSettings,
        definitions: list[dict[str, Any]],
        tool_choice: str,
        *,
        separate: bool,
    ) -> tuple[str, RemoteGeneration]:
        """One request to the server, its text streamed into the reply; (this round's text, the generation)."""
        generation = self._engine.submit(
            prompt, sampling, session=request.key, tools=definitions, tool_choice=tool_choice
        )
        request.generation = generation
        request.state = State.QUEUED
        timer = TokenTimer(self._metrics, self._clock)
        text = ""
        async for event in generation:
            if request.delivery.failed:
                generation.cancel()
            if isinstance(event, QueuePosition):
                request.state = State.QUEUED if event.position else State.GENERATING
                if not request.text.strip():
                    request.delivery.status(
                        ReplyStatus(Phase.QUEUED, event.position) if event.position else ReplyStatus(Phase.THINKING)
                    )
            elif isinstance(event, Retrying):
                request.delivery.status(ReplyStatus(Phase.RETRYING))
            elif isinstance(event, str):
                timer.text_arrived()
                piece = event
                if separate and not text.strip():  # this round's first words: a blank line from the last round's
                    piece = piece.lstrip()
                    if piece and request.text.strip():
                        request.text = request.text.rstrip() + ROUND_SEPARATOR
                text += event
                request.text += piece
                request.delivery.update(request.text)
        self._metrics.tokens_generated.inc(generation.n_generated)
        self._metrics.prompt_tokens.inc(len(prompt.tokens))
        self._metrics.prompt_tokens_reused.inc(generation.n_prompt_reused)
        return text, generation


def _call_message(call: RemoteCall) -> dict[str, Any]:
    """A call as the assistant message that made it carries it back to the server."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments or "{}"}}


def _read(call: RemoteCall) -> tuple[ToolCall | None, str]:
    """The call with its arguments read, or None and why not."""
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return None, f"the call's arguments are not valid JSON: {exc.msg}"
    if not call.name or not isinstance(arguments, dict):
        return None, "a call needs a function name and an object of arguments"
    return ToolCall(call.name, arguments), ""
