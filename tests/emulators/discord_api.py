"""A loopback Discord for tests: REST API v10 and the gateway, served by aiohttp on 127.0.0.1.

rolebot's Discord front-end is plain discord.py. There is no network here, so this emulator speaks
enough of Discord's protocol for discord.py 2.7 to log in, connect, receive events and call the
endpoints a chat bot uses. Tests act as Discord users and read back what the bot did:

    async with DiscordEmulator() as dc:
        with dc.patch_discord():
            client = make_the_product_client()
            await client.login(dc.bot_token)
            task = asyncio.create_task(client.connect())
            await client.wait_until_ready()
            await dc.user_sends("hello", user_id=42, mention_bot=True)
            reply = await dc.wait_for(lambda: dc.sent_messages and dc.sent_messages[-1], timeout=5)

What Discord does and the emulator copies, because a bot that works here must work there:
- REST replies carry exactly ``Content-Type: application/json`` (discord.py reads anything else
  as text), 429s carry ``Via`` and ``retry_after`` (without ``Via`` discord.py assumes a
  Cloudflare ban), errors carry Discord's JSON error codes (50035 for a message over 2,000
  characters, 40060 for a second interaction response, 10062 after the 3 s acknowledge window).
- The gateway sends HELLO, answers heartbeats, sends READY then GUILD_CREATE, numbers every
  dispatch, compresses with one zlib stream per connection, replays missed events on RESUME
  and withholds events and message content that the IDENTIFY intents did not ask for.
- The bot's own messages, edits and reactions come back to it over the gateway, as on Discord,
  so a bot that answers itself loops here too.
- Channel webhooks need Manage Webhooks (the bot's role, less what a channel's overwrites deny);
  a webhook's messages are authored by the webhook (``webhook_id``, a ``bot`` author named as
  the post asked), so only the webhook may edit or delete them, never the bot's own routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from aiohttp import WSMsgType, web

API = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000

# Gateway opcodes.
DISPATCH, HEARTBEAT, IDENTIFY, PRESENCE_UPDATE, RESUME = 0, 1, 2, 3, 6
INVALID_SESSION, HELLO, HEARTBEAT_ACK = 9, 10, 11

# Intent bits; the privileged ones must also be switched on in the developer portal.
GUILD_MEMBERS = 1 << 1
GUILD_WEBHOOKS = 1 << 5
GUILD_PRESENCES = 1 << 8
GUILD_MESSAGES = 1 << 9
GUILD_MESSAGE_REACTIONS = 1 << 10
DIRECT_MESSAGES = 1 << 12
DIRECT_MESSAGE_REACTIONS = 1 << 13
MESSAGE_CONTENT = 1 << 15
PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT

# Which intent a dispatch needs, for a guild event and for a DM event.
EVENT_INTENTS = {
    "MESSAGE_CREATE": (GUILD_MESSAGES, DIRECT_MESSAGES),
    "MESSAGE_UPDATE": (GUILD_MESSAGES, DIRECT_MESSAGES),
    "MESSAGE_REACTION_ADD": (GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGE_REACTIONS),
    "MESSAGE_REACTION_REMOVE": (GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGE_REACTIONS),
    "MESSAGE_REACTION_REMOVE_ALL": (GUILD_MESSAGE_REACTIONS, DIRECT_MESSAGE_REACTIONS),
    "MESSAGE_DELETE": (GUILD_MESSAGES, DIRECT_MESSAGES),
    "WEBHOOKS_UPDATE": (GUILD_WEBHOOKS, GUILD_WEBHOOKS),
}

# Permission bits for the roles of the emulated guild.
ADMINISTRATOR = 1 << 3
MEMBER_PERMISSIONS = sum(1 << b for b in (6, 10, 11, 14, 15, 16, 17, 18, 31))  # react, view, send, embed, ...
MANAGE_MESSAGES = 1 << 13
MANAGE_WEBHOOKS = 1 << 29
BOT_PERMISSIONS = MEMBER_PERMISSIONS | MANAGE_MESSAGES
WEBHOOK_INCOMING = 1

BODY = web.RequestKey("body", object)  # the request's JSON, read once by the middleware
MESSAGE_LIMIT = 2000
FLAG_EPHEMERAL, FLAG_LOADING = 1 << 6, 1 << 7
RESPONSE_MESSAGE, RESPONSE_DEFER = 4, 5

USER_MENTION = re.compile(r"<@!?(\d+)>")
EVERYONE_MENTION = re.compile(r"@(everyone|here)\b")
COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    """Discord's JSON reply. The Content-Type must be exactly application/json (no charset)."""
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def discord_error(status: int, code: int, message: str) -> web.Response:
    """An API error as Discord shapes it; discord.py exposes `code` as HTTPException.code."""
    return json_response({"message": message, "code": code}, status)


class DiscordError(Exception):
    """Raised inside handlers; the middleware turns it into Discord's error reply."""

    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ---------------------------------------------------------------- what the bot did


@dataclass
class Edit:
    content: str
    at: float  # time.monotonic()
    payload: dict


@dataclass
class SentMessage:
    """A message the bot created (channel send, interaction response or follow-up)."""

    id: int
    channel_id: int
    content: str  # as it reads now, after any edits
    at: float  # time.monotonic() of creation
    payload: dict  # the JSON discord.py sent
    flags: int = 0
    pinged_user_ids: list[int] = field(default_factory=list)
    pings_everyone: bool = False
    interaction_id: int | None = None
    webhook_id: int | None = None  # posted through a channel webhook (not by the bot's own routes)
    edits: list[Edit] = field(default_factory=list)
    deleted: bool = False  # DELETEd since; it stays listed in sent_messages

    @property
    def versions(self) -> list[str]:
        """Every content the message showed, first to last."""
        return [self.payload.get("content") or ""] + [e.content for e in self.edits]

    @property
    def reply_to(self) -> int | None:
        ref = self.payload.get("message_reference")
        return int(ref["message_id"]) if ref else None

    @property
    def allowed_mentions(self) -> dict | None:
        return self.payload.get("allowed_mentions")

    @property
    def username(self) -> str | None:
        """The name a webhook post asked to show instead of the webhook's own."""
        return self.payload.get("username")

    @property
    def avatar_url(self) -> str | None:
        return self.payload.get("avatar_url")

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)


@dataclass
class InteractionResponse:
    type: int  # 4 = message, 5 = deferred ("thinking"), 6/7 = component updates, 9 = modal
    data: dict
    at: float


@dataclass
class InteractionRecord:
    """One slash-command invocation and everything the bot answered to it."""

    id: int
    token: str
    command: str
    user_id: int
    channel_id: int
    options: dict
    at: float
    responses: list[InteractionResponse] = field(default_factory=list)
    original: SentMessage | None = None
    followups: list[SentMessage] = field(default_factory=list)

    @property
    def deferred(self) -> bool:
        return any(r.type == RESPONSE_DEFER for r in self.responses)


@dataclass
class TypingCall:
    channel_id: int
    at: float


@dataclass
class CommandSync:
    """One bulk overwrite, which is what `CommandTree.sync()` sends."""

    guild_id: int | None  # None for global commands
    names: list[str]
    at: float


@dataclass
class RecordedRequest:
    method: str
    path: str  # relative to /api/v10
    query: dict
    body: Any
    at: float
    status: int = 0


@dataclass
class _Failure:
    method: str
    path: re.Pattern
    status: int
    retry_after: float
    times: int


@dataclass(eq=False)
class _Connection:
    """One gateway websocket. With zlib-stream the whole connection shares one compressor."""

    ws: web.WebSocketResponse
    request: web.Request
    compressor: Any | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, payload: dict) -> None:
        data = json.dumps(payload)
        async with self.lock:  # compress-then-send must not interleave on a shared stream
            if self.compressor is None:
                await self.ws.send_str(data)
            else:
                chunk = self.compressor.compress(data.encode()) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
                await self.ws.send_bytes(chunk)  # ends with 00 00 ff ff: discord.py's cue to inflate


@dataclass
class _Session:
    """What RESUME restores: the sequence and every dispatch, so missed ones can be replayed."""

    id: str
    intents: int
    conn: _Connection | None
    seq: int = 0
    log: list[dict] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


# ---------------------------------------------------------------- the emulator


class DiscordEmulator:
    """Discord's REST API and gateway for one bot, one guild and one text channel."""

    def __init__(
        self,
        *,
        bot_token: str = "emulated.bot.token",
        bot_name: str = "rolebot",
        heartbeat_interval_ms: int = 41_250,
        interaction_ack_timeout: float = 3.0,
        portal_privileged_intents: int = PRIVILEGED,
        bot_permissions: int = BOT_PERMISSIONS,
    ):
        self.bot_token = bot_token
        self.bot_name = bot_name
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.interaction_ack_timeout = interaction_ack_timeout
        self.portal_privileged_intents = portal_privileged_intents
        self.bot_permissions = bot_permissions  # its role's, in the whole guild
        self._last_id = 0
        self.bot_user_id = self.application_id = self._snowflake()
        self.owner_id = self._snowflake()
        self.guild_id = self._snowflake()
        self.channel_id = self._snowflake()
        self.admin_role_id = self._snowflake()
        self.bot_role_id = self._snowflake()
        self.joined_at = now_iso()
        self._channels: dict[int, dict] = {}  # the guild's text channels, by id
        self._channels[self.channel_id] = self._text_channel(self.channel_id, "general")

        # Recorded state, for tests to assert on.
        self.sent_messages: list[SentMessage] = []
        self.typing: list[TypingCall] = []
        self.command_syncs: list[CommandSync] = []
        self.interactions: dict[int, InteractionRecord] = {}
        self.gateway_urls: list[str] = []  # path and query of every gateway connection
        self.identifies: list[dict] = []
        self.resumes: list[dict] = []
        self.presences: list[dict] = []
        self.heartbeats = 0
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[RecordedRequest] = []
        self.reactions: dict[int, dict[str, set[int]]] = {}  # message id -> emoji -> user ids
        self.webhooks: dict[int, dict] = {}  # every channel webhook, as Discord returns it (with its token)

        self._users: dict[int, dict] = {}
        self._admins: set[int] = set()
        self._dm_channels: dict[int, int] = {}  # DM channel id -> the user at the other end
        self._messages: dict[int, dict] = {}  # every message payload, by id
        self._commands: dict[int | None, dict[str, dict]] = {}  # scope (guild id or None) -> name -> command
        self._failures: list[_Failure] = []
        self._session: _Session | None = None
        self._connections: set[_Connection] = set()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------ lifecycle and wiring

    async def __aenter__(self) -> Self:
        app = web.Application(middlewares=[self._rest_middleware])
        self._add_routes(app.router)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # a free port, chosen by the OS
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for conn in list(self._connections):
            await conn.ws.close(code=1001, message=b"emulator stopped")
        await self._runner.cleanup()

    @property
    def rest_base(self) -> str:
        """What `discord.http.Route.BASE` must be (it is https://discord.com/api/v10 on Discord)."""
        return f"http://127.0.0.1:{self.port}{API}"

    @property
    def gateway_url(self) -> str:
        """Where a non-sharded client first connects; discord.py adds ?v=10&encoding=json&compress=..."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        """Sent in READY; discord.py RESUMEs here, as Discord asks it to."""
        return f"ws://127.0.0.1:{self.port}/resume"

    @contextlib.contextmanager
    def patch_discord(self) -> Iterator[DiscordEmulator]:
        """Point discord.py at the emulator, and restore it afterwards.

        Two class attributes are all it takes, so product code stays unaware of the emulator:
        - `discord.http.Route.BASE`: every REST call, webhook and interaction calls included,
          builds its URL from it when the Route is created.
        - `discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`: `Client.connect` passes no gateway
          on the first connect (a non-sharded client never calls GET /gateway), nor after an
          INVALID_SESSION, so `DiscordWebSocket.from_client` falls back to it.
        """
        import discord.gateway
        import discord.http
        import yarl

        route, websocket = discord.http.Route, discord.gateway.DiscordWebSocket
        saved = route.BASE, websocket.DEFAULT_GATEWAY
        route.BASE, websocket.DEFAULT_GATEWAY = self.rest_base, yarl.URL(self.gateway_url)
        try:
            yield self
        finally:
            route.BASE, websocket.DEFAULT_GATEWAY = saved

    # ------------------------------------------------------------ test controls

    async def user_sends(
        self,
        text: str,
        *,
        user_id: int,
        channel_id: int | None = None,
        mention_bot: bool = False,
        dm: bool = False,
        reply_to: int | None = None,
    ) -> dict:
        """A user posts a message (in the guild channel, or in their DM with the bot): MESSAGE_CREATE.

        Replying to a message pings its author, as Discord's client does by default.
        """
        self._require_session()
        if dm and channel_id is not None:
            raise ValueError("pass either dm=True or a channel_id, not both")
        channel_id = self._dm_channel(user_id) if dm else (channel_id or self.channel_id)
        self._check_channel(channel_id)
        mentions = [self.bot_user_id] if mention_bot else []
        if mention_bot:
            text = f"<@{self.bot_user_id}> {text}"
        if reply_to is not None:
            mentions.append(int(self._get_message(reply_to, channel_id)["author"]["id"]))
        mentions = list(dict.fromkeys(mentions))
        message = self._new_message(channel_id, user_id, text, mentions=mentions, reply_to=reply_to)
        await self._dispatch("MESSAGE_CREATE", message)
        return message

    async def user_reacts(self, message_id: int, emoji: str, user_id: int, remove: bool = False) -> None:
        """A user adds (or removes) a unicode emoji reaction: MESSAGE_REACTION_ADD / _REMOVE."""
        self._require_session()
        message = self._get_message(message_id)
        await self._react(message, emoji, user_id, remove=remove)

    async def user_invokes(
        self,
        command_name: str,
        user_id: int,
        options: dict | None = None,
        *,
        admin_permissions: bool = False,
    ) -> int:
        """A member runs a synced slash command in the guild channel: INTERACTION_CREATE. Returns its id.

        As in Discord's client, only synced commands and their declared options can be invoked.
        `admin_permissions` gives (or takes away) the user's Administrator role from now on.
        """
        self._require_session()
        scope, command = self._find_command(command_name)
        options = options or {}
        data = {"id": command["id"], "name": command_name, "type": 1}
        data["options"] = self._interaction_options(command, options)
        if scope is not None:
            data["guild_id"] = str(scope)
        (self._admins.add if admin_permissions else self._admins.discard)(user_id)
        record = InteractionRecord(
            id=self._snowflake(), token=f"itoken-{uuid.uuid4().hex}", command=command_name,
            user_id=user_id, channel_id=self.channel_id, options=options, at=time.monotonic(),
        )
        self.interactions[record.id] = record
        await self._dispatch("INTERACTION_CREATE", self._interaction_payload(record, data))
        return record.id

    async def add_channel(self, name: str, *, bot_denied: int = 0) -> int:
        """Another text channel in the guild (CHANNEL_CREATE once the bot is connected); returns its id.
        ``bot_denied``: permission bits an overwrite for the bot's role denies there."""
        channel_id = self._snowflake()
        channel = self._text_channel(channel_id, name, position=len(self._channels))
        if bot_denied:
            channel["permission_overwrites"] = [
                {"id": str(self.bot_role_id), "type": 0, "allow": "0", "deny": str(bot_denied)}]
        self._channels[channel_id] = channel
        await self._dispatch("CHANNEL_CREATE", channel)
        return channel_id

    async def delete_webhook(self, webhook_id: int) -> None:
        """A server admin deletes a webhook (its messages stay, as on Discord): WEBHOOKS_UPDATE."""
        hook = self.webhooks.pop(webhook_id)
        await self._dispatch("WEBHOOKS_UPDATE", {"guild_id": hook["guild_id"], "channel_id": hook["channel_id"]})

    def fail_next(
        self, method: str, path_regex: str, status: int = 429, retry_after: float = 1.0, *, times: int = 1
    ) -> None:
        """Make the next `times` REST calls matching method and path (relative to /api/v10) fail.

        A 429 is a proper per-route rate limit (Via, X-RateLimit-*, retry_after), which
        discord.py waits out and retries; other statuses are plain Discord errors.
        """
        self._failures.append(_Failure(method.upper(), re.compile(path_regex), status, retry_after, times))

    async def drop_gateway(self, code: int = 4000, *, abrupt: bool = False) -> None:
        """Close the bot's gateway connection; discord.py reconnects and RESUMEs.

        With a resumable close code (4000) the socket closes cleanly; `abrupt` cuts TCP
        without a close frame, like a network failure. Events dispatched meanwhile are kept
        and replayed after RESUME.
        """
        session = self._session
        if session is None or session.conn is None:
            raise RuntimeError("no gateway connection to drop: the bot is not connected")
        conn, session.conn = session.conn, None
        if abrupt:
            conn.request.transport.close()
        else:
            await conn.ws.close(code=code, message=b"dropped by the emulator")
        self._notify()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until predicate() is truthy and return its value.

        It is checked whenever the emulator records something, and every 20 ms besides, so it
        may also read state the bot's handlers keep.
        """
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the predicate stayed false for {timeout} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.02))
        return result

    @property
    def connected(self) -> bool:
        """Whether the bot has an identified or resumed gateway connection right now."""
        return self._session is not None and self._session.conn is not None

    @property
    def intents(self) -> int:
        """The intents bitfield of the latest IDENTIFY."""
        if not self.identifies:
            raise RuntimeError("the bot has not identified yet")
        return self.identifies[-1]["intents"]

    def _require_session(self) -> None:
        if self._session is None:
            raise RuntimeError("no bot on the gateway yet: log the client in, start connect() and wait until ready")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ Discord objects

    def _snowflake(self) -> int:
        """An id that, like Discord's, encodes its creation time and grows monotonically."""
        self._last_id = max(self._last_id + 1, (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22)
        return self._last_id

    def _user(self, user_id: int) -> dict:
        if user_id == self.bot_user_id:
            return {
                "id": str(user_id), "username": self.bot_name, "discriminator": "0", "global_name": None,
                "avatar": None, "bot": True, "verified": True, "mfa_enabled": False, "flags": 0, "public_flags": 0,
            }
        return self._users.setdefault(user_id, {
            "id": str(user_id), "username": f"user{user_id}", "discriminator": "0",
            "global_name": f"User {user_id}", "avatar": None, "public_flags": 0,
        })

    def _member(self, user_id: int, *, with_user: bool = True) -> dict:
        if user_id == self.bot_user_id:
            roles = [self.bot_role_id]
        else:
            roles = [self.admin_role_id] if user_id in self._admins else []
        member = {
            "roles": [str(r) for r in roles], "joined_at": self.joined_at, "nick": None, "avatar": None,
            "deaf": False, "mute": False, "flags": 0, "pending": False, "communication_disabled_until": None,
        }
        if with_user:
            member["user"] = self._user(user_id)
        return member

    def _member_permissions(self, user_id: int) -> int:
        return MEMBER_PERMISSIONS | (ADMINISTRATOR if user_id in self._admins else 0)

    def _bot_may(self, channel_id: int, permission: int) -> bool:
        """Discord's order: the roles' permissions, then the channel's overwrites (deny, then
        allow); Administrator passes every check."""
        allowed = MEMBER_PERMISSIONS | self.bot_permissions
        if allowed & ADMINISTRATOR:
            return True
        for overwrite in self._channels[channel_id]["permission_overwrites"]:
            if int(overwrite["id"]) in (self.guild_id, self.bot_role_id):
                allowed = (allowed & ~int(overwrite["deny"])) | int(overwrite["allow"])
        return bool(allowed & permission)

    def _role(self, role_id: int, name: str, permissions: int, position: int, **extra: Any) -> dict:
        return {
            "id": str(role_id), "name": name, "permissions": str(permissions), "position": position,
            "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0,
            "icon": None, "unicode_emoji": None, **extra,
        }

    def _text_channel(self, channel_id: int, name: str, position: int = 0) -> dict:
        return {
            "id": str(channel_id), "type": 0, "guild_id": str(self.guild_id), "name": name,
            "position": position, "permission_overwrites": [], "parent_id": None, "topic": None, "nsfw": False,
            "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
        }

    def _channel(self, channel_id: int | None = None) -> dict:
        return self._channels[channel_id or self.channel_id]

    def _guild(self, intents: int) -> dict:
        """GUILD_CREATE's guild. Other members are only sent to bots with the GUILD_MEMBERS intent."""
        known = [self.bot_user_id, *self._users]
        shown = known if intents & GUILD_MEMBERS else [self.bot_user_id]
        return {
            "id": str(self.guild_id), "name": "Emulated Guild", "owner_id": str(self.owner_id),
            "icon": None, "splash": None, "banner": None, "description": None, "features": [],
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "nsfw_level": 0, "premium_tier": 0, "preferred_locale": "en-US",
            "system_channel_id": None, "system_channel_flags": 0, "afk_channel_id": None, "afk_timeout": 300,
            "roles": [
                self._role(self.guild_id, "@everyone", MEMBER_PERMISSIONS, 0),
                self._role(self.admin_role_id, "Admin", ADMINISTRATOR, 1),
                self._role(self.bot_role_id, self.bot_name, self.bot_permissions, 2, managed=True,
                           tags={"bot_id": str(self.bot_user_id)}),
            ],
            "emojis": [], "stickers": [], "channels": list(self._channels.values()), "threads": [],
            "members": [self._member(u) for u in shown], "member_count": len(known),
            "joined_at": self.joined_at, "large": False, "unavailable": False,
            "presences": [], "voice_states": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _dm_channel(self, user_id: int) -> int:
        for channel_id, other in self._dm_channels.items():
            if other == user_id:
                return channel_id
        channel_id = self._snowflake()
        self._dm_channels[channel_id] = user_id
        return channel_id

    def _check_channel(self, channel_id: int) -> None:
        if channel_id not in self._channels and channel_id not in self._dm_channels:
            raise DiscordError(404, 10003, "Unknown Channel")

    def _get_message(self, message_id: int, channel_id: int | None = None) -> dict:
        message = self._messages.get(int(message_id))
        if message is None or (channel_id is not None and int(message["channel_id"]) != channel_id):
            raise DiscordError(404, 10008, "Unknown Message")
        return message

    def _new_message(
        self, channel_id: int, author_id: int, content: str, *,
        mentions: Sequence[int] = (), reply_to: int | None = None, **extra: Any,
    ) -> dict:
        """A message payload as MESSAGE_CREATE and the REST API return it; stored by id."""
        in_guild = channel_id in self._channels
        message = {
            "id": str(self._snowflake()), "channel_id": str(channel_id), "author": self._user(author_id),
            "content": content, "timestamp": now_iso(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
            "embeds": [], "components": [], "pinned": False, "type": 0, "flags": 0,
        }
        for user_id in mentions:
            mentioned = dict(self._user(user_id))
            if in_guild:
                mentioned["member"] = self._member(user_id, with_user=False)
            message["mentions"].append(mentioned)
        if in_guild:
            message["guild_id"] = str(self.guild_id)
            message["member"] = self._member(author_id, with_user=False)
        if reply_to is not None:
            referenced = {k: v for k, v in self._messages[reply_to].items() if k != "referenced_message"}
            message["type"] = 19  # REPLY
            message["message_reference"] = {"type": 0, "message_id": str(reply_to), "channel_id": str(channel_id)}
            message["referenced_message"] = referenced
        message.update(extra)
        self._messages[int(message["id"])] = message
        return message

    def _interaction_payload(self, record: InteractionRecord, data: dict) -> dict:
        """INTERACTION_CREATE's data; discord.py requires `attachment_size_limit` in it."""
        permissions = self._member_permissions(record.user_id)
        member = self._member(record.user_id) | {"permissions": str(permissions)}
        return {
            "id": str(record.id), "application_id": str(self.application_id), "type": 2, "data": data,
            "guild_id": str(self.guild_id), "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(record.channel_id), "channel": self._channel(record.channel_id), "member": member,
            "token": record.token, "version": 1, "app_permissions": str(self.bot_permissions),
            "locale": "en-US", "guild_locale": "en-US", "entitlements": [], "context": 0,
            "authorizing_integration_owners": {"0": str(self.guild_id)},
            "attachment_size_limit": 10 * 1024 * 1024,
        }

    def _find_command(self, name: str) -> tuple[int | None, dict]:
        for scope in (self.guild_id, None):
            if name in self._commands.get(scope, {}):
                return scope, self._commands[scope][name]
        raise LookupError(f"/{name} was never synced: Discord only offers commands the bot synced (tree.sync())")

    @staticmethod
    def _interaction_options(command: dict, options: dict) -> list[dict]:
        declared = {o["name"]: o for o in command.get("options", [])}
        unknown = set(options) - set(declared)
        missing = {n for n, o in declared.items() if o.get("required")} - set(options)
        if unknown or missing:
            name = command["name"]
            raise ValueError(f"/{name} options: unknown {sorted(unknown)}, missing required {sorted(missing)}")
        return [{"name": n, "type": declared[n]["type"], "value": v} for n, v in options.items()]

    # ------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        """The gateway websocket (both the first connect and resume_gateway_url land here)."""
        if request.query.get("v") != "10" or request.query.get("encoding", "json") != "json":
            return discord_error(400, 0, "the emulator speaks gateway v10 with JSON encoding only")
        compress = request.query.get("compress")
        if compress not in (None, "zlib-stream"):
            return discord_error(400, 0, f"compress={compress} is not emulated; zlib-stream is")
        self.gateway_urls.append(request.path_qs)
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        conn = _Connection(ws, request, zlib.compressobj() if compress else None)
        self._connections.add(conn)
        try:
            await conn.send({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    await self._on_gateway_message(conn, json.loads(frame.data))
        except ConnectionError:
            pass  # dropped mid-send; the session keeps the events for RESUME
        finally:
            self._connections.discard(conn)
            if self._session is not None and self._session.conn is conn:
                self._session.conn = None
            self._notify()
        return ws

    async def _on_gateway_message(self, conn: _Connection, message: dict) -> None:
        op, data = message.get("op"), message.get("d")
        if op == HEARTBEAT:
            self.heartbeats += 1
            await conn.send({"op": HEARTBEAT_ACK})
        elif op == IDENTIFY:
            await self._identify(conn, data)
        elif op == RESUME:
            await self._resume(conn, data)
        elif op == PRESENCE_UPDATE:
            self.presences.append(data)
        self._notify()

    async def _identify(self, conn: _Connection, data: dict) -> None:
        """IDENTIFY starts a new session: READY (guild unavailable), then its GUILD_CREATE."""
        self.identifies.append(data)
        if data.get("token") != self.bot_token:
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = data.get("intents", 0)
        if intents & PRIVILEGED & ~self.portal_privileged_intents:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        self._session = _Session(id=uuid.uuid4().hex, intents=intents, conn=conn)
        await self._dispatch("READY", {
            "v": 10, "user": self._user(self.bot_user_id), "session_id": self._session.id,
            "resume_gateway_url": self.resume_gateway_url, "session_type": "normal",
            "guilds": [{"id": str(self.guild_id), "unavailable": True}], "private_channels": [],
            "application": {"id": str(self.application_id), "flags": self._application_flags()},
        })
        await self._dispatch("GUILD_CREATE", self._guild(intents))

    async def _resume(self, conn: _Connection, data: dict) -> None:
        """RESUME reattaches the session, replays what the bot missed, then says RESUMED."""
        self.resumes.append(data)
        session = self._session
        if session is None or data.get("session_id") != session.id or data.get("token") != self.bot_token:
            await conn.send({"op": INVALID_SESSION, "d": False})  # discord.py then IDENTIFYs afresh
            return
        async with session.lock:
            session.conn = conn
            for payload in session.log:
                if payload["s"] > (data.get("seq") or 0):
                    await conn.send(payload)
        await self._dispatch("RESUMED", {})

    def _application_flags(self) -> int:
        """The *_LIMITED flags of an unverified bot whose portal switches allow those intents."""
        limited = {GUILD_PRESENCES: 1 << 13, GUILD_MEMBERS: 1 << 15, MESSAGE_CONTENT: 1 << 19}
        return sum(flag for intent, flag in limited.items() if self.portal_privileged_intents & intent)

    async def _dispatch(self, event: str, data: dict) -> None:
        """Send a numbered DISPATCH, if the session's intents want it; keep it for replay."""
        session = self._session
        if session is None:
            return  # nobody has identified yet: the event reaches no one, as on Discord
        needed = EVENT_INTENTS.get(event)
        if needed and not session.intents & needed[0 if "guild_id" in data else 1]:
            return
        async with session.lock:
            session.seq += 1
            payload = {"op": DISPATCH, "t": event, "s": session.seq, "d": self._visible(session.intents, event, data)}
            session.log.append(payload)
            if session.conn is not None:
                try:
                    await session.conn.send(payload)
                except ConnectionError:
                    session.conn = None
        self._notify()

    def _visible(self, intents: int, event: str, data: dict) -> dict:
        """Without MESSAGE_CONTENT, guild messages arrive emptied unless they mention or are the bot."""
        if event not in ("MESSAGE_CREATE", "MESSAGE_UPDATE") or intents & MESSAGE_CONTENT or "guild_id" not in data:
            return data
        if int(data["author"]["id"]) == self.bot_user_id:
            return data
        if any(int(m["id"]) == self.bot_user_id for m in data["mentions"]):
            return data
        return {**data, "content": "", "embeds": [], "attachments": [], "components": []}

    # ------------------------------------------------------------ REST plumbing

    def _add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/gateway", self._gateway)
        r.add_get("/resume", self._gateway)
        r.add_get(API + "/users/@me", self._get_me)
        r.add_get(API + "/oauth2/applications/@me", self._get_application)
        r.add_post(API + "/channels/{cid}/messages", self._create_message)
        r.add_patch(API + "/channels/{cid}/messages/{mid}", self._edit_message)
        r.add_post(API + "/channels/{cid}/typing", self._trigger_typing)
        r.add_put(API + "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self._add_reaction)
        r.add_delete(API + "/channels/{cid}/messages/{mid}", self._delete_message)
        r.add_delete(API + "/channels/{cid}/messages/{mid}/reactions", self._clear_reactions)
        r.add_delete(API + "/channels/{cid}/messages/{mid}/reactions/{emoji}/{who}", self._remove_reaction)
        for path in ("/applications/{app}/commands", "/applications/{app}/guilds/{gid}/commands"):
            r.add_put(API + path, self._put_commands)
            r.add_get(API + path, self._get_commands)
        r.add_post(API + "/interactions/{iid}/{token}/callback", self._interaction_callback)
        r.add_post(API + "/channels/{cid}/webhooks", self._create_webhook)
        r.add_get(API + "/channels/{cid}/webhooks", self._channel_webhooks)
        # The application's id: an interaction's follow-ups; any other id: a channel webhook.
        r.add_post(API + "/webhooks/{app}/{token}", self._execute_webhook)
        r.add_patch(API + "/webhooks/{app}/{token}/messages/{mid}", self._patch_webhook_message)
        r.add_delete(API + "/webhooks/{app}/{token}/messages/{mid}", self._delete_webhook_message)
        r.add_route("*", API + "/{tail:.*}", self._unhandled)

    @web.middleware
    async def _rest_middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Record the call, apply injected failures, check the bot token, map DiscordError."""
        if not request.path.startswith(API + "/"):
            return await handler(request)
        recorded = RecordedRequest(
            request.method, request.path[len(API):], dict(request.query), await self._read_body(request),
            time.monotonic(),
        )
        request[BODY] = recorded.body
        self.requests.append(recorded)
        try:
            response = self._injected_failure(recorded)
            if response is None:
                response = self._unauthorized(request)
            if response is None:
                response = await handler(request)
        except DiscordError as e:
            response = discord_error(e.status, e.code, e.message)
        recorded.status = response.status
        self._notify()
        return response

    @staticmethod
    async def _read_body(request: web.Request) -> Any:
        """JSON bodies, or the payload_json part of a multipart (file upload) body."""
        if request.content_type == "application/json":
            return await request.json()
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            return json.loads(form.get("payload_json", "{}"))
        return None

    def _injected_failure(self, recorded: RecordedRequest) -> web.Response | None:
        for failure in self._failures:
            if failure.method == recorded.method and failure.path.search(recorded.path):
                failure.times -= 1
                if failure.times <= 0:
                    self._failures.remove(failure)
                if failure.status != 429:
                    return discord_error(failure.status, 0, f"{failure.status}: injected by the emulator")
                return self._rate_limited(failure.retry_after)
        return None

    @staticmethod
    def _rate_limited(retry_after: float) -> web.Response:
        """A route rate limit as Discord sends it; `Via` tells discord.py it is not a Cloudflare ban."""
        headers = {
            "Via": "1.1 google",
            "Retry-After": str(max(1, round(retry_after))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": "emulated",
            "X-RateLimit-Scope": "user",
        }
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
        return json_response(body, 429, headers)

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """Bot routes need `Authorization: Bot <token>`; interaction webhooks are keyed by their token."""
        if request.path.startswith((API + "/webhooks/", API + "/interactions/")):
            return None
        if request.headers.get("Authorization") != f"Bot {self.bot_token}":
            return discord_error(401, 0, "401: Unauthorized")
        return None

    async def _unhandled(self, request: web.Request) -> web.Response:
        self.unhandled.append(self.requests[-1])
        return discord_error(404, 0, "404: Not Found (not emulated)")

    # ------------------------------------------------------------ REST: login

    async def _get_me(self, request: web.Request) -> web.Response:
        return json_response(self._user(self.bot_user_id))

    async def _get_application(self, request: web.Request) -> web.Response:
        owner = {"id": str(self.owner_id), "username": "owner", "discriminator": "0", "avatar": None, "public_flags": 0}
        return json_response({
            "id": str(self.application_id), "name": self.bot_name, "icon": None, "description": "",
            "summary": "", "type": None, "bot_public": True, "bot_require_code_grant": False,
            "verify_key": "0" * 64, "flags": self._application_flags(), "owner": owner, "team": None,
            "bot": self._user(self.bot_user_id), "redirect_uris": [], "interactions_endpoint_url": None,
            "approximate_guild_count": 1,
        })

    # ------------------------------------------------------------ REST: messages, typing, reactions

    async def _create_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["cid"])
        self._check_channel(channel_id)
        body = request[BODY] or {}
        reply_to = self._reference(body, channel_id)
        message, _ = self._bot_message(channel_id, body, reply_to=reply_to)
        await self._dispatch("MESSAGE_CREATE", message)
        return json_response(message)

    async def _edit_message(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["cid"])
        message = self._get_message(int(request.match_info["mid"]), channel_id)
        if int(message["author"]["id"]) != self.bot_user_id:
            raise DiscordError(403, 50005, "Cannot edit a message authored by another user")
        sent = next(s for s in self.sent_messages if s.id == int(message["id"]))
        updated = self._apply_edit(sent, message, request[BODY] or {})
        await self._dispatch("MESSAGE_UPDATE", updated)
        return json_response(updated)

    async def _delete_message(self, request: web.Request) -> web.Response:
        """The bot deletes a message: its own anywhere; another's only in the guild (Manage Messages)."""
        channel_id = int(request.match_info["cid"])
        message = self._get_message(int(request.match_info["mid"]), channel_id)
        if int(message["author"]["id"]) != self.bot_user_id and "guild_id" not in message:
            raise DiscordError(403, 50003, "Cannot execute action on a DM channel")
        await self._remove_message(message)
        return web.Response(status=204)

    async def _remove_message(self, message: dict) -> None:
        del self._messages[int(message["id"])]
        self.reactions.pop(int(message["id"]), None)
        for sent in self.sent_messages:
            if sent.id == int(message["id"]):
                sent.deleted = True
        event = {"id": message["id"], "channel_id": message["channel_id"]}
        if "guild_id" in message:
            event["guild_id"] = message["guild_id"]
        await self._dispatch("MESSAGE_DELETE", event)

    async def _clear_reactions(self, request: web.Request) -> web.Response:
        """Remove every reaction from a message: needs Manage Messages, so never in a DM, where a
        bot may remove only its own (Discord answers 50003 there)."""
        message = self._get_message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        if "guild_id" not in message:
            raise DiscordError(403, 50003, "Cannot execute action on a DM channel")
        self.reactions.pop(int(message["id"]), None)
        event = {"channel_id": message["channel_id"], "message_id": message["id"], "guild_id": message["guild_id"]}
        await self._dispatch("MESSAGE_REACTION_REMOVE_ALL", event)
        return web.Response(status=204)

    async def _trigger_typing(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["cid"])
        self._check_channel(channel_id)
        self.typing.append(TypingCall(channel_id, time.monotonic()))
        return web.Response(status=204)

    async def _add_reaction(self, request: web.Request) -> web.Response:
        message = self._get_message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        await self._react(message, request.match_info["emoji"], self.bot_user_id)
        return web.Response(status=204)

    async def _remove_reaction(self, request: web.Request) -> web.Response:
        message = self._get_message(int(request.match_info["mid"]), int(request.match_info["cid"]))
        who = request.match_info["who"]
        user_id = self.bot_user_id if who == "@me" else int(who)
        if user_id not in self.reactions.get(int(message["id"]), {}).get(request.match_info["emoji"], set()):
            return web.Response(status=204)  # Discord answers 204 for a reaction that was not there
        await self._react(message, request.match_info["emoji"], user_id, remove=True)
        return web.Response(status=204)

    async def _react(self, message: dict, emoji: str, user_id: int, *, remove: bool = False) -> None:
        users = self.reactions.setdefault(int(message["id"]), {}).setdefault(emoji, set())
        if remove and user_id not in users:
            raise ValueError(f"user {user_id} has no {emoji} reaction on message {message['id']} to remove")
        (users.discard if remove else users.add)(user_id)
        event = {
            "user_id": str(user_id), "channel_id": message["channel_id"], "message_id": message["id"],
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0,
        }
        if "guild_id" in message:
            event["guild_id"] = message["guild_id"]
        if not remove:  # only REACTION_ADD carries the member and the message's author
            event["message_author_id"] = message["author"]["id"]
            if "guild_id" in message:
                event["member"] = self._member(user_id)
        await self._dispatch("MESSAGE_REACTION_REMOVE" if remove else "MESSAGE_REACTION_ADD", event)

    def _reference(self, body: dict, channel_id: int) -> int | None:
        """The message a reply points at; Discord refuses unknown ones unless fail_if_not_exists is false."""
        ref = body.get("message_reference")
        if not ref:
            return None
        message_id = int(ref["message_id"])
        if message_id in self._messages:
            return message_id
        if ref.get("fail_if_not_exists", True):
            raise DiscordError(400, 50035, "Invalid Form Body: message_reference: Unknown message")
        return None

    def _bot_message(
        self, channel_id: int, body: dict, *, reply_to: int | None = None, webhook: dict | None = None, **extra: Any
    ) -> tuple[dict, SentMessage]:
        """Validate and store a message the bot creates (through ``webhook``: authored by it), and who it pings."""
        content = body.get("content") or ""
        self._check_content(content)
        flags = extra.pop("flags", body.get("flags") or 0)
        has_body = any(body.get(k) for k in ("embeds", "attachments", "sticker_ids", "poll", "components"))
        if not (content or has_body or flags & FLAG_LOADING):  # a deferred "thinking..." may be empty
            raise DiscordError(400, 50006, "Cannot send an empty message")
        reply_author = int(self._messages[reply_to]["author"]["id"]) if reply_to is not None else None
        pinged, everyone = self._pings(content, body.get("allowed_mentions"), reply_author)
        message = self._new_message(
            channel_id, self.bot_user_id, content, mentions=pinged, reply_to=reply_to,
            embeds=body.get("embeds") or [], mention_everyone=everyone, flags=flags, **extra,
        )
        sent = SentMessage(
            id=int(message["id"]), channel_id=channel_id, content=content, at=time.monotonic(), payload=body,
            flags=flags, pinged_user_ids=pinged, pings_everyone=everyone,
        )
        if webhook is not None:  # no member: a webhook's author is no user of the guild
            del message["member"]
            message["webhook_id"], sent.webhook_id = webhook["id"], int(webhook["id"])
            message["author"] = {
                "id": webhook["id"], "username": body.get("username") or webhook["name"], "discriminator": "0000",
                "avatar": None, "bot": True, "global_name": None, "public_flags": 0,
            }
        self.sent_messages.append(sent)
        return message, sent

    def _apply_edit(self, sent: SentMessage, message: dict, body: dict) -> dict:
        content = body["content"] if body.get("content") is not None else message["content"]
        self._check_content(content)
        sent.content = content
        sent.flags &= ~FLAG_LOADING  # the first edit of a deferred response replaces "thinking..."
        sent.edits.append(Edit(content, time.monotonic(), body))
        updated = {**message, "content": content, "edited_timestamp": now_iso(), "flags": sent.flags}
        if "embeds" in body:
            updated["embeds"] = body["embeds"] or []
        self._messages[sent.id] = updated
        return updated

    @staticmethod
    def _check_content(content: str) -> None:
        if len(content) > MESSAGE_LIMIT:
            raise DiscordError(400, 50035, f"Invalid Form Body: content: Must be {MESSAGE_LIMIT} or fewer in length.")

    @staticmethod
    def _pings(content: str, allowed: dict | None, reply_author: int | None) -> tuple[list[int], bool]:
        """Who a message really notifies. Without allowed_mentions Discord parses everything."""
        users = [int(u) for u in USER_MENTION.findall(content)]
        everyone = bool(EVERYONE_MENTION.search(content))
        if allowed is not None:
            parse = allowed.get("parse", [])
            explicit = {int(u) for u in allowed.get("users", [])}
            users = [u for u in users if "users" in parse or u in explicit]
            everyone = everyone and "everyone" in parse
        if reply_author is not None and (allowed is None or allowed.get("replied_user", False)):
            users.append(reply_author)
        return list(dict.fromkeys(users)), everyone

    # ------------------------------------------------------------ REST: channel webhooks

    def _check_may_manage_webhooks(self, channel_id: int) -> None:
        if channel_id not in self._channels:
            raise DiscordError(404, 10003, "Unknown Channel")
        if not self._bot_may(channel_id, MANAGE_WEBHOOKS):
            raise DiscordError(403, 50013, "Missing Permissions")

    @staticmethod
    def _check_webhook_name(name: Any) -> None:
        """Discord refuses names it could be mistaken for (Clyde, Discord) and over 80 characters."""
        if not isinstance(name, str) or not 1 <= len(name) <= 80 or re.search("clyde|discord", name, re.I):
            raise DiscordError(400, 50035, f"Invalid Form Body: name: {name!r} is not a valid webhook name")

    async def _create_webhook(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["cid"])
        self._check_may_manage_webhooks(channel_id)
        body = request[BODY] or {}
        self._check_webhook_name(body.get("name"))
        hook_id, token = self._snowflake(), uuid.uuid4().hex
        self.webhooks[hook_id] = {
            "id": str(hook_id), "type": WEBHOOK_INCOMING, "guild_id": str(self.guild_id),
            "channel_id": str(channel_id), "user": self._user(self.bot_user_id), "name": body["name"],
            "avatar": uuid.uuid4().hex if body.get("avatar") else None, "token": token,
            "application_id": str(self.application_id), "url": f"{self.rest_base}/webhooks/{hook_id}/{token}",
        }
        return json_response(self.webhooks[hook_id])

    async def _channel_webhooks(self, request: web.Request) -> web.Response:
        channel_id = int(request.match_info["cid"])
        self._check_may_manage_webhooks(channel_id)
        return json_response([h for h in self.webhooks.values() if int(h["channel_id"]) == channel_id])

    def _webhook(self, request: web.Request) -> dict:
        hook = self.webhooks.get(int(request.match_info["app"]))
        if hook is None:
            raise DiscordError(404, 10015, "Unknown Webhook")
        if request.match_info["token"] != hook["token"]:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        return hook

    def _webhook_message(self, request: web.Request, hook: dict) -> dict:
        """Only a webhook's own messages are found through it."""
        message = self._messages.get(int(request.match_info["mid"]))
        if message is None or message.get("webhook_id") != hook["id"]:
            raise DiscordError(404, 10008, "Unknown Message")
        return message

    async def _execute_webhook(self, request: web.Request) -> web.Response:
        if int(request.match_info["app"]) == self.application_id:
            return await self._create_followup(request)
        hook = self._webhook(request)
        body = request[BODY] or {}
        if body.get("username") is not None:
            self._check_webhook_name(body["username"])
        message, _ = self._bot_message(int(hook["channel_id"]), body, webhook=hook)
        await self._dispatch("MESSAGE_CREATE", message)
        if request.query.get("wait") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response(message)

    async def _patch_webhook_message(self, request: web.Request) -> web.Response:
        if int(request.match_info["app"]) == self.application_id:
            return await self._edit_webhook_message(request)
        message = self._webhook_message(request, self._webhook(request))
        sent = next(s for s in self.sent_messages if s.id == int(message["id"]))
        updated = self._apply_edit(sent, message, request[BODY] or {})
        await self._dispatch("MESSAGE_UPDATE", updated)
        return json_response(updated)

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        if int(request.match_info["app"]) == self.application_id:
            return await self._unhandled(request)  # deleting interaction messages: not emulated
        await self._remove_message(self._webhook_message(request, self._webhook(request)))
        return web.Response(status=204)

    # ------------------------------------------------------------ REST: application commands

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app"]) != self.application_id:
            raise DiscordError(403, 20012, "You are not authorized to perform this action on this application")
        guild_id = request.match_info.get("gid")
        if guild_id is not None and int(guild_id) != self.guild_id:
            raise DiscordError(403, 50001, "Missing Access")
        return None if guild_id is None else int(guild_id)

    async def _put_commands(self, request: web.Request) -> web.Response:
        """Bulk overwrite: the new list replaces the old; a kept name keeps its id, as on Discord."""
        scope = self._command_scope(request)
        old = self._commands.get(scope, {})
        new = {}
        for command in request[BODY]:
            self._check_command(command)
            new[command["name"]] = self._stored_command(command, scope, old.get(command["name"]))
        self._commands[scope] = new
        self.command_syncs.append(CommandSync(scope, list(new), time.monotonic()))
        return json_response(list(new.values()))

    async def _get_commands(self, request: web.Request) -> web.Response:
        return json_response(list(self._commands.get(self._command_scope(request), {}).values()))

    @staticmethod
    def _check_command(command: dict) -> None:
        name, description = command.get("name", ""), command.get("description", "")
        if command.get("type", 1) == 1 and not (
            COMMAND_NAME.match(name) and name == name.lower() and 1 <= len(description) <= 100
        ):
            raise DiscordError(400, 50035, f"Invalid Form Body: command {name!r}: bad name or description")

    def _stored_command(self, command: dict, scope: int | None, previous: dict | None) -> dict:
        stored = {
            "type": 1, "description": "", "options": [], "default_member_permissions": None, "nsfw": False,
            "contexts": None, "integration_types": [0], **command,
            "id": previous["id"] if previous else str(self._snowflake()),
            "application_id": str(self.application_id), "version": str(self._snowflake()),
        }
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    # ------------------------------------------------------------ REST: interaction responses

    def _interaction(self, token: str, *, acknowledged: bool = True) -> InteractionRecord:
        record = next((r for r in self.interactions.values() if r.token == token), None)
        if record is None:
            raise DiscordError(404, 10062, "Unknown interaction")
        if acknowledged and not record.responses:
            raise DiscordError(404, 10015, "Unknown Webhook")  # follow-ups need an acknowledged interaction
        return record

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        """The one initial response. Discord allows it within 3 s of the interaction, and only once."""
        record = self._interaction(request.match_info["token"], acknowledged=False)
        if record.id != int(request.match_info["iid"]):
            raise DiscordError(404, 10062, "Unknown interaction")
        if record.responses:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        if time.monotonic() - record.at > self.interaction_ack_timeout:
            raise DiscordError(404, 10062, "Unknown interaction")
        body = request[BODY] or {}
        kind, data = body["type"], body.get("data") or {}
        record.responses.append(InteractionResponse(kind, data, time.monotonic()))
        resource: dict = {"type": kind}
        if kind in (RESPONSE_MESSAGE, RESPONSE_DEFER):
            flags = (data.get("flags") or 0) | (FLAG_LOADING if kind == RESPONSE_DEFER else 0)
            message, record.original = await self._interaction_message(record, data, flags=flags, type=20)
            resource["message"] = message
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response({
            "interaction": {
                "id": str(record.id), "type": 2,
                "response_message_id": resource.get("message", {}).get("id"),
                "response_message_loading": kind == RESPONSE_DEFER,
                "response_message_ephemeral": bool(record.original and record.original.ephemeral),
            },
            "resource": resource,
        })

    async def _interaction_message(
        self, record: InteractionRecord, body: dict, **extra: Any
    ) -> tuple[dict, SentMessage]:
        """A message made through the interaction webhook; ephemeral ones never reach the gateway."""
        metadata = {
            "id": str(record.id), "type": 2, "name": record.command, "user": self._user(record.user_id),
            "authorizing_integration_owners": {"0": str(self.guild_id)},
        }
        message, sent = self._bot_message(
            record.channel_id, body, webhook_id=str(self.application_id),
            application_id=str(self.application_id), interaction_metadata=metadata, **extra,
        )
        sent.interaction_id = record.id
        if not sent.ephemeral:
            await self._dispatch("MESSAGE_CREATE", message)
        return message, sent

    async def _create_followup(self, request: web.Request) -> web.Response:
        self._check_webhook_app(request)
        record = self._interaction(request.match_info["token"])
        message, sent = await self._interaction_message(record, request[BODY] or {})
        record.followups.append(sent)
        if request.query.get("wait") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response(message)

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        """PATCH of @original or of a follow-up, found by the interaction token."""
        self._check_webhook_app(request)
        record = self._interaction(request.match_info["token"])
        mid = request.match_info["mid"]
        sent = record.original if mid == "@original" else next((s for s in record.followups if str(s.id) == mid), None)
        if sent is None:
            raise DiscordError(404, 10008, "Unknown Message")
        updated = self._apply_edit(sent, self._messages[sent.id], request[BODY] or {})
        if not sent.ephemeral:
            await self._dispatch("MESSAGE_UPDATE", updated)
        return json_response(updated)

    def _check_webhook_app(self, request: web.Request) -> None:
        if int(request.match_info["app"]) != self.application_id:
            raise DiscordError(404, 10015, "Unknown Webhook")
