"""Replies that call tools: the model is offered the tools its place may use; a call in its output ends the round,
runs (visibly, stoppable; a ``confirm = true`` tool only once the user presses Run), is stored as a tool message
and fed back, up to ``[tools] max_rounds`` rounds; a last round without tools then answers. Results are untrusted
plain text: message text to the template, never shown unless the user expands them.

Over 400 lines: one loop (offer, parse, approve, run, feed back) and the runner both backends' loops share.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bot.access import AccessPolicy, Actor, Place
from bot.config import SamplingSettings, ToolsSettings
from bot.conversations.requests import Exchange, Request, State
from bot.conversations.streaming import CHECKPOINT_SECONDS, outcome
from bot.engine import Generation, QueuePosition, Retrying
from bot.errors import LlamarelayError
from bot.metrics import Metrics, TokenTimer
from bot.prompt import Prompt
from bot.store import Status, Store, StoredToolCall
from bot.tools.approvals import Approvals, Verdict
from bot.tools.registry import ToolSpec
from bot.tools.syntax import (
    CallInvalid,
    CallParsed,
    CallStarted,
    TextPiece,
    ToolCall,
    ToolCallParser,
    ToolFormat,
    render_tools,
    tool_format,
)
from bot.types import Controls, Phase, ReplyStatus, SessionKey, log_name
from bot.wording import (
    TOOL_DENIED_RESULT,
    TOOL_TIMED_OUT_RESULT,
    tool_approval_timed_out,
    tool_asking,
    tool_call_unreadable,
    tool_denied,
    tool_not_offered,
    tool_rounds_used,
    tool_running,
    tools_used,
)

if TYPE_CHECKING:
    from bot.engine.embedded import Engine
    from bot.tools.results import ToolResult

__all__ = ["ToolCaller", "ToolRounds", "ToolRunner", "Toolbox"]

log = logging.getLogger(__name__)

ROUND_SEPARATOR = "\n\n"  # between the text of two rounds of one reply


class ToolCaller(Protocol):
    """What the loop needs of the tool servers (`bot.tools.ToolSupervisor`)."""

    def tools(self) -> list[ToolSpec]: ...

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult: ...


@dataclass(frozen=True)
class Toolbox:
    """The tool servers, and the access policy that holds their grants (``[[tools.allow]]``, one list for every
    platform: `AccessPolicy.tools_for` decides)."""

    caller: ToolCaller
    access: AccessPolicy
    settings: ToolsSettings

    def offered(self, key: SessionKey | str, actor: Actor, *, can_ask: bool = False) -> list[ToolSpec]:
        """The tools the model is offered in conversation ``key`` answering ``actor``. Tools that need the
        user's approval are left out where the reply cannot ask for it (``can_ask``: Run / Deny buttons)."""
        return [
            tool
            for tool in self.access.tools_for(actor, Place.of(key), self.caller.tools())
            if can_ask or not tool.confirm
        ]


@dataclass
class _Round:
    """What one round of the model's output held."""

    raw: str = ""  # everything the model wrote, calls included (fed back as its turn)
    calls: list[ToolCall] = field(default_factory=list)
    invalid: list[CallInvalid] = field(default_factory=list)
    ours: bool = False  # we cancelled the generation: a call was written, or its grammar takes over


class ToolRunner:
    """Runs one tool call of a reply, whatever engine wrote it: the user's approval first for a ``confirm``
    tool, the status naming it while it runs (stoppable), and its record as a tool message."""

    def __init__(
        self, store: Store, metrics: Metrics, *, clock: Callable[[], float], approvals: Approvals | None = None
    ) -> None:
        self.approvals = approvals or Approvals()
        self._store = store
        self._metrics = metrics
        self._clock = clock

    async def _call(
        self,
        request: Request,
        exchange: Exchange,
        box: Toolbox,
        tools: list[ToolSpec],
        call: ToolCall,
        round_number: int,
        used: list[str],
        notes: list[str],
    ) -> str | None:
        """Run ``call`` while the reply's status names it (after the user's Run, for a ``confirm`` tool); its
        result as the model reads it (None: stopped). A call not run leaves a line in ``notes``."""
        spec = next((tool for tool in tools if tool.name == call.name), None)
        verdict = Verdict.RUN
        if spec is not None and spec.confirm:
            verdict_or_stop = await self._approval(request, box, spec)
            if verdict_or_stop is None:
                return None
            verdict = verdict_or_stop
        if spec is None:  # not offered here: never run, whatever the model wrote
            text, is_error = tool_not_offered(call.name), True
        elif verdict is not Verdict.RUN:
            text, is_error = (TOOL_DENIED_RESULT if verdict is Verdict.DENY else TOOL_TIMED_OUT_RESULT), True
            notes.append(
                tool_denied(spec.title)
                if verdict is Verdict.DENY
                else tool_approval_timed_out(spec.title, box.settings.approval_timeout)
            )
        else:
            if request.ended is not None:
                return None
            status = ReplyStatus(Phase.TOOL, tool=spec.title)
            if request.text.strip():
                request.delivery.update(f"{request.text}\n\n{tool_running(spec.title)}")
            else:
                request.delivery.status(status)
            request.state = State.GENERATING
            task = request.tool_call = asyncio.create_task(
                box.caller.call(call.name, call.arguments), name=f"tool {call.name}"
            )
            try:
                result = await task
            except asyncio.CancelledError:
                if request.ended is not None and task.cancelled():
                    return None  # /stop, /reset or shutdown ended the call
                raise
            finally:
                request.tool_call = None
                request.delivery.update(request.text)
            text, is_error = result.text, result.is_error
            used.append(spec.title)
        try:
            await self._store.add_tool_call(
                StoredToolCall(
                    exchange.reply_id,
                    round_number,
                    call.name,
                    json.dumps(dict(call.arguments), ensure_ascii=False),
                    text,
                    is_error,
                )
            )
        except LlamarelayError as exc:  # the reply goes on; only the record of the call is lost
            log.warning("could not store a tool call in %s: %s", log_name(request.key), exc)
        return text

    async def _approval(self, request: Request, box: Toolbox, spec: ToolSpec) -> Verdict | None:
        """Ask the user (Run / Deny buttons under the reply) whether ``spec`` may run; None when /stop ended
        the reply while it waited."""
        if request.ended is not None:
            return None
        pending = self.approvals.open(request.key, request.author_id, spec.title)
        if request.text.strip():
            request.delivery.update(f"{request.text}\n\n{tool_asking(spec.title)}")
        else:
            request.delivery.status(ReplyStatus(Phase.APPROVAL, tool=spec.title))
        request.delivery.controls(Controls(stop=True, approval=pending.id))
        task = request.tool_call = self.approvals.wait(pending, box.settings.approval_timeout)
        try:
            return await task
        except asyncio.CancelledError:
            if request.ended is not None and task.cancelled():
                return None
            raise
        finally:
            request.tool_call = None
            request.delivery.controls(Controls(stop=True))
            request.delivery.update(request.text)

    async def _checkpoint(self, request: Request) -> None:
        if request.reply_id is None:
            return
        try:
            await self._store.checkpoint(request.reply_id, request.text)
        except LlamarelayError as exc:
            log.warning("could not checkpoint a reply in %s: %s", log_name(request.key), exc)


class ToolRounds(ToolRunner):
    """Runs a reply whose model is offered tools, round by round, on the embedded engine."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        approvals: Approvals | None = None,
    ) -> None:
        super().__init__(store, metrics, clock=clock, approvals=approvals)
        self._engine = engine
        self._format: tuple[object, ToolFormat | None] = (None, None)

    def format(self) -> ToolFormat:
        """The model's tool-call syntax, read from its chat template once."""
        template = self._engine.chat_template
        if self._format[0] is not template or self._format[1] is None:
            self._format = (template, tool_format(template.source))
        assert self._format[1] is not None
        return self._format[1]

    def offer(self, system: str, tools: Sequence[ToolSpec]) -> str:
        """The system prompt with ``tools`` offered in the model's syntax."""
        return (
            f"{system}\n\n{render_tools(tools, self.format().syntax)}"
            if system
            else render_tools(tools, self.format().syntax)
        )

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
        """Answer with ``prompt`` (whose system prompt offers ``tools``): (status, ``notes`` + its own)."""
        syntax = self.format().syntax
        messages = [dict(m) for m in prompt.messages]
        current = prompt
        used: list[str] = []
        request.text = exchange.prefix
        rounds = 0
        final = False
        while True:
            round_, generation = await self._round(
                request,
                current,
                sampling,
                syntax,
                tools,
                first=rounds == 0,
                prefix=exchange.prefix if rounds == 0 else "",
            )
            if request.ended is not None or request.delivery.failed or not (round_.calls or round_.invalid):
                status, own = outcome(request, generation, request.text)
                return status, notes + own + ([tools_used(used)] if used else [])
            if final:  # no tools were offered, and it asked for one anyway
                status = Status.COMPLETE if request.text.strip() else Status.FAILED
                return status, notes + [tool_rounds_used(rounds), *([tools_used(used)] if used else [])]
            rounds += 1
            responses: list[str] = []
            for call in round_.calls:
                result = await self._call(request, exchange, box, tools, call, rounds, used, notes)
                if result is None:  # stopped while it ran
                    return Status.STOPPED, notes + [request.ended or ""] + ([tools_used(used)] if used else [])
                responses.append(result)
            responses += [tool_call_unreadable(bad.reason) for bad in round_.invalid]
            messages += [
                {"role": "assistant", "content": round_.raw},
                {"role": "user", "content": "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in responses)},
            ]
            if rounds >= box.settings.max_rounds:  # one more round to answer, without tools
                final = True
                messages[0] = {"role": "system", "content": plain_system}
            request.state = State.PROMPTING
            tokens = await asyncio.to_thread(self._engine.chat_tokens, messages)
            # The same images (their user turns keep their places): a model that reads them sees them each round.
            current = dataclasses.replace(
                prompt, messages=[dict(m) for m in messages], tokens=tokens, prefix="", turns_from=None
            )

    async def _round(
        self,
        request: Request,
        prompt: Prompt,
        sampling: SamplingSettings,
        syntax: Any,
        tools: list[ToolSpec],
        *,
        first: bool,
        prefix: str,
    ) -> tuple[_Round, Generation]:
        """One generation, streamed into the reply's text until it ends or writes a tool call. Once a call's
        opening is written, the rest of the call is generated again under the tools' grammar (unless the
        conversation's own grammar rules every token, or the prompt has images: they go with the prompt as built)."""
        round_ = _Round(raw=prefix)
        parser = ToolCallParser(syntax)
        separate = not first and bool(request.text.strip())
        timer = TokenTimer(self._metrics, self._clock)
        saved_at = self._clock()
        tokens: list[int] | None = None  # set once the call's opening is appended to the prompt
        while True:
            generation = request.generation = self._engine.submit(
                prompt if tokens is None else tokens, sampling, session=request.key
            )
            request.state = State.QUEUED
            round_.ours = False
            switch: str | None = None
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
                elif isinstance(event, str) and not round_.ours:
                    timer.text_arrived()
                    round_.raw += event
                    for parsed in parser.feed(event):
                        if isinstance(parsed, TextPiece):
                            text = parsed.text
                            if separate:
                                text, separate = text.lstrip(), not text.strip()
                                text = ROUND_SEPARATOR + text if text else ""
                            request.text += text
                            request.delivery.update(request.text)
                        elif isinstance(parsed, CallStarted):
                            opening = self.format().opening
                            if not sampling.grammar and not prompt.images and opening in round_.raw:
                                switch = round_.raw[: round_.raw.index(opening)]
                                round_.ours = True
                                generation.cancel()
                                break  # what followed the opening is generated again
                        elif isinstance(parsed, CallParsed):
                            round_.calls.append(parsed.call)
                        elif isinstance(parsed, CallInvalid):
                            round_.invalid.append(parsed)
                    if (round_.calls or round_.invalid) and not parser.in_call and not round_.ours:
                        round_.ours = True  # the call is complete: whatever follows is not read
                        generation.cancel()
                    if self._clock() - saved_at >= CHECKPOINT_SECONDS:
                        saved_at = self._clock()
                        await self._checkpoint(request)
            self._metrics.tokens_generated.inc(generation.n_generated)
            self._metrics.prompt_tokens.inc(len(prompt.tokens if tokens is None else tokens))
            self._metrics.prompt_tokens_reused.inc(generation.n_prompt_reused)
            if switch is not None and request.ended is None and not request.delivery.failed:
                # The call's JSON, generated again from its opening under the grammar of the offered tools.
                from bot.tools.grammar import (
                    call_grammar,  # llama.cpp's converter: only for the embedded engine
                )

                opening = self.format().opening
                round_.raw = switch + opening
                parser = ToolCallParser(syntax)
                parser.feed(opening)  # inside the call, with nothing after its opening yet
                tokens = (
                    list(prompt.tokens)
                    + self._engine.tokenize(switch[len(prefix) :])
                    + self._engine.tokenize(opening, special=True)
                )
                sampling = sampling.model_copy(update={"grammar": call_grammar(tools, syntax)})
                prefix = ""
                continue
            if not round_.ours:
                for parsed in parser.finish():
                    if isinstance(parsed, TextPiece):
                        request.text += (ROUND_SEPARATOR if separate and parsed.text.strip() else "") + (
                            parsed.text.lstrip() if separate else parsed.text
                        )
                    elif isinstance(parsed, CallParsed):
                        round_.calls.append(parsed.call)
                    elif isinstance(parsed, CallInvalid):
                        round_.invalid.append(parsed)
                request.delivery.update(request.text)
            return round_, generation
