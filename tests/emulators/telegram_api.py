"""A small Telegram Bot API server for tests, served over loopback.

rolebot's Telegram platform is tested through python-telegram-bot's (PTB) real HTTP path: PTB
is pointed at this emulator with ``ApplicationBuilder().base_url(tg.base_url)``, and the test
plays the users' side (``user_sends``, ``user_clicks``) and inspects what the bot did
(``calls``, ``sent_messages``, ``answered_callbacks``).

Protocol notes (https://core.telegram.org/bots/api#making-requests), and why the emulator does
what it does:

* Requests go to ``/bot<TOKEN>/<method>``; method names are case-insensitive. Parameters come
  as a query string, form fields (urlencoded or multipart) or a JSON body. PTB 22 sends form
  fields in which every non-string value is a JSON-encoded string (``"123"``, ``"true"``,
  ``'{"inline_keyboard": ...}'``), so form values are JSON-decoded here, except for the
  parameters that are strings by definition (``text``, ``callback_query_id``, ...): a user may
  well write "123" or "true".
* Every answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code": N,
  "description": "...", "parameters": {...}}``. PTB maps the HTTP status to its exceptions (400
  ``BadRequest``, 401/404 ``InvalidToken``, 403 ``Forbidden``, 409 ``Conflict``, others
  ``NetworkError``) and ``parameters.retry_after`` to ``RetryAfter``; so the status and the body
  both matter, and error descriptions copy the real API's wording.
* ``getUpdates`` is long polling: it answers at once when updates are queued, otherwise when
  one arrives or ``timeout`` seconds pass. Updates stay queued until a later call confirms them
  with ``offset`` = last update_id + 1. A second concurrent ``getUpdates`` ends the first with
  409 Conflict, as on the real server.
* Message ids are counted per chat and shared by the user's and the bot's messages, as in
  private chats.

Not emulated: files and media, inline mode, webhooks (``setWebhook``), payments, chat
management, entity parsing (``parse_mode`` is recorded and ignored; lengths are counted on the
raw text), ``allowed_updates`` filtering. Unknown methods answer 404 "Not Found" (like the real
API, which PTB reports as ``InvalidToken``) and are listed in ``tg.unknown_methods``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Parameters that are strings in the Bot API; their form values are never JSON-decoded.
_STRING_PARAMS = frozenset({
    "text", "caption", "parse_mode", "callback_query_id", "inline_message_id", "action",
    "url", "language_code", "business_connection_id", "message_effect_id", "description",
    "short_description", "name", "emoji", "secret_token", "ip_address", "query",
})

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)
CONFLICT = (
    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is "
    "running"
)
QUERY_INVALID = (
    "Bad Request: query is too old and response timeout expired or query ID is invalid"
)
MAX_TEXT = 4096          # UTF-16 code units, after entity parsing on the real server
MAX_CALLBACK_DATA = 64   # bytes
EDIT_METHODS = ("editMessageText", "editMessageReplyMarkup")
_DEFAULT_DESCRIPTIONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    409: CONFLICT,
    500: "Internal Server Error",
}
_GATEWAY_PAGE = (  # what Telegram's nginx front answers when the backend is away: not JSON
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


class ApiError(Exception):
    """An error answer: HTTP status, description, optional ``parameters`` object."""

    def __init__(self, status: int, description: str, parameters: JSON | None = None):
        super().__init__(description)
        self.status, self.description, self.parameters = status, description, parameters


class _Drop(Exception):
    """Cut the connection without answering (a reset, as seen by the client)."""


class Call(tuple):
    """One request as received: unpacks as ``(method, params)``.

    Extra attributes: ``at`` (``time.monotonic()`` when it arrived) and ``status`` (the HTTP
    status answered; 0 for a dropped connection, None while still in progress).
    """

    def __new__(cls, method: str, params: JSON, at: float):
        self = super().__new__(cls, (method, params))
        self.at, self.status = at, None
        return self

    method = property(lambda self: self[0])
    params = property(lambda self: self[1])

    def __repr__(self) -> str:
        return f"Call({self.method!r}, {self.params!r}, status={self.status})"


@dataclass
class Version:
    """One state of a bot message: as sent, then after each edit."""

    text: str
    reply_markup: JSON | None
    at: float


@dataclass
class BotMessage:
    """A message the bot sent, with its edit history (``history[0]`` is as sent)."""

    chat_id: int
    message_id: int
    date: int
    history: list[Version]
    reply_to_message_id: int | None = None
    parse_mode: str | None = None
    edit_date: int | None = None
    deleted: bool = False

    @property
    def text(self) -> str:
        return self.history[-1].text

    @property
    def reply_markup(self) -> JSON | None:
        return self.history[-1].reply_markup

    @property
    def edits(self) -> int:
        return len(self.history) - 1

    @property
    def buttons(self) -> list[tuple[str, str | None]]:
        """The inline keyboard flattened to ``(text, callback_data)`` pairs."""
        rows = (self.reply_markup or {}).get("inline_keyboard", [])
        return [(b.get("text"), b.get("callback_data")) for row in rows for b in row]


@dataclass
class _Fault:
    status: int
    description: str | None = None
    retry_after: float | None = None
    drop: bool = False


@dataclass
class _FloodControl:
    min_interval: float
    methods: frozenset[str]
    retry_after: float
    last: dict[int, float] = field(default_factory=dict)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _decode(key: str, raw: str) -> Any:
    if key in _STRING_PARAMS:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class TelegramEmulator:
    """A Bot API server on 127.0.0.1 (random free port) for one bot token.

    Use ``async with TelegramEmulator(token="123:ABC") as tg:`` and give PTB
    ``tg.base_url`` / ``tg.base_file_url``. All state lives on the test's event loop.
    """

    def __init__(self, token: str = "123:ABC", *, username: str = "rolebot_test_bot",
                 first_name: str = "RoleBot"):
        self.token = token
        self.me: JSON = {
            "id": int(token.split(":", 1)[0]), "is_bot": True, "first_name": first_name,
            "username": username, "can_join_groups": True,
            "can_read_all_group_messages": False, "supports_inline_queries": False,
            "can_connect_to_business": False, "has_main_web_app": False,
        }
        self.calls: list[Call] = []
        self.answered_callbacks: list[JSON] = []   # answerCallbackQuery params, in order
        self.flood_violations: list[Call] = []     # calls refused by flood_control()
        self.unknown_methods: list[str] = []
        self.commands: dict[str, list[JSON]] = {}  # key: json of (scope, language_code)
        self.latency = 0.0                         # seconds added before each answer
        self.port: int | None = None
        self._chats: dict[int, JSON] = {}
        self._users: dict[int, JSON] = {}
        self._user_messages: dict[tuple[int, int], JSON] = {}
        self._bot_messages: dict[tuple[int, int], BotMessage] = {}
        self._next_message_id: dict[int, itertools.count] = defaultdict(lambda: itertools.count(1))
        self._update_ids = itertools.count(1000)
        self._callback_ids = itertools.count(5_000_000_000)
        self._updates: list[JSON] = []
        self._pending_queries: set[str] = set()
        self._faults: dict[str, deque[_Fault]] = defaultdict(deque)
        self._flood: _FloodControl | None = None
        self._poller: object | None = None
        self._changed = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._methods: dict[str, Callable[[JSON], Any]] = {
            name.lower(): getattr(self, "_m_" + name) for name in (
                "getMe", "logOut", "close", "deleteWebhook", "getWebhookInfo", "getUpdates",
                "sendMessage", "editMessageText", "editMessageReplyMarkup", "deleteMessage",
                "sendChatAction", "answerCallbackQuery", "setMyCommands", "getMyCommands",
                "deleteMyCommands",
            )
        }

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        """Value for PTB's ``base_url``: PTB appends the token, then ``/<method>``."""
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("*", "/file/bot{token}/{path:.*}", self._handle_file)
        # Short shutdown: long polls are woken on stop(), nothing else should be pending.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        self._closing = True
        self._notify()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TelegramEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- the user's side

    async def user_sends(self, chat_id: int, user_id: int, text: str, *,
                         chat_type: str = "private", first_name: str = "Alice",
                         username: str | None = None, chat_title: str = "Test group",
                         reply_to_message_id: int | None = None,
                         entities: list[JSON] | None = None) -> JSON:
        """Queue a ``message`` update from a user; returns the message dict.

        A text starting with ``/`` gets a ``bot_command`` entity over its first word (what
        PTB's ``CommandHandler`` looks for), unless ``entities`` is given.
        """
        user = self._user(user_id, first_name, username)
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat |= {k: v for k, v in user.items() if k in ("first_name", "username")}
        else:
            chat["title"] = chat_title
        self._chats[chat_id] = chat
        message = {"message_id": next(self._next_message_id[chat_id]), "from": user,
                   "chat": chat, "date": int(time.time()), "text": text}
        if entities is None and text.startswith("/"):
            entities = [{"type": "bot_command", "offset": 0,
                         "length": _utf16_len(text.split(maxsplit=1)[0])}]
        if entities:
            message["entities"] = entities
        if reply_to_message_id is not None:
            message["reply_to_message"] = self._message_dict(chat_id, reply_to_message_id)
        self._user_messages[(chat_id, message["message_id"])] = message
        self._queue_update("message", message)
        return message

    async def user_clicks(self, chat_id: int, user_id: int, message_id: int, data: str, *,
                          first_name: str | None = None) -> str:
        """Queue a ``callback_query`` update for a button on a bot message; returns its id."""
        msg = self._bot_messages.get((chat_id, message_id))
        if msg is None or msg.deleted:
            raise KeyError(f"no bot message {message_id} in chat {chat_id}")
        query_id = str(next(self._callback_ids))
        self._pending_queries.add(query_id)
        self._queue_update("callback_query", {
            "id": query_id, "from": self._user(user_id, first_name), "data": data,
            "message": self._bot_message_dict(msg), "chat_instance": f"-{chat_id}",
        })
        return query_id

    # ---------------------------------------------------------------- what the bot did

    def sent_messages(self, chat_id: int, *, include_deleted: bool = False) -> list[BotMessage]:
        """The bot's messages in a chat, oldest first. The objects are live: later edits show
        up in them, so a ``wait_for`` predicate may hold on to one."""
        return [m for (c, _), m in sorted(self._bot_messages.items())
                if c == chat_id and (include_deleted or not m.deleted)]

    def last_message(self, chat_id: int) -> BotMessage | None:
        messages = self.sent_messages(chat_id)
        return messages[-1] if messages else None

    def calls_to(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def call_times(self, method: str, chat_id: int | None = None, *,
                   ok_only: bool = True) -> list[float]:
        """Arrival times (monotonic) of calls to ``method``, e.g. to check edit pacing."""
        return [c.at for c in self.calls_to(method)
                if (chat_id is None or c.params.get("chat_id") == chat_id)
                and (not ok_only or c.status == 200)]

    @property
    def pending_updates(self) -> list[JSON]:
        """Updates not yet confirmed by an ``offset``."""
        return list(self._updates)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate()`` (re-checked on every change of state) is truthy.

        Returns its value; raises ``AssertionError`` listing the last calls on timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed = self._changed
            if result := predicate():
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = "\n  ".join(map(repr, self.calls[-10:]))
                raise AssertionError(
                    f"condition not met within {timeout}s; last calls:\n  {recent}")
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_for_call(self, method: str, predicate: Callable[[Call], Any] = bool,
                            timeout: float = 5.0, *, after: int = 0) -> Call:
        """Wait for a finished call to ``method`` (index ``>= after`` in ``calls``)."""
        def found() -> Call | None:
            return next((c for c in self.calls[after:] if c.method.lower() == method.lower()
                         and c.status is not None and predicate(c)), None)
        return await self.wait_for(found, timeout)

    # ---------------------------------------------------------------- fault injection

    def fail_next(self, method: str, status: int = 429, *, retry_after: float | None = None,
                  description: str | None = None, times: int = 1) -> None:
        """Answer the next ``times`` calls to ``method`` with an error.

        429 carries ``parameters.retry_after`` (default 2 s), which PTB raises as
        ``RetryAfter``; 502/503/504 answer nginx's HTML page (PTB: ``NetworkError``); other
        statuses a JSON error with ``description``. A ``getUpdates`` poll that is already
        waiting takes the fault at once.
        """
        if status == 429 and retry_after is None:
            retry_after = 2
        for _ in range(times):
            self._faults[method.lower()].append(_Fault(status, description, retry_after))
        self._notify()

    def drop_connections(self, times: int = 1, *, method: str = "getUpdates") -> None:
        """Cut the connection of the next ``times`` calls to ``method`` without an answer.

        PTB (httpx) sees the server disconnect and raises ``NetworkError``. A waiting
        ``getUpdates`` poll is cut at once: a dropped long poll.
        """
        for _ in range(times):
            self._faults[method.lower()].append(_Fault(0, drop=True))
        self._notify()

    def flood_control(self, min_interval: float | None, *, methods: Iterable[str] = EDIT_METHODS,
                      retry_after: float = 1) -> None:
        """Refuse calls to ``methods`` that come sooner than ``min_interval`` s after the last
        accepted one in the same chat, with 429 (Telegram's flood control, about one message
        per second per chat). Refused calls are listed in ``flood_violations``. ``None`` turns
        it off.
        """
        self._flood = None if min_interval is None else _FloodControl(
            min_interval, frozenset(m.lower() for m in methods), retry_after)

    # ---------------------------------------------------------------- HTTP plumbing

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return _error_response(ApiError(401, "Unauthorized"))
        name = request.match_info["method"]
        try:
            params = await _read_params(request)
        except ValueError as exc:
            return _error_response(ApiError(400, f"Bad Request: {exc}"))
        call = Call(name, params, time.monotonic())
        self.calls.append(call)
        try:
            result = await self._dispatch(name.lower(), call)
            response = web.json_response({"ok": True, "result": result})
        except ApiError as exc:
            response = _error_response(exc)
        except _Drop:
            call.status = 0
            self._notify()
            request.transport.abort()  # the client sees a reset; aiohttp ignores our reply
            return web.Response(status=500)
        call.status = response.status
        self._notify()
        return response

    async def _dispatch(self, name: str, call: Call) -> Any:
        handler = self._methods.get(name)
        if handler is None:
            self.unknown_methods.append(call.method)
            log.warning("Telegram emulator: unknown method %r", call.method)
            raise ApiError(404, "Not Found")
        if name != "getupdates":  # getUpdates checks its faults while it waits
            self._raise_fault(name)
            if self.latency:
                await asyncio.sleep(self.latency)
        self._check_flood(name, call)
        return await handler(call.params)

    async def _handle_file(self, request: web.Request) -> web.Response:
        return _error_response(ApiError(404, "Not Found"))

    def _raise_fault(self, name: str) -> None:
        faults = self._faults.get(name)
        if not faults:
            return
        fault = faults.popleft()
        if fault.drop:
            raise _Drop
        if fault.status == 429:
            raise ApiError(429, f"Too Many Requests: retry after {fault.retry_after}",
                           {"retry_after": fault.retry_after})
        description = fault.description or _DEFAULT_DESCRIPTIONS.get(fault.status, "Error")
        raise ApiError(fault.status, description)

    def _check_flood(self, name: str, call: Call) -> None:
        flood = self._flood
        if flood is None or name not in flood.methods:
            return
        chat_id, now = call.params.get("chat_id"), time.monotonic()
        last = flood.last.get(chat_id)
        if last is not None and now - last < flood.min_interval:
            self.flood_violations.append(call)
            raise ApiError(429, f"Too Many Requests: retry after {flood.retry_after}",
                           {"retry_after": flood.retry_after})
        flood.last[chat_id] = now

    def _notify(self) -> None:
        """Wake everything waiting on a change of state (long polls, wait_for)."""
        self._changed.set()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- state helpers

    def _user(self, user_id: int, first_name: str | None = None,
              username: str | None = None) -> JSON:
        user = self._users.setdefault(
            user_id, {"id": user_id, "is_bot": False, "first_name": first_name or "Alice"})
        if first_name:
            user["first_name"] = first_name
        if username:
            user["username"] = username
        return dict(user)

    def _queue_update(self, kind: str, payload: JSON) -> None:
        self._updates.append({"update_id": next(self._update_ids), kind: payload})
        self._notify()

    def _chat(self, params: JSON) -> int:
        chat_id = params.get("chat_id")
        if isinstance(chat_id, str) and chat_id.lstrip("-").isdigit():
            chat_id = int(chat_id)  # JSON clients may send ids as strings
        if chat_id not in self._chats:
            raise ApiError(400, "Bad Request: chat not found")
        return chat_id

    def _bot_message(self, params: JSON, verb: str = "edit") -> BotMessage:
        if "inline_message_id" in params:
            raise ApiError(400, "Bad Request: inline messages are not emulated")
        key = (self._chat(params), params.get("message_id"))
        msg = self._bot_messages.get(key)
        if msg is None or msg.deleted:
            if key in self._user_messages:
                raise ApiError(400, f"Bad Request: message can't be {verb}ed")
            raise ApiError(400, f"Bad Request: message to {verb} not found")
        return msg

    def _message_dict(self, chat_id: int, message_id: int) -> JSON | None:
        if (chat_id, message_id) in self._user_messages:
            message = dict(self._user_messages[(chat_id, message_id)])
            message.pop("reply_to_message", None)  # Telegram never nests replies
            return message
        msg = self._bot_messages.get((chat_id, message_id))
        return self._bot_message_dict(msg, nested=False) if msg else None

    def _bot_message_dict(self, msg: BotMessage, nested: bool = True) -> JSON:
        message = {"message_id": msg.message_id, "from": dict(self.me),
                   "chat": self._chats[msg.chat_id], "date": msg.date, "text": msg.text}
        if msg.edit_date:
            message["edit_date"] = msg.edit_date
        if msg.reply_markup and "inline_keyboard" in msg.reply_markup:
            message["reply_markup"] = msg.reply_markup  # only inline keyboards are echoed
        if nested and msg.reply_to_message_id is not None:
            reply = self._message_dict(msg.chat_id, msg.reply_to_message_id)
            if reply:
                message["reply_to_message"] = reply
        return message

    # ---------------------------------------------------------------- Bot API methods

    async def _m_getMe(self, params: JSON) -> JSON:
        return dict(self.me)

    async def _m_logOut(self, params: JSON) -> bool:
        return True

    async def _m_close(self, params: JSON) -> bool:
        return True

    async def _m_deleteWebhook(self, params: JSON) -> bool:
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _m_getWebhookInfo(self, params: JSON) -> JSON:
        return {"url": "", "has_custom_certificate": False,
                "pending_update_count": len(self._updates)}

    async def _m_getUpdates(self, params: JSON) -> list[JSON]:
        offset = int(params.get("offset") or 0)
        if offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        elif offset < 0:
            self._updates = self._updates[offset:]
        limit = min(max(int(params.get("limit") or 100), 1), 100)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params.get("timeout") or 0)
        self._poller = me = object()
        self._notify()  # ends an older poll with 409
        while True:
            changed = self._changed
            if self._poller is not me:
                raise ApiError(409, CONFLICT)
            self._raise_fault("getupdates")
            remaining = deadline - loop.time()
            if self._updates or remaining <= 0 or self._closing:
                self._poller = None
                return self._updates[:limit]
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def _m_sendMessage(self, params: JSON) -> JSON:
        chat_id = self._chat(params)
        text = self._check_text(params)
        markup = self._check_markup(params.get("reply_markup"))
        reply = params.get("reply_parameters") or {}
        reply_to = reply.get("message_id", params.get("reply_to_message_id"))
        if reply_to is not None and self._message_dict(chat_id, reply_to) is None:
            if not reply.get("allow_sending_without_reply",
                             params.get("allow_sending_without_reply")):
                raise ApiError(400, "Bad Request: message to be replied not found")
            reply_to = None
        msg = BotMessage(chat_id, next(self._next_message_id[chat_id]), int(time.time()),
                         [Version(text, markup, time.monotonic())], reply_to,
                         params.get("parse_mode"))
        self._bot_messages[(chat_id, msg.message_id)] = msg
        return self._bot_message_dict(msg)

    async def _m_editMessageText(self, params: JSON) -> JSON:
        msg = self._bot_message(params)
        text = self._check_text(params)
        # As on the real API, an edit without reply_markup removes the inline keyboard.
        return self._edit(msg, text, self._check_markup(params.get("reply_markup")))

    async def _m_editMessageReplyMarkup(self, params: JSON) -> JSON:
        msg = self._bot_message(params)
        return self._edit(msg, msg.text, self._check_markup(params.get("reply_markup")))

    def _edit(self, msg: BotMessage, text: str, markup: JSON | None) -> JSON:
        if text == msg.text and markup == msg.reply_markup:
            raise ApiError(400, NOT_MODIFIED)
        msg.history.append(Version(text, markup, time.monotonic()))
        msg.edit_date = int(time.time())
        return self._bot_message_dict(msg)

    async def _m_deleteMessage(self, params: JSON) -> bool:
        self._bot_message(params, verb="delete").deleted = True
        return True

    async def _m_sendChatAction(self, params: JSON) -> bool:
        self._chat(params)
        if not params.get("action"):
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    async def _m_answerCallbackQuery(self, params: JSON) -> bool:
        query_id = str(params.get("callback_query_id"))
        if query_id not in self._pending_queries:
            raise ApiError(400, QUERY_INVALID)
        self._pending_queries.discard(query_id)
        self.answered_callbacks.append(dict(params, callback_query_id=query_id))
        return True

    async def _m_setMyCommands(self, params: JSON) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list) or len(commands) > 100:
            raise ApiError(400, "Bad Request: commands must be a list of at most 100")
        for c in commands:
            name, desc = c.get("command", ""), c.get("description", "")
            if not (1 <= len(name) <= 32 and all(ch.isascii() and (ch.islower() or ch.isdigit()
                                                 or ch == "_") for ch in name)):
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(desc) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        self.commands[self._commands_key(params)] = commands
        return True

    async def _m_getMyCommands(self, params: JSON) -> list[JSON]:
        return self.commands.get(self._commands_key(params), [])

    async def _m_deleteMyCommands(self, params: JSON) -> bool:
        self.commands.pop(self._commands_key(params), None)
        return True

    @staticmethod
    def _commands_key(params: JSON) -> str:
        scope = params.get("scope") or {"type": "default"}
        return json.dumps([scope, params.get("language_code") or ""], sort_keys=True)

    @staticmethod
    def _check_text(params: JSON) -> str:
        text = params.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if _utf16_len(text) > MAX_TEXT:
            raise ApiError(400, "Bad Request: message is too long")
        return text

    @staticmethod
    def _check_markup(markup: Any) -> JSON | None:
        if markup is None:
            return None
        if not isinstance(markup, dict):
            raise ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object")
        for row in markup.get("inline_keyboard", []):
            for button in row:
                data = button.get("callback_data")
                if data is not None and not 1 <= len(data.encode()) <= MAX_CALLBACK_DATA:
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        return markup


async def _read_params(request: web.Request) -> JSON:
    """Query string, form (urlencoded or multipart) or JSON body, as typed values."""
    params: JSON = {k: _decode(k, v) for k, v in request.query.items()}
    if not request.body_exists:
        return params
    if request.content_type == "application/json":
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("JSON body must be an object")
        params.update(body)
    else:
        form = await request.post()
        params.update({k: v if isinstance(v, web.FileField) else _decode(k, v)
                       for k, v in form.items()})
    return params


def _error_response(exc: ApiError) -> web.Response:
    if exc.status in (502, 503, 504):
        reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Time-out"}
        page = _GATEWAY_PAGE.format(status=exc.status, reason=reason[exc.status])
        return web.Response(status=exc.status, text=page, content_type="text/html")
    body: JSON = {"ok": False, "error_code": exc.status, "description": exc.description}
    if exc.parameters:
        body["parameters"] = exc.parameters
    return web.json_response(body, status=exc.status)
