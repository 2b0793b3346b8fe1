"""The local web chat (aiohttp): a chat page, an OpenAI-compatible chat endpoint, ratings, and an
admin API behind a bearer token.

| method and path              | what it does                                                    |
|------------------------------|-----------------------------------------------------------------|
| GET  /                       | the chat page (streams replies, 👍/👎 under each); sets the      |
|                              | visitor's signed session cookie                                 |
| POST /v1/chat/completions    | OpenAI chat completions, streaming or not                       |
| GET  /v1/models              | the cast: one model per character (``model`` picks who answers) |
| POST /api/ratings            | ``{"message_id", "value": 1 or -1}``: a reply in your own chat  |
| GET  /api/conversation       | your current conversation: messages, alternatives, your ratings |
| POST /api/keep               | ``{"message_id"}``: go on from this alternative (◀ ▶)           |
| POST /api/stop               | stop the reply being written in your chat                       |
| GET  /api/admin/status       | JSON status (admin token)                                       |
| POST /api/admin/retrain      | start a retrain (admin token)                                   |
| POST /api/admin/rollback     | serve the previous adapter version (admin token)                |

``/retry`` as the message regenerates the last reply (a new alternative, streamed like any
reply); ``/stop`` stops one. Before any handler reads a request, ``web_guard`` refuses a ``Host`` that is
not this server's (421), another site's request (403) and a body not sent as JSON (415). Who the caller
is comes from ``web_auth``: the session cookie, an API key, the admin token, or (only on a loopback
server with no keys) the ``user`` field. An answer to a request whose session cookie was issued more
than a day ago carries a new one for the same id (``[web] session_days`` after the last use, then
it expires). Only the last user message of a
chat request is new: the conversation the model sees is the one the store holds for that user,
so earlier messages in the request are not used. A client that disconnects cancels its reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from bot.config import Config, secret
from bot.logs import ServerLogs, keep_secret
from bot.platforms import Options
from bot.platforms.web_auth import (COOKIE, Authenticator, Identity, Revocations, Unauthorized, is_loopback, load_keys,
                                    load_secret, revocations_path)
from bot.platforms.web_guard import Guard
from bot.service import Answer, IncomingMessage, NotSetUp, Overrides, Reply, Service, UnknownMessage, clean_label
from bot.status import as_json
from training.errors import UserError

log = logging.getLogger(__name__)

PLATFORM = "web"
# A 1 MB message must reach the service (which cuts it and says so), not die as a 413.
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_ID = 2**63 - 1  # SQLite's largest integer
# The largest max_tokens taken (then capped to [generation] max_new_tokens): beyond any model's
# context, and what OpenAI's own API refuses with a 400 too.
MAX_TOKENS = 2**31 - 1
# How an answer that is not a reply maps to HTTP: (status, OpenAI error type, code).
ANSWER_ERRORS = {
    "empty": (400, "invalid_request_error", "empty_message"),
    "rate_limited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "busy": (503, "server_error", "busy"),
    "unavailable": (503, "server_error", "unavailable"),
    "error": (500, "server_error", "reply_failed"),
}


class BadRequest(Exception):
    """A request the client must fix; becomes a 400 with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatRequest:
    user: str | None  # the user field: who an open local API or a many-user key speaks for
    text: str
    stream: bool
    include_usage: bool
    overrides: Overrides
    model: str | None = None  # the character who answers (a cast member's name or alias)


# How often a waiting handler looks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


def from_config(config: Config, service: Service, options: Options) -> WebChat | None:
    if not config.web.enabled:
        return None
    host = options.host or config.web.host
    keys_file = config.path(config.web.api_keys_file) if config.web.api_keys_file else None
    keys = load_keys(keys_file, config.web.api_keys_env)
    admin_token = secret(config.service.admin_token_env)
    # Never in a log line. API keys are held only as hashes: the Bearer and Authorization
    # patterns of bot.logs redact them.
    keep_secret(admin_token)
    open_api = is_loopback(host) and not keys
    if not open_api and not keys:
        log.warning("[web] host %s is not a loopback address and no API keys are set: the HTTP API refuses "
                    "requests without a key (401); the chat page works with its session cookies. Set keys "
                    "with [web] api_keys_file or $%s", host, config.web.api_keys_env)
    secret_file = config.path(config.web.session_secret)
    session_s = config.web.session_days * 24 * 3600
    auth = Authenticator(secret=load_secret(secret_file), keys=keys,
                         admin_token=admin_token, admins=config.service.admins_web, open_api=open_api,
                         keys_hint=f"[web] api_keys_file or ${config.web.api_keys_env}",
                         session_days=config.web.session_days,
                         revocations=Revocations.open(revocations_path(secret_file), lifetime_s=session_s))
    return WebChat(
        service,
        host=host,
        port=config.web.port if options.port is None else options.port,
        admin_token=admin_token,
        admin_token_env=config.service.admin_token_env,
        auth=auth,
        guard=Guard(loopback_bind=is_loopback(host), allowed_hosts=config.web.allowed_hosts),
        secure_cookies=config.web.secure_cookies,
    )


class WebChat:
    """The web front-end; ``url`` is where it listens once started (port 0: a free port)."""

    name = "web"

    def __init__(self, service: Service, *, host: str, port: int, admin_token: str | None,
                 auth: Authenticator, admin_token_env: str = "ROLEBOT_ADMIN_TOKEN", guard: Guard | None = None,
                 secure_cookies: bool = False):
        self.service = service
        self.secure_cookies = secure_cookies
        self.auth = auth
        self.guard = guard or Guard(loopback_bind=is_loopback(host))
        self.host = host
        self.port = port
        self.admin_token = admin_token
        self.admin_token_env = admin_token_env
        self._runner: web.AppRunner | None = None
        self._logs = ServerLogs()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors, guarded(self.guard)])
        app.on_response_prepare.append(self._reissue_session)
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/api/ratings", self.rate)
        app.router.add_get("/api/conversation", self.conversation)
        app.router.add_post("/api/keep", self.keep)
        app.router.add_post("/api/stop", self.stop_reply)
        app.router.add_get("/api/admin/status", self.admin_status)
        app.router.add_post("/api/admin/retrain", self.admin_retrain)
        app.router.add_post("/api/admin/rollback", self.admin_rollback)
        return app

    async def start(self) -> None:
        self._logs.install()  # malformed requests as one line, credentials redacted
        self._runner = web.AppRunner(self.application(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._logs.remove()
            raise UserError(f"[web] cannot listen on {self.host}:{self.port}: {exc.strerror or exc} — "
                            "stop what uses that port, or pass --port (0: any free port)") from None
        self.port = self._runner.addresses[0][1]
        log.info("web chat on %s", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._logs.remove()

    # The page

    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("bot.platforms").joinpath("web_page.html").read_text(encoding="utf-8")
        response = web.Response(text=html.replace("{{character}}", self.service.character),
                                content_type="text/html", charset="utf-8")
        if self.auth.session_user(request.cookies.get(COOKIE)) is None:
            # The visitor's identity: an id only this server can sign, which scripts cannot read.
            self._set_session(request, response, self.auth.new_session())
        return response

    def _set_session(self, request: web.Request, response: web.StreamResponse, cookie: str) -> None:
        # As a header, not response.set_cookie: aiohttp turns its cookies into headers before
        # on_response_prepare, where _reissue_session adds one.
        morsel = SimpleCookie({COOKIE: cookie})[COOKIE]
        morsel.update({"max-age": str(self.auth.max_age), "path": "/", "httponly": True, "samesite": "Strict",
                       "secure": self._secure(request)})
        response.headers.add("Set-Cookie", morsel.OutputString())

    def _secure(self, request: web.Request) -> bool:
        """Whether the session cookie is marked Secure (sent back over HTTPS only): with [web]
        secure_cookies, over TLS to this server, or when a TLS proxy in front says
        ``X-Forwarded-Proto: https``. Believing that header from anyone is safe: it can only make
        the cookie stricter (a browser on plain http then does not send it back, which breaks only
        the session of whoever sent the header), never drop Secure where it belongs."""
        forwarded = request.headers.get("X-Forwarded-Proto", "")
        return (self.secure_cookies or request.secure
                or any(proto.strip().lower() == "https" for proto in forwarded.split(",")))

    async def _reissue_session(self, request: web.Request, response: web.StreamResponse) -> None:
        """Before any answer's headers go out (a stream's too): a session cookie issued more than
        a day ago comes back new, so a browser in use stays signed in (``Authenticator.refreshed``)."""
        if response.status >= 400 or any(v.startswith(f"{COOKIE}=") for v in response.headers.getall("Set-Cookie", ())):
            return
        if cookie := self.auth.refreshed(request.cookies.get(COOKIE)):
            self._set_session(request, response, cookie)

    def identify(self, request: web.Request, claimed: str | None) -> Identity:
        """Raises ``Unauthorized``; ``claimed`` is the body's ``user`` field, if any."""
        return self.auth.identify(request.headers.get("Authorization"), request.cookies.get(COOKIE), claimed)

    def _cast(self) -> list[Service]:
        return list(self.service.cast) if self.service.cast is not None else [self.service]

    def speaker(self, name: str | None) -> Service | None:
        """The character called ``name`` (None or empty: the default one). A cast of one answers
        whatever a client names (clients send their own default model names); in a larger cast
        an unknown name is None."""
        cast = self.service.cast
        if not name or cast is None or len(cast) == 1:
            return self.service if not name or cast is None else cast.default
        return cast.get(name)

    def _no_such_model(self, name: str, param: str = "model") -> web.Response:
        known = ", ".join(s.character for s in self._cast())
        return error(404, f"the model {name!r} does not exist: the models are the cast's characters ({known})",
                     "model_not_found", param=param)

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [
            {"id": s.character, "object": "model", "created": 0, "owned_by": "rolebot",
             "rolebot": {"aliases": list(s.config.character.aliases), "adapter_version": s.engine.adapter_version}}
            for s in self._cast()]})

    # Chat

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: the last user message is the new message."""
        try:
            chat = parse_chat(await read_json(request))
            who = self.identify(request, chat.user)
        except BadRequest as exc:
            return error(400, str(exc), exc.code, param=exc.param)
        except Unauthorized as exc:
            return unauthorized(str(exc))
        service = self.speaker(chat.model)
        if service is None:
            return self._no_such_model(chat.model)
        incoming = IncomingMessage(PLATFORM, who.user, who.user, chat.text, admin=who.admin,
                                   address=None if who.keyed else request.remote)
        out = await service.handle(incoming, sampling=chat.overrides)
        if isinstance(out, Answer) and out.kind != "answer":
            status, kind, code = ANSWER_ERRORS[out.kind]
            response = error(status, out.text, code, kind=kind)
            if out.retry_after is not None:
                response.headers["Retry-After"] = str(max(1, math.ceil(out.retry_after)))
            return response
        if chat.stream:
            return await self._stream(request, out, chat, service)
        return await self._complete(request, out, service)

    async def _complete(self, request: web.Request, out: Answer | Reply, service: Service) -> web.Response:
        if isinstance(out, Answer):
            return json_response(completion(f"cmd-{uuid.uuid4().hex}", service.character, out.text))
        async with cancel_on_disconnect(request, out):
            result = await out.result()
        if result.notice and not result.text:  # dropped: it waited too long for a place
            response = error(503, result.notice, "busy", kind="server_error")
            response.headers["Retry-After"] = str(max(1, math.ceil(service.retry_after())))
            return response
        if result.status == "failed" and not result.text:
            return error(500, "the model failed to answer; try again", "reply_failed", kind="server_error")
        body = completion(str(out.message_id), service.character, result.text,
                          finish_reason=finish_reason(result.finish_reason))
        body["usage"] = usage(result)
        body["rolebot"] = extension(out, result.status)
        return json_response(body)

    async def _stream(self, request: web.Request, out: Answer | Reply, chat: ChatRequest,
                      service: Service) -> web.StreamResponse:
        """Server-sent events as OpenAI sends them, ending with ``data: [DONE]``. If the client
        goes away the reply is cancelled; what it had is logged as interrupted."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        model = service.character
        try:
            if isinstance(out, Answer):
                cid = f"cmd-{uuid.uuid4().hex}"
                await send(response, chunk(cid, model, {"role": "assistant", "content": out.text}))
                await send(response, chunk(cid, model, {}, "stop"))
            else:
                cid = str(out.message_id)
                first = chunk(cid, model, {"role": "assistant", "content": ""})
                first["rolebot"] = extension(out, "generating")
                await send(response, first)
                async with cancel_on_disconnect(request, out):
                    async for piece in out:
                        await send(response, chunk(cid, model, {"content": piece}))
                result = await out.result()
                if result.notice and not result.text:
                    await send(response, chunk(cid, model, {"content": result.notice}))
                last = chunk(cid, model, {}, finish_reason(result.finish_reason))
                last["rolebot"] = extension(out, result.status)
                await send(response, last)
                if chat.include_usage:
                    await send(response, {**chunk(cid, model, {}), "choices": [], "usage": usage(result)})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            if isinstance(out, Reply):
                out.cancel()
            log.info("a web client left before its reply ended")
        return response

    # Ratings

    async def rate(self, request: web.Request) -> web.Response:
        """POST /api/ratings ``{"message_id": 12, "value": 1}``; again changes it. The rater is
        who the request authenticates as (the ``user`` field counts only where the chat endpoint
        takes it); only a reply in the rater's own chat can be rated."""
        try:
            body = await read_json(request)
            message_id = parse_message_id(body.get("message_id"))
            claimed = parse_user(body.get("user")) if body.get("user") is not None else None
            value = body.get("value")
            if type(value) is not int or value not in (1, -1):
                raise BadRequest(f"value must be 1 (👍) or -1 (👎), not {value!r}", "value", "invalid_value")
            user = self.identify(request, claimed).user
        except BadRequest as exc:
            return error(400, str(exc), exc.code, param=exc.param)
        except Unauthorized as exc:
            return unauthorized(str(exc))
        try:
            rating = await self.service.rate(PLATFORM, user, message_id, value, chat_id=user)
        except UnknownMessage as exc:
            return error(404, str(exc), "unknown_message", param="message_id")
        except UserError as exc:
            return error(400, str(exc), "invalid_rating", param="message_id")
        return json_response({"message_id": message_id, "user": user, "value": rating.value,
                              "rated_at": rating.rated_at})

    # The conversation (the page's history after a reload, ◀ ▶, stop)

    def _who(self, request: web.Request, body: dict | None = None) -> Identity:
        claimed = body.get("user") if body else request.query.get("user")
        return self.identify(request, parse_user(claimed) if claimed is not None else None)

    async def conversation(self, request: web.Request) -> web.Response:
        """GET /api/conversation: the user's current conversation, oldest first."""
        try:
            who = self._who(request)
        except BadRequest as exc:
            return error(400, str(exc), exc.code, param=exc.param)
        except Unauthorized as exc:
            return unauthorized(str(exc))
        name = request.query.get("character")
        service = self.speaker(name)
        if service is None:
            return self._no_such_model(name, "character")
        await service.greet(PLATFORM, who.user)  # a new conversation opens with the greeting
        turns = await service.conversation(PLATFORM, who.user, who.user)
        return json_response({"character": service.character, "turns": [plain(t) for t in turns],
                              "cast": [s.character for s in self._cast()]})

    async def keep(self, request: web.Request) -> web.Response:
        """POST /api/keep ``{"message_id": 12}``: the conversation goes on from that alternative."""
        try:
            body = await read_json(request)
            message_id = parse_message_id(body.get("message_id"))
            who = self._who(request, body)
        except BadRequest as exc:
            return error(400, str(exc), exc.code, param=exc.param)
        except Unauthorized as exc:
            return unauthorized(str(exc))
        service = self.speaker(body.get("character") if isinstance(body.get("character"), str) else None)
        if service is None:
            return self._no_such_model(body.get("character"), "character")
        try:
            kept = await service.keep(PLATFORM, who.user, message_id)
        except UnknownMessage as exc:
            return error(404, str(exc), "unknown_message", param="message_id")
        except UserError as exc:
            return error(409, str(exc), "not_keepable", param="message_id")
        return json_response({"message_id": kept.id, "user_message_id": kept.reply_to})

    async def stop_reply(self, request: web.Request) -> web.Response:
        """POST /api/stop: the reply being written in the caller's chat ends at the next step."""
        try:
            body = await read_json(request) if request.can_read_body else {}
            who = self._who(request, body)
        except BadRequest as exc:
            return error(400, str(exc), exc.code, param=exc.param)
        except Unauthorized as exc:
            return unauthorized(str(exc))
        return json_response({"stopped": any(s.stop(PLATFORM, who.user) for s in self._cast())})

    # Admin

    def _refused(self, request: web.Request) -> web.Response | None:
        """A 401 unless the request carries the admin token; nothing else happens then."""
        if self.admin_token is None:
            message = f"the admin API is off: set the environment variable {self.admin_token_env}"
        else:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.admin_token.encode()):
                return None
            message = "missing or wrong admin token: send Authorization: Bearer <token>"
        response = error(401, message, "invalid_admin_token", kind="authentication_error")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    async def admin_status(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        body = as_json(await self.service.status())
        if self.service.cast is not None and len(self.service.cast) > 1:
            body["cast"] = [as_json(await s.status()) for s in self.service.cast]
        return json_response(body)

    async def admin_retrain(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        name = request.query.get("character")
        service = self.speaker(name)
        if service is None:
            return self._no_such_model(name, "character")
        try:
            run = await service.retrain(f"{PLATFORM}:admin-token")
        except NotSetUp as exc:
            return error(503, str(exc), "retrain_not_set_up", kind="server_error")
        except UserError as exc:
            return error(409, str(exc), "retrain_running")
        return json_response({"run": plain(run)}, status=202)

    async def admin_rollback(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        try:
            version = await self.service.rollback()
        except UserError as exc:
            return error(409, str(exc), "rollback_impossible")
        return json_response({"active_version": version})


# Requests


async def read_json(request: web.Request) -> dict:
    """The body as a JSON object. Invalid UTF-8 inside it becomes U+FFFD, as in a message."""
    raw = await request.read()
    try:
        body = json.loads(raw.decode("utf-8", "replace"), parse_constant=_no_constant)
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply to be a request (arrays or objects inside each other)",
                         code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    return body


def _no_constant(name: str):
    """Python's JSON reader takes NaN and Infinity, which JSON has not; no number may be one."""
    raise ValueError(f"{name} is not a JSON number")


def parse_chat(body: dict) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        raise BadRequest("the last message must have role 'user': it is the new message", "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string: the character who answers (GET /v1/models lists them)", "model")
    return ChatRequest(
        model=model.strip() or None if model is not None else None,
        user=parse_user(body.get("user")) if body.get("user") is not None else None,
        text=content_text(last.get("content")),
        stream=stream,
        include_usage=options.get("include_usage") is True,
        overrides=Overrides(
            max_tokens=number(body, "max_completion_tokens", low=1, high=MAX_TOKENS, integer=True)
            or number(body, "max_tokens", low=1, high=MAX_TOKENS, integer=True),
            temperature=number(body, "temperature", low=0.0, high=2.0),
            top_p=number(body, "top_p", low=0.01, high=1.0),
        ),
    )


def content_text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    raise BadRequest("the last message's content must be text", "messages")


def parse_user(value: Any) -> str:
    if isinstance(value, str):
        value = clean_label(value)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BadRequest("user must be a non-empty string of at most 256 characters (control characters "
                         "do not count)", "user", "invalid_user")
    return value


def parse_message_id(value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_MESSAGE_ID:
        raise BadRequest(f"message_id must be a reply's id (a positive integer), not {value!r}",
                         "message_id", "invalid_message_id")
    return value


def number(body: dict, key: str, *, low: float, high: float | None = None, integer: bool = False):
    """An optional numeric field from ``low`` to ``high``; None when absent. JSON integers have no
    size limit: one of 400 digits is compared as the integer it is (``math.isfinite`` would
    convert it to a float and raise ``OverflowError``), and the message shows only its start."""
    value = body.get(key)
    if value is None:
        return None
    numeric = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    finite = numeric and (isinstance(value, int) or math.isfinite(value))
    if not finite or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'} {bounds}, not {_shown(value)}", key)
    return value if integer else float(value)


def _shown(value: Any) -> str:
    """A client's value for an error message: at most 40 characters of its repr."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"{'a negative' if value < 0 else 'an'} integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class cancel_on_disconnect:
    """While the block runs, a client that disconnects cancels ``reply`` (its place in the engine
    goes to someone who is still there). aiohttp does not cancel handlers on disconnect, so the
    transport is looked at every DISCONNECT_POLL_S."""

    def __init__(self, request: web.Request, reply: Reply):
        self.request, self.reply = request, reply
        self._task: asyncio.Task | None = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            transport = self.request.transport
            if transport is None or transport.is_closing():
                log.info("a web client left; reply %d is cancelled", self.reply.message_id)
                self.reply.cancel()
                return

    async def __aenter__(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def __aexit__(self, *exc_info) -> None:
        self._task.cancel()


# Responses


def unauthorized(message: str) -> web.Response:
    response = error(401, message, "invalid_api_key", kind="authentication_error")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def completion(cid: str, model: str, text: str, finish_reason: str = "stop") -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
    }


def chunk(cid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def extension(reply: Reply, status: str) -> dict:
    """rolebot's own fields beside OpenAI's (clients ignore them). ``replaces``: the reply a
    regenerate replaces."""
    return {"user_message_id": reply.user_message_id, "adapter_version": reply.adapter_version,
            "notice": reply.notice, "status": status,
            "replaces": reply.replaces.id if reply.replaces is not None else None}


def finish_reason(engine_reason: str) -> str:
    # OpenAI knows "stop" and "length"; an interrupted reply (shutdown) ended without a limit.
    return "length" if engine_reason == "length" else "stop"


async def send(response: web.StreamResponse, data: dict) -> None:
    await response.write(f"data: {dumps(data)}\n\n".encode())


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=str)


def plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=dumps)


def error(status: int, message: str, code: str, *, kind: str = "invalid_request_error",
          param: str | None = None) -> web.Response:
    """An OpenAI-style error body; the official client raises it as the matching APIError."""
    return json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def guarded(guard: Guard):
    """The middleware that refuses, before any handler reads the request, a Host that is not
    this server's (421), another site's request (403) and a body not sent as JSON (415)."""

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if refusal := guard.host(request.headers.get("Host")):
            return error(421, refusal, "misdirected_request")
        if refusal := guard.origin(request.method, request.path, request.headers):
            return error(403, refusal, "cross_site_request")
        if refusal := guard.content(request.method, request.path, request.headers, request.body_exists):
            return error(415, refusal, "unsupported_media_type")
        return await handler(request)

    return check


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413) and any bug become JSON errors, never a crash."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason if exc.status != 413 else
                     f"the body is larger than {MAX_BODY_BYTES} bytes", exc.reason.lower().replace(" ", "_"))
    except (ConnectionResetError, aiohttp.ClientPayloadError) as exc:
        # The client went away before its request was read or answered: nobody to answer.
        log.info("%s %s: the client left (%s)", request.method, request.path, type(exc).__name__)
        return web.Response(status=499)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error(500, "internal error; the server log says more", "internal_error", kind="server_error")
