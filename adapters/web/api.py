"""The JSON API under /api/: conversations of this browser, their history, sending (streamed, with files),
regenerate and continue (streamed), stop, reset.

Every handler works only on the conversations of the namespace the server's middleware found for the
request (the browser's id cookie, or the token's namespace for Bearer clients; see `adapters.web.server`),
so one browser can never read, stream to or stop another's. Bad input raises `ApiError`, which the server
turns into a 4xx JSON answer.

Over 400 lines: every route of the page's JSON API, each a few lines over the manager.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from adapters.http import HttpError
from adapters.web.events import EventStreamTarget, encode_event, json_dumps
from adapters.web.uploads import FORM_TYPE, MAX_FILES, UploadError, read_form
from bot.access import AccessPolicy, Action, Actor, Place, Refusal
from bot.config import Secrets, Settings
from bot.conversations import ConversationManager, RedoRefusal, ReplyResult, can_continue
from bot.errors import LlamarelayError
from bot.store import StoredMessage
from bot.text import clean_text, one_line
from bot.types import Attachment, ImagePart, Incoming, SessionKey, log_name
from bot.wording import NOTHING_TO_CONTINUE, STALE_REPLY, refusal_text

__all__ = [
    "ApiError",
    "LoginThrottle",
    "WebState",
    "STATE",
    "BROWSER_COOKIE",
    "AUTH_COOKIE",
    "current_browser",
    "json_response",
    "routes",
    "set_cookie",
]

log = logging.getLogger(__name__)

PLATFORM = "web"
MAX_MESSAGE_CHARS = 20_000  # about the whole context window of a 4k-token model; longer is refused
MAX_SYSTEM_PROMPT_CHARS = 20_000  # as [conversation] system_prompt in config.toml
MAX_LISTED_CONVERSATIONS = 200
TITLE_CHARS = 60
MAX_MODEL_NAME_CHARS = 64  # as [[models]] name

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{8,32}")
JSON_TYPES = ("application/json",)

BROWSER_COOKIE = "llamarelay_browser"
AUTH_COOKIE = "llamarelay_auth"
COOKIE_MAX_AGE_SECONDS = 400 * 24 * 3600  # the longest browsers keep a cookie

LOGIN_FAILURES_ALLOWED = 5  # wrong tokens one client may send per window before /api/login answers 429
LOGIN_WINDOW_SECONDS = 60.0
LOGIN_CLIENTS_TRACKED = 10_000  # bounds the throttle's memory under a spray from many addresses

# Set by the server's middleware for each request: the namespace (browser id) its conversations live in;
# "" when the request has none yet (a new browser, before its first conversation).
current_browser: contextvars.ContextVar[str] = contextvars.ContextVar("current_browser")


class ApiError(HttpError):
    """A request the API refuses: becomes ``{"error": code, "message": message}`` with ``status``."""


class LoginThrottle:
    """Counts failed logins per client: after `LOGIN_FAILURES_ALLOWED` in `LOGIN_WINDOW_SECONDS`, the client
    waits until the oldest of them ages out, so guessing the token stays hopeless."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float:
        """Seconds ``client`` must wait before trying again; 0 when it may try now."""
        failures = self._failures.get(client)
        if failures is None or len(failures) < LOGIN_FAILURES_ALLOWED:
            return 0.0
        return max(0.0, failures[0] + LOGIN_WINDOW_SECONDS - self.clock())

    def failed(self, client: str) -> None:
        now = self.clock()
        for known in [c for c, times in self._failures.items() if times[-1] + LOGIN_WINDOW_SECONDS <= now]:
            del self._failures[known]
        while len(self._failures) >= LOGIN_CLIENTS_TRACKED:  # the least recently failing ones go first
            del self._failures[next(iter(self._failures))]
        failures = self._failures.pop(client, None) or deque(maxlen=LOGIN_FAILURES_ALLOWED)
        failures.append(now)
        self._failures[client] = failures

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


@dataclass
class WebState:
    """What the handlers share: the core, the settings, and the login throttle."""

    manager: ConversationManager
    settings: Settings
    secrets: Secrets
    login_throttle: LoginThrottle = field(default_factory=LoginThrottle)
    # The core's access policy: no lists here (the access token is the web's door), asked all the same, so a
    # rule added there (a rate limit, issue 23's tools) reaches the web as it reaches every platform.
    policy: AccessPolicy = field(default_factory=AccessPolicy)

    @property
    def auth_digest(self) -> str | None:
        """Value of the auth cookie once the token was given; changes whenever the token does."""
        token = self.secrets.web_token
        if not token:
            return None
        return hmac.new(token.encode(), b"llamarelay web session", "sha256").hexdigest()

    @property
    def token_namespace(self) -> str | None:
        """Where ``Authorization: Bearer`` clients keep their conversations: derived from the token, so it is
        the same on every call without a cookie jar, as secret as the token, and new when the token changes."""
        token = self.secrets.web_token
        if not token:
            return None
        digest = hmac.new(token.encode(), b"llamarelay web api namespace", "sha256").digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def follow(self, key: SessionKey, target: EventStreamTarget, reply: Coroutine[Any, Any, ReplyResult]) -> None:
        """Run ``reply`` in a task the core holds, so a closed tab or dropped connection never cuts it short,
        and give ``target`` its ``done`` event when it ends."""

        def close(task: asyncio.Task[ReplyResult]) -> None:
            if task.cancelled():
                target.close(None, "The server is shutting down; the reply was cut short.")
            elif task.exception() is not None:  # a bug: the core turns every known failure into a reply line
                log.error("web reply in %s failed", log_name(key), exc_info=task.exception())
                target.close(None, "The reply failed because of an internal error.")
            else:
                target.close(task.result())

        self.manager.in_background(reply).add_done_callback(close)


STATE = web.AppKey("llamarelay_web_state", WebState)


# -- helpers -------------------------------------------------------------------------------------------


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json_dumps(data), status=status, content_type="application/json")


def set_cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, *, samesite: str = "Strict"
) -> None:
    """A cookie scripts cannot read (HttpOnly); Secure when the page was reached over HTTPS."""
    response.set_cookie(
        name,
        value,
        max_age=COOKIE_MAX_AGE_SECONDS,
        path="/",
        httponly=True,
        samesite=samesite,
        secure=is_https(request),
    )


def is_https(request: web.Request) -> bool:
    """True over TLS, or behind a TLS-terminating proxy trusted by ``[web] trust_forwarded_proto``."""
    if request.secure:
        return True
    if not _state(request).settings.web.trust_forwarded_proto:
        return False
    forwarded = request.headers.get("X-Forwarded-Proto", "")
    return forwarded.split(",")[0].strip().lower() == "https"


def _new_browser(request: web.Request, response: web.StreamResponse) -> str:
    """Give this browser its id. Only a conversation's creation does this, never a page load: a page opened
    from another site's link may arrive without the cookie, and must not replace the id the browser has.
    SameSite=Lax, so such a page load does carry it; other sites' requests are refused by Origin checks."""
    browser = secrets.token_urlsafe(32)
    set_cookie(request, response, BROWSER_COOKIE, browser, samesite="Lax")
    return browser


def _state(request: web.Request) -> WebState:
    return request.app[STATE]


def _key(browser: str, conversation: str) -> SessionKey:
    # The browser id is the secret that keeps browsers apart: logs name a conversation by `log_name(key)`.
    return SessionKey.for_channel(PLATFORM, browser, conversation)


def _prefix(browser: str) -> str:
    # Built from SessionKey itself, so the store's key format stays SessionKey's business.
    return str(_key(browser, "_"))[:-1]


async def _conversation(request: web.Request) -> tuple[str, SessionKey]:
    """The conversation named in the URL, if it belongs to this browser; 404 otherwise (never 403: no hints)."""
    conversation = request.match_info["conversation"]
    browser = current_browser.get()
    key = _key(browser, conversation) if browser and CONVERSATION_ID.fullmatch(conversation) else None
    if key is None or not await _state(request).manager.exists(key):
        raise ApiError(404, "unknown_conversation", "No such conversation in this browser.")
    return conversation, key


async def _json_body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    if optional and not request.can_read_body:
        return {}
    if request.content_type not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "Send the body as JSON (Content-Type: application/json).")
    try:
        # Bytes, not request.text(): json.loads detects UTF-8/16/32 itself, whatever charset the header claims.
        body = json.loads(await request.read())
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The body must be a JSON object.")
    return body


def _text_field(body: dict[str, Any], name: str, limit: int, *, nullable: bool = False) -> str | None:
    value = body.get(name)
    if value is None and nullable and name in body:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"'{name}' must be a string.")
    if len(value) > limit:
        raise ApiError(413, "too_long", f"'{name}' is {len(value):,} characters; the limit is {limit:,}.")
    return value


def _title(first_message: str) -> str:
    return one_line(first_message, TITLE_CHARS, whole_words=True)


def _message(m: StoredMessage, images: list[str] | None = None, *, tool_details: bool = False) -> dict[str, Any]:
    return {
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "status": m.status,
        "created_at": m.created_at,
        "notes": m.notes.splitlines(),
        "can_continue": can_continue(m),
        "images": images or [],
        "tool_details": tool_details,
        "model": m.model,
    }


_REFUSALS = {
    RedoRefusal.STALE: STALE_REPLY,
    RedoRefusal.NOTHING_TO_CONTINUE: NOTHING_TO_CONTINUE,
    RedoRefusal.BUSY: "An answer is still being written in this conversation; stop it or wait for it to finish.",
}


async def _check(request: web.Request, action: Action) -> None:
    """Ask the access policy for this browser (the actor) in its conversation, which is its own as a DM is;
    a refusal is an `ApiError` carrying the policy's words."""
    decision = await _state(request).policy.check(Actor(current_browser.get()), Place(dm=True), action)
    if decision.refusal is None:
        return
    if decision.refusal is Refusal.TOO_FAST:
        raise ApiError(
            429,
            decision.refusal.value,
            refusal_text(decision),
            headers={"Retry-After": str(max(1, math.ceil(decision.retry_after)))},
        )
    raise ApiError(403, decision.refusal.value, refusal_text(decision))


async def _reply_to_redo(request: web.Request, key: SessionKey, *, to_continue: bool) -> StoredMessage:
    """The reply named by the body's ``reply_id``, if Regenerate (or Continue) may act on it now; 409 if not,
    so a page showing an old state learns it at once (the core would refuse it too, in the stream)."""
    reply_id = (await _json_body(request)).get("reply_id")
    if not isinstance(reply_id, int) or isinstance(reply_id, bool):
        raise ApiError(400, "invalid_field", "'reply_id' must be the id of the conversation's latest answer.")
    manager = _state(request).manager
    refusal = await manager.redo_refusal(key, reply_id, continuing=to_continue)
    latest = await manager.latest_reply(key) if refusal is None else None
    if latest is None or latest.id != reply_id:
        refusal = refusal or RedoRefusal.STALE
        raise ApiError(409, refusal.value, _REFUSALS[refusal])
    return latest


async def _stream(request: web.Request, key: SessionKey, target: EventStreamTarget) -> web.StreamResponse:
    """Send ``target``'s events as Server-Sent Events until ``done``; a browser that leaves ends only this."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    async for event in target.events():
        try:
            await response.write(b": keep-alive\n\n" if event is None else encode_event(*event))
        except ConnectionError:
            log.info("browser left %s while it streamed; the reply goes on and is stored", log_name(key))
            return response
    await response.write_eof()
    return response


def _target(request: web.Request, prefix: str = "") -> EventStreamTarget:
    return EventStreamTarget(min_edit_interval=_state(request).settings.web.edit_interval, prefix=prefix)


# -- handlers ------------------------------------------------------------------------------------------

routes = web.RouteTableDef()


@routes.get("/api/info")
async def info(request: web.Request) -> web.Response:
    state = _state(request)
    status = state.manager.status().engine
    return json_response(
        {
            "model": status.model_name,
            "queue_length": status.queue_length,
            "running": status.running,
            "max_message_chars": MAX_MESSAGE_CHARS,
            "max_system_prompt_chars": MAX_SYSTEM_PROMPT_CHARS,
            "max_files": MAX_FILES,
            "max_file_bytes": state.settings.conversation.max_file_bytes,
            "max_images": state.manager.images.limits.max_count,
            "max_image_bytes": state.manager.images.limits.max_bytes,
            "default_system_prompt": state.settings.conversation.system_prompt,
            "models": [
                {"name": m.name, "description": m.description, "default": m.is_default, "vision": m.capabilities.vision}
                for m in state.manager.model_choices()
            ],
        }
    )


@routes.post("/api/login")
async def login(request: web.Request) -> web.Response:
    """Exchange the access token for an HttpOnly cookie, so the page asks for it only once."""
    state = _state(request)
    digest = state.auth_digest
    response = json_response({"authenticated": True})
    if digest is None:
        return response
    client = request.remote or ""
    wait = state.login_throttle.retry_after(client)
    if wait > 0:
        seconds = math.ceil(wait)
        raise ApiError(
            429,
            "too_many_attempts",
            f"Too many wrong tokens; try again in {seconds} seconds.",
            headers={"Retry-After": str(seconds)},
        )
    token = _text_field(await _json_body(request), "token", 1000)
    assert token is not None and state.secrets.web_token
    if not hmac.compare_digest(token.encode(), state.secrets.web_token.encode()):
        state.login_throttle.failed(client)
        raise ApiError(401, "invalid_token", "That access token is not the one in LLAMARELAY_WEB_TOKEN.")
    state.login_throttle.succeeded(client)
    set_cookie(request, response, AUTH_COOKIE, digest)
    return response


@routes.get("/api/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    """This browser's conversations, newest first, from one summary query (no conversation is read whole)."""
    browser = current_browser.get()
    if not browser:
        return json_response({"conversations": []})
    prefix = _prefix(browser)
    summaries = await _state(request).manager.conversations(prefix, MAX_LISTED_CONVERSATIONS)
    listed = [
        {"id": key[len(prefix) :], "title": _title(first) or "New chat", "messages": count}
        for key, first, count in summaries
        if CONVERSATION_ID.fullmatch(key[len(prefix) :])
    ]
    return json_response({"conversations": listed})


@routes.post("/api/conversations")
async def create_conversation(request: web.Request) -> web.Response:
    """Start an empty conversation; the body may hold ``system_prompt``."""
    body = await _json_body(request, optional=True)
    prompt = _text_field(body, "system_prompt", MAX_SYSTEM_PROMPT_CHARS) if "system_prompt" in body else None
    response = json_response({}, status=201)
    browser = current_browser.get() or _new_browser(request, response)
    conversation = secrets.token_urlsafe(12)
    key = _key(browser, conversation)
    manager = _state(request).manager
    # Writing the session's settings is what creates it in the store.
    await manager.set_system_prompt(key, prompt)
    response.text = json_dumps(
        {"id": conversation, "title": "New chat", "messages": 0, "system_prompt": await manager.system_prompt(key)}
    )
    return response


@routes.get("/api/conversations/{conversation}")
async def get_conversation(request: web.Request) -> web.Response:
    conversation, key = await _conversation(request)
    manager = _state(request).manager
    messages = await manager.history(key)
    first = next((m.content for m in messages if m.role == "user"), "")
    latest = await manager.latest_reply(key)
    pictures = await manager.image_names([m.id for m in messages if m.role == "user"])
    with_tools = await manager.with_tool_calls(m.id for m in messages if m.role == "assistant")
    return json_response(
        {
            "id": conversation,
            "title": _title(first) or "New chat",
            "system_prompt": await manager.system_prompt(key),
            "model": await manager.model_name(key),
            "position": manager.status(key).position,
            "latest_reply": latest.id if latest is not None else None,
            "messages": [_message(m, pictures.get(m.id), tool_details=m.id in with_tools) for m in messages],
        }
    )


@routes.post("/api/conversations/{conversation}/messages")
async def send_message(request: web.Request) -> web.StreamResponse:
    """Store the message and stream the reply as Server-Sent Events (status, delta, replace, done).

    The body is ``{"text"}`` as JSON, or a form (multipart/form-data) with ``text`` and ``file`` parts.
    """
    _, key = await _conversation(request)
    state = _state(request)
    files: tuple[Attachment, ...] = ()
    images: tuple[ImagePart, ...] = ()
    if request.content_type == FORM_TYPE:
        intake = state.manager.images
        try:
            text, files, sent = await read_form(
                request,
                max_chars=MAX_MESSAGE_CHARS,
                max_file_bytes=state.settings.conversation.max_file_bytes,
                max_image_bytes=intake.limits.max_bytes,
                max_images=intake.limits.max_count,
            )
        except UploadError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        images, skipped = await intake.read(
            sent, name_of=lambda image: image[0], size_of=lambda image: len(image[1]), fetch=_sent_bytes
        )
        files += skipped
    else:
        text = _text_field(await _json_body(request), "text", MAX_MESSAGE_CHARS) or ""
    if not clean_text(text) and not files and not images:
        raise ApiError(400, "empty_message", "The message is empty.")
    await _check(request, Action.ASK)
    target = _target(request)
    # One person per browser conversation: no speaker name goes before their words.
    incoming = Incoming(key, current_browser.get(), "", text, attachments=files, images=images)
    state.follow(key, target, state.manager.respond(incoming, target))
    return await _stream(request, key, target)


async def _sent_bytes(image: tuple[str, bytes]) -> bytes:
    return image[1]  # an uploaded image is here already


@routes.post("/api/conversations/{conversation}/regenerate")
async def regenerate(request: web.Request) -> web.StreamResponse:
    """Answer the last message again (body ``{"reply_id"}``): the new answer replaces the old one in the
    history. Streamed like …/messages; ``409`` when that answer is no longer the latest or one is running."""
    _, key = await _conversation(request)
    reply = await _reply_to_redo(request, key, to_continue=False)
    await _check(request, Action.ASK)
    state, target = _state(request), _target(request)
    state.follow(key, target, state.manager.regenerate(key, target, reply.id))
    return await _stream(request, key, target)


@routes.post("/api/conversations/{conversation}/continue")
async def continue_reply(request: web.Request) -> web.StreamResponse:
    """Let the model go on with the latest answer (body ``{"reply_id"}``) when it was cut by the length limit
    or stopped. The stream opens with the answer so far (``replace``), then grows it like …/messages."""
    _, key = await _conversation(request)
    reply = await _reply_to_redo(request, key, to_continue=True)
    await _check(request, Action.ASK)
    state, target = _state(request), _target(request, prefix=reply.content)
    state.follow(key, target, state.manager.continue_reply(key, target, reply.id))
    return await _stream(request, key, target)


@routes.post("/api/conversations/{conversation}/stop")
async def stop(request: web.Request) -> web.Response:
    """End the running reply and the messages waiting behind it; ``{"stopped"}`` says whether any was."""
    _, key = await _conversation(request)
    return json_response({"stopped": _state(request).manager.stop(key) > 0})


@routes.post("/api/conversations/{conversation}/reset")
async def reset(request: web.Request) -> web.Response:
    """Forget the messages (the system prompt stays)."""
    _, key = await _conversation(request)
    await _state(request).manager.reset(key)
    return json_response({"reset": True})


@routes.put("/api/conversations/{conversation}/system_prompt")
async def set_system_prompt(request: web.Request) -> web.Response:
    """Set the conversation's system prompt; ``null`` (or an empty text) restores the default."""
    _, key = await _conversation(request)
    prompt = _text_field(await _json_body(request), "system_prompt", MAX_SYSTEM_PROMPT_CHARS, nullable=True)
    await _check(request, Action.SET_SYSTEM_PROMPT)
    manager = _state(request).manager
    await manager.set_system_prompt(key, prompt if prompt and prompt.strip() else None)
    return json_response({"system_prompt": await manager.system_prompt(key)})


@routes.put("/api/conversations/{conversation}/model")
async def set_model(request: web.Request) -> web.Response:
    """Choose the model that answers the conversation from its next message on (body ``{"model": name}``, a
    name `/api/info` lists); 400 naming an unknown one."""
    _, key = await _conversation(request)
    name = _text_field(await _json_body(request), "model", MAX_MODEL_NAME_CHARS)
    await _check(request, Action.SET_MODEL)
    try:
        chosen = await _state(request).manager.set_model(key, name or "")
    except LlamarelayError as exc:  # not configured: the line names it and the choices
        raise ApiError(400, "unknown_model", str(exc)) from None
    return json_response({"model": chosen.name})
