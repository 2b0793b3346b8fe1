"""The conversation service: joins platform front-ends, the engine and the store.

A front-end turns what a user sent into an ``IncomingMessage`` and hands it to
``Service.handle``. What comes back is either an ``Answer`` (a command's answer or a polite
refusal, nothing generated) or a ``Reply`` that streams from the model. Every user message and
every reply is in the database before the user hears of it: ``handle`` returns only after the
user's row and the reply's row have committed, and the reply row is finished (complete,
interrupted or failed) even when nobody reads the stream to its end.

Front-ends know nothing of models; the engine knows nothing of platforms or users.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bot import store as db
from bot.config import Config, GenerationSettings
from bot.engine import pace
from bot.status import RetrainStatus, ServiceStatus, as_text
from bot.adapters import Adapters
from training.errors import UserError
from training.prompts import USER_SPEAKER, Exchange, Sample, served_history_first
from training.registry import Registry

if TYPE_CHECKING:
    from bot.canon import ServedCanon
    from bot.engine import Engine, ReplyStream
    from bot.retrain import Retrainer

log = logging.getLogger(__name__)

# What the character says when she will not answer; {name} is the character's name.
RATE_LIMITED = "（{name}轻轻摇了摇头）您说得太快了，容我缓一缓，过一会儿再同我说话吧。"
EMPTY = "（{name}抬眼望来）您似乎什么也没有说。"
CUT = "（您的话太长，{name}只读了前 {chars} 个字。）"
FORGOTTEN = "（这条话已被遗忘，{name}不再回答。）"
UNAVAILABLE = "（{name}已经歇下了，请稍后再来。）"
BUSY = "（{name}此刻应接不暇，请稍候片刻再同她说话。）"
DROPPED = "（{name}这会儿实在忙不过来，没能回您这句话，请稍后再说一次。）"
NOT_SET_UP = "retraining is not set up in this process"
# How often the text of replies still streaming is written to their rows (all in one transaction).
PARTIAL_SAVE_S = 1.0

# How a user speaks in the prompt's history; the screenplay form the model was trained on.
# Special-token text (<|im_start|>, <s>) and Alpaca's ### headers in user text would let a
# message rewrite the prompt's structure; they are neutralised in the prompt, not in the log.
TEMPLATE_MARKERS = re.compile(r"<\|[^<>|\n]{0,40}\|>|</?s>|#{3,}")
# Removed from every message: control characters (but newlines and tabs), format characters
# such as zero-width spaces and direction overrides.
DROPPED_CATEGORIES = frozenset({"Cc", "Cf"})
SURROGATE = re.compile("[\ud800-\udfff]")  # a lone half of a UTF-16 pair: not a character
COMMAND = re.compile(r"^/([A-Za-z_]+)(?:@\S+)?(?:\s+(.*))?$", re.DOTALL)

ADMIN_COMMANDS = ("status", "retrain", "rollback")
USER_COMMANDS = ("retry", "stop", "reset", "forget", "help")
NOTHING_TO_RETRY = "There is no message of yours in this conversation to answer again yet."
NOT_YOURS = "Only the one who wrote the last message can ask for another reply to it."
NOT_LAST = "Only the last reply can be written again; this one is from earlier in the conversation."
NOTHING_TO_STOP = "No reply is being written in this chat."

ReplyStatus = Literal["complete", "interrupted", "failed", "forgotten"]
AnswerKind = Literal["answer", "empty", "rate_limited", "busy", "unavailable", "error"]
Notifier = Callable[[str, str], Awaitable[None]]  # (chat_id, text): send to a chat unprompted


@dataclass(frozen=True)
class IncomingMessage:
    """What a user sent, as any platform sees it. ``text`` may be raw bytes from a terminal.
    Ids and the display name lose their control characters (see ``clean_label``)."""

    platform: str
    chat_id: str
    user_id: str
    text: str | bytes
    display_name: str | None = None
    platform_message_id: str | None = None
    # Set by a front-end that authenticated the sender as an admin (the web's admin token or a
    # key listed in admins_web); platforms whose ids the platform vouches for use [service] lists.
    admin: bool = False
    # The client's network address where the platform has one (the web), for per-address limits;
    # None where the platform authenticates its users.
    address: str | None = None

    def __post_init__(self) -> None:
        for name in ("chat_id", "user_id", "display_name"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, clean_label(str(value)))


# Control characters and the bidirectional overrides that can make a name display as another.
LABEL_DROPPED = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_label(value: str) -> str:
    """An id or display name as logged and shown: no control characters, no bidi overrides."""
    return LABEL_DROPPED.sub("", value).strip()


@dataclass(frozen=True)
class Overrides:
    """Per-request sampling (the OpenAI API's max_tokens, temperature, top_p)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


@dataclass(frozen=True)
class Answer:
    """Text for the user that the model did not write: a command's answer or a refusal.

    ``kind`` says why, so an HTTP front-end can pick a status code: ``answer`` (a command),
    ``empty`` (nothing to answer), ``rate_limited``, ``busy`` (too many replies waiting; try
    again in ``retry_after`` seconds), ``unavailable`` (shutting down) or ``error`` (the message
    could not be answered; the log says why).
    """

    text: str
    kind: AnswerKind = "answer"
    retry_after: float | None = None


@dataclass(frozen=True)
class ReplyResult:
    """How a reply ended; ``text`` is what the reply row holds."""

    text: str
    status: ReplyStatus
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_version: str | None
    # Why there is no reply, for the user, when the bot dropped it (it waited past max_wait_s).
    notice: str | None = None


class Reply:
    """A reply the model is writing. ``async for piece in reply`` streams it (one reader);
    ``await reply.result()`` waits for the end. ``message_id`` is the reply's row, known before
    the first piece, so a platform can attach rating buttons at once."""

    def __init__(self, message_id: int, user_message_id: int, adapter_version: str | None,
                 notice: str | None):
        self.message_id = message_id
        self.user_message_id = user_message_id
        self.adapter_version = adapter_version
        self.notice = notice  # e.g. that the user's message was cut; show it beside the reply
        # A regenerate: the alternative this reply replaces (edit its platform messages in place).
        self.replaces: db.Message | None = None
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self._result: asyncio.Future[ReplyResult] = asyncio.get_running_loop().create_future()
        self._cancel: Callable[[], None] = lambda: None

    def cancel(self) -> None:
        """Stop the reply at the engine's next step (the user left or pressed stop); the text so
        far is kept and the row ends ``interrupted``."""
        self._cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        while (piece := await self._pieces.get()) is not None:
            yield piece

    async def result(self) -> ReplyResult:
        return await asyncio.shield(self._result)

    def _push(self, piece: str) -> None:
        self._pieces.put_nowait(piece)

    def _finish(self, result: ReplyResult) -> None:
        self._pieces.put_nowait(None)
        self._result.set_result(result)


Outgoing = Answer | Reply


@dataclass
class Alternative:
    """One reply to a user message, as the chat page shows it."""

    id: int
    text: str
    status: str
    rating: int | None  # the viewing user's own 👍 (1) / 👎 (-1)
    kept: bool  # the one the conversation goes on from


@dataclass
class Turn:
    """A user message (None for the greeting) and its replies, oldest first."""

    id: int | None
    text: str
    replies: list[Alternative]


class NotSetUp(UserError):
    """An admin action this process cannot do (no retrainer)."""


class UnknownMessage(db.RatingError):
    """A rating for a message id that is not in the log."""


class RateLimiter:
    """A sliding window per key (a user, or a client address): at most ``per_minute`` events in
    any 60 seconds."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._seen: dict[tuple[str, str], deque[float]] = {}

    def allow(self, key: tuple[str, str]) -> bool:
        now = self.clock()
        window = self._seen.setdefault(key, deque())
        while window and window[0] <= now - 60.0:
            window.popleft()
        if len(window) >= self.per_minute:
            return False
        window.append(now)
        return True


def clean_message(text: str | bytes, limit: int) -> tuple[str, bool]:
    """Clean a message: invalid UTF-8 and lone surrogates become U+FFFD, control and
    zero-width characters go, line ends become ``\\n``. Returns the text cut to ``limit``
    characters and whether it was cut."""
    # Bound the per-character work first: a 1 MB message costs no more than a long one.
    bound = limit * 4
    if isinstance(text, bytes):
        long = len(text) > bound * 4
        text = text[: bound * 4].decode("utf-8", "replace")
    else:
        long = len(text) > bound
    text = SURROGATE.sub("\ufffd", text[:bound])
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n").replace("\t", " ")
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch) not in DROPPED_CATEGORIES)
    text = text.strip()
    if long or len(text) > limit:
        return text[:limit].rstrip(), True
    return text, False


def neutralise(text: str) -> str:
    """User text as it may stand inside a prompt: no template markers of its own."""
    return TEMPLATE_MARKERS.sub(lambda m: "#" if m.group().startswith("#") else "", text)


def parse_command(text: str) -> tuple[str, str] | None:
    """``/name args`` (also ``/name@bot`` as Telegram sends it) → ``(name, args)``."""
    match = COMMAND.match(text)
    return (match.group(1).lower(), (match.group(2) or "").strip()) if match else None


class Service:
    """One character's conversations across every platform."""

    def __init__(self, config: Config, store: db.Store, engine: Engine, *,
                 adapters: Adapters | None = None, retrainer: Retrainer | None = None,
                 canon: ServedCanon | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.canon = canon  # None: prompts hold no canon
        self.store = store
        self.engine = engine
        # One owner of the served adapter per process: the retrainer's, when there is one.
        self.adapters = adapters or (retrainer.adapters if retrainer is not None else Adapters(
            Registry(config.adapter_root, config.character.name), store=store, engine=engine))
        self.retrainer = retrainer
        self.limiter = RateLimiter(config.service.rate_limit_per_minute, clock)
        self.address_limiter = RateLimiter(config.service.rate_limit_per_address, clock)
        self._submitting: list[int] = []  # replies admitted, not yet in the engine: their max_new_tokens
        self._durations: deque[float] = deque(maxlen=32)  # recent replies' seconds, for Retry-After
        self.notifiers: dict[str, Notifier] = {}  # platform → how to message one of its chats
        self._accepting = True
        self._tasks: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()  # work beside the replies (prefills)
        self._partial: dict[int, list[str]] = {}  # replies streaming now: their pieces so far
        self._live: dict[tuple[str, str], Reply] = {}  # (platform, chat) → its reply streaming now
        self._saver: asyncio.Task | None = None
        self._calls = 0  # handle()/rate() calls in progress, so close() can wait for them
        self._idle = asyncio.Event()
        self._idle.set()
        self._orders: dict[str | None, bool] = {}  # adapter version → its prompts are history first
        self.cast = None  # the bot.cast.Cast this character plays in (set by it); None: alone

    @property
    def character(self) -> str:
        return self.config.character.name

    def is_admin(self, platform: str, user_id: str) -> bool:
        """Discord and Telegram admins are listed by platform user id in [service] (the platform
        authenticates its users); whoever sits at the console runs the process and is one
        already. A web user is an admin only when the web front-end authenticated it as one
        (``IncomingMessage.admin``): an id a request names proves nothing."""
        if platform == "console":
            return True
        if platform == "web":
            return False
        return str(user_id) in getattr(self.config.service, f"admins_{platform}", [])

    def _limited(self, msg: IncomingMessage) -> bool:
        """Messages and commands both count, per user and, for traffic no key vouches for, per
        client address (a loopback client is this machine: a local tool or a proxy)."""
        if msg.platform == "console":
            return False
        if msg.address is not None and not _loopback(msg.address) and not self.address_limiter.allow(("address", msg.address)):
            return True
        return not self.limiter.allow((msg.platform, str(msg.user_id)))

    @property
    def capacity(self) -> int:
        """Replies in flight beyond which a new message is turned away as busy."""
        return self.engine.max_batch_size + self.config.service.max_waiting

    def _cannot_finish(self, settings: GenerationSettings) -> Answer | None:
        """Admission by measured capacity: a busy answer when the engine's forecast says this
        reply would not be whole within [service] max_reply_s, or not begun within max_wait_s
        (where it would be dropped); None to admit. With no forecast (nothing measured yet,
        nothing in flight, a remote server) the message is admitted."""
        budget = self.config.service.max_reply_s
        if not budget:
            return None
        forecast = self.engine.forecast(settings.max_new_tokens, self._about_to_submit())
        max_wait = self.config.service.max_wait_s
        if forecast is None or (forecast.finish_s <= budget and forecast.first_token_s <= max_wait):
            return None
        return Answer(self._say(BUSY), "busy", retry_after=pace.retry_after(forecast, budget, max_wait))

    def retry_after(self) -> float:
        """Seconds until a turned-away message is likely to get a place: a recent reply's time."""
        if not self._durations:
            return 5.0
        ordered = sorted(self._durations)
        return float(min(120, max(1, round(ordered[len(ordered) // 2]))))

    def _in_flight(self) -> int:
        """Replies in flight on the engine: a cast's characters share one engine, and one capacity."""
        services = list(self.cast) if self.cast is not None else [self]
        return sum(len(service._tasks) for service in services)

    def _about_to_submit(self) -> list[int]:
        """Replies admitted and not yet in the engine (their max_new_tokens), over the cast."""
        services = list(self.cast) if self.cast is not None else [self]
        return [tokens for service in services for tokens in service._submitting]

    def _say(self, template: str, **values: Any) -> str:
        return template.format(name=self.character, **values)

    # Messages

    async def handle(self, msg: IncomingMessage, *, sampling: Overrides | None = None) -> Outgoing:
        """Answer one message: a command's answer, a refusal, or a streaming reply."""
        if not self._accepting:
            return Answer(self._say(UNAVAILABLE), "unavailable")
        self._enter()
        try:
            text, cut = clean_message(msg.text, self.config.service.max_message_chars)
            if not text:
                return Answer(self._say(EMPTY), "empty")
            if self._limited(msg):
                return Answer(self._say(RATE_LIMITED), "rate_limited", retry_after=60.0)
            command = parse_command(text)
            if command and command[0] == "retry":
                return await self._regenerate(msg, sampling)
            if command:
                return await self._command(msg, *command)
            return await self._start(msg, sampling, text=text, cut=cut)
        finally:
            self._leave()

    async def regenerate(self, msg: IncomingMessage, *, sampling: Overrides | None = None,
                         reply_id: int | None = None) -> Outgoing:
        """Another reply to the chat's last user message (🔄, /retry): a new alternative beside
        the earlier ones, which stay in the log; it counts toward the rate limit. ``msg`` says
        who asks and where (its text is not used). ``reply_id``: the reply whose 🔄 was pressed;
        one that does not answer the last user message is refused (``NOT_LAST``), so a button
        under an older reply never rewrites a different one."""
        if not self._accepting:
            return Answer(self._say(UNAVAILABLE), "unavailable")
        self._enter()
        try:
            if self._limited(msg):
                return Answer(self._say(RATE_LIMITED), "rate_limited", retry_after=60.0)
            return await self._regenerate(msg, sampling, reply_id)
        finally:
            self._leave()

    async def _regenerate(self, msg: IncomingMessage, sampling: Overrides | None,
                          reply_id: int | None = None) -> Outgoing:
        conversation = await self.store.current_conversation(msg.platform, str(msg.chat_id), self.config.store_key)
        last = await self.store.last_user_message(conversation.id)
        if last is None:
            return Answer(NOTHING_TO_RETRY)
        if reply_id is not None:
            pressed = await self.store.message(reply_id)
            if pressed is None or pressed.reply_to != last.id:
                return Answer(NOT_LAST)
        asker = await self.store.user(msg.platform, str(msg.user_id))
        if asker is None or asker.id != last.user_id:
            return Answer(NOT_YOURS)
        live = self._live.get((msg.platform, str(msg.chat_id)))
        if live is not None:  # 🔄 while it streams: that one stops (and stays, interrupted)
            live.cancel()
            await live.result()
        settings = self._settings(sampling)
        if settings.temperature == 0:  # greedy would write the same reply again
            settings = dataclasses.replace(settings, temperature=self.config.generation.regenerate_temperature)
        replaces = await self.store.kept_reply(last.id)
        return await self._start(msg, None, settings=settings, user_row=last, replaces=replaces)

    async def _start(self, msg: IncomingMessage, sampling: Overrides | None, *, text: str = "", cut: bool = False,
                     settings: GenerationSettings | None = None, user_row: db.Message | None = None,
                     replaces: db.Message | None = None) -> Outgoing:
        if self._in_flight() >= self.capacity:
            return Answer(self._say(BUSY), "busy", retry_after=self.retry_after())
        settings = settings or self._settings(sampling)
        if refusal := self._cannot_finish(settings):
            return refusal
        started: asyncio.Future[Outgoing] = asyncio.get_running_loop().create_future()
        self._submitting.append(settings.max_new_tokens)
        task = asyncio.create_task(self._reply(msg, text, cut, settings, started,
                                               user_row=user_row, replaces=replaces))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(started)

    def stop(self, platform: str, chat_id: str) -> bool:
        """Stop the reply being written in a chat (stop button, /stop) at the engine's next step;
        its text so far stays, ``interrupted``, and can be rated. False if none is."""
        reply = self._live.get((platform, str(chat_id)))
        if reply is None:
            return False
        reply.cancel()
        return True

    async def keep(self, platform: str, chat_id: str, reply_id: int) -> db.Message:
        """The user went back to an earlier alternative (◀ ▶): the conversation goes on from it.
        Raises ``UnknownMessage`` for a reply outside this chat's current conversation."""
        reply = await self.store.message(reply_id)
        conversation = await self.store.current_conversation(platform, str(chat_id), self.config.store_key)
        if reply is None or reply.role != "assistant" or reply.reply_to is None or reply.conversation_id != conversation.id:
            raise UnknownMessage(f"message {reply_id} is not a reply in this chat's conversation")
        return await self.store.keep_alternative(reply.reply_to, reply_id)

    async def conversation(self, platform: str, chat_id: str, user_id: str) -> list[Turn]:
        """The chat's current conversation as its user saw it, oldest first: each user message
        with every alternative reply, the kept one marked, and the user's own ratings."""
        conversation = await self.store.current_conversation(platform, str(chat_id), self.config.store_key)
        user = await self.store.user(platform, str(user_id))
        messages = await self.store.conversation_messages(conversation.id)
        ratings = await self.store.user_ratings(user.id, conversation.id) if user else {}
        turns: list[Turn] = []
        by_question: dict[int, Turn] = {}
        for m in messages:
            if m.role == "user":
                turns.append(by_question.setdefault(m.id, Turn(m.id, m.text, [])))
            elif m.reply_to is None:  # a greeting
                turns.append(Turn(None, "", [Alternative(m.id, m.text, m.status, None, True)]))
            elif m.reply_to in by_question:
                by_question[m.reply_to].replies.append(Alternative(m.id, m.text, m.status, ratings.get(m.id), False))
        for turn in by_question.values():
            if turn.replies:
                kept = await self.store.kept_reply(turn.id)
                for alternative in turn.replies:
                    alternative.kept = kept is not None and alternative.id == kept.id
        return turns

    async def _reply(self, msg: IncomingMessage, text: str, cut: bool, settings: GenerationSettings,
                     started: asyncio.Future[Outgoing], *, user_row: db.Message | None = None,
                     replaces: db.Message | None = None) -> None:
        """Log the message (unless it is logged: a regenerate), start the reply row, then stream
        the model's reply into it."""
        stream = None
        try:
            if user_row is None:
                user_row = await self.store.add_user_message(
                    msg.platform, str(msg.chat_id), str(msg.user_id), text,
                    display_name=msg.display_name, platform_message_id=msg.platform_message_id,
                    character=self.config.store_key)
            else:
                text = user_row.text
            rows = await self._history(user_row)
            history = self._exchanges(rows)
            prompt, trimmed = self._fit(text, history)
            opening = rows[len(rows) - len(history)].id if history else None  # the prompt's first turn
            stream = self.engine.generate(prompt, settings)
            self._submitting.remove(settings.max_new_tokens)
            try:
                row = await self.store.start_reply(
                    user_row.id, adapter_version=stream.adapter_version, prompt=prompt,
                    sampling=_sampling_json(settings))
            except LookupError:  # the user ran /forget while this message waited
                stream.cancel()
                started.set_result(Answer(self._say(FORGOTTEN), "error"))
                return
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            else:
                self._submitting.remove(settings.max_new_tokens)
            _settle(started, Answer(self._say(UNAVAILABLE), "unavailable"))
            raise
        except Exception:
            log.exception("could not start a reply to a %s message", msg.platform)
            if stream is not None:  # nobody will read it: free its place in the batch
                stream.cancel()
            else:
                self._submitting.remove(settings.max_new_tokens)
            _settle(started, Answer(self._say(UNAVAILABLE), "error"))
            return
        notice = self._say(CUT, chars=len(trimmed)) if cut or trimmed != text else None
        reply = Reply(row.id, user_row.id, stream.adapter_version, notice)
        reply._cancel = stream.cancel
        reply.replaces = replaces
        chat = (msg.platform, str(msg.chat_id))
        self._live[chat] = reply
        started.set_result(reply)
        try:
            ahead = None
            if self.config.engine.prefill_next and self.config.generation.history_turns:
                ahead = lambda: self._spawn(self._prefill_next(user_row, opening, stream.adapter_version))  # noqa: E731
            await self._stream(reply, stream, ahead)
        finally:
            if self._live.get(chat) is reply:
                del self._live[chat]

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` beside the replies; close() cancels what is left of it."""
        if self._accepting:
            task = asyncio.ensure_future(work)
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        elif asyncio.iscoroutine(work):
            work.close()

    async def _stream(self, reply: Reply, stream: ReplyStream, on_first: Callable[[], None] | None = None) -> None:
        pieces: list[str] = []
        status: ReplyStatus = "failed"
        started = time.perf_counter()
        self._partial[reply.message_id] = pieces
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save_partials())
        dropped = False

        def drop_if_waiting() -> None:  # still no text after max_wait_s: give up the place
            nonlocal dropped
            if not pieces and stream.stats is None:
                dropped = True
                stream.cancel()

        timer = asyncio.get_running_loop().call_later(self.config.service.max_wait_s, drop_if_waiting)
        try:
            async for piece in stream:
                if not pieces:
                    timer.cancel()
                    if on_first is not None:
                        on_first()
                pieces.append(piece)
                reply._push(piece)
            status = _STATUS.get(stream.stats.finish_reason, "failed")
            if status == "failed":
                log.warning("reply %d failed: %s", reply.message_id, getattr(stream, "error", None))
        except asyncio.CancelledError:
            stream.cancel()  # shutdown: the engine drops it between steps
            status = "interrupted"
            raise
        except Exception:
            log.exception("reply %d failed while streaming", reply.message_id)
        finally:
            timer.cancel()
            self._partial.pop(reply.message_id, None)
            stats = getattr(stream, "stats", None)
            text = "".join(pieces).strip()
            if dropped:
                log.info("reply %d dropped: no place in the engine within %.0f s", reply.message_id,
                         self.config.service.max_wait_s)
            elif status == "complete":
                self._durations.append(time.perf_counter() - started)
            try:
                row = await self.store.finish_reply(reply.message_id, text, _reply_cost(stats, started),
                                                    status=status)
                if row is None:  # /forget deleted it while it streamed
                    status = "forgotten"
            except Exception:  # the row stays 'generating'; the next start marks it interrupted
                log.exception("could not store reply %d", reply.message_id)
            reply._finish(ReplyResult(
                text=text,
                status=status,
                finish_reason=stats.finish_reason if stats else status,
                prompt_tokens=stats.prompt_tokens if stats else 0,
                completion_tokens=stats.completion_tokens if stats else 0,
                adapter_version=reply.adapter_version,
                notice=self._say(DROPPED) if dropped else None,
            ))

    async def _save_partials(self) -> None:
        """While replies stream: every PARTIAL_SAVE_S, the text of each that grew goes to its row,
        all in one transaction. After a crash (``kill -9``) the row holds what the user saw."""
        saved: dict[int, int] = {}
        while self._partial:
            await asyncio.sleep(PARTIAL_SAVE_S)
            grown = {mid: "".join(pieces).strip() for mid, pieces in list(self._partial.items())
                     if len(pieces) != saved.get(mid)}
            saved = {mid: len(pieces) for mid, pieces in self._partial.items()}
            try:
                await self.store.save_partial_texts(grown)
            except Exception:  # the final write still comes; only the crash copy is late
                log.warning("could not save the partial text of %d replies", len(grown), exc_info=True)

    async def _history(self, user_row: db.Message, *, ahead: int = 0) -> list[db.Message]:
        """The chat's earlier turns, oldest first: at most [generation] history_turns, the oldest
        leaving history_step at a time (``Store.recent_history``); ``ahead``: as they will be
        once that many more messages are said."""
        generation = self.config.generation
        return await self.store.recent_history(user_row.conversation_id, generation.history_turns,
                                               before=None if ahead else user_row.id, step=generation.history_step,
                                               ahead=ahead)

    def _exchanges(self, rows: list[db.Message]) -> list[Exchange]:
        return [Exchange(USER_SPEAKER if m.role == "user" else self.character, neutralise(m.text)) for m in rows]

    async def _prefill_next(self, user_row: db.Message, opening: int | None, version: str | None) -> None:
        """While a reply streams: if the chat's next prompt will not begin as this one did (its
        oldest turns leave), have the engine compute the start it will begin with, so that the
        next reply's own prefill is only this reply and the next message."""
        try:
            # This message is said; its reply is still generating, so it is the one message ahead.
            rows = await self._history(user_row, ahead=1)
            # A prompt without history shares the persona with the next anyway: nothing to gain.
            if opening is None or not rows or rows[0].id == opening or not self._history_first(version):
                return
            start = self.engine.render(Sample(instruction="", history=tuple(self._exchanges(rows))),
                                       history_first=True, prefix=True)
            if start and self.engine.count_tokens(start) <= self.engine.max_prompt_tokens:
                self.engine.prefill(start)
        except Exception:  # an optimisation only: never the reply's problem
            log.warning("could not prefill the next prompt of conversation %d", user_row.conversation_id, exc_info=True)

    def _history_first(self, version: str | None) -> bool:
        """Whether ``version`` learned its prompts history first (its meta.json), else the config's."""
        if version not in self._orders:
            try:
                meta = self.adapters.registry.get(version).meta if version else None
            except UserError:  # not a version of this store (a remote server's model name)
                meta = None
            self._orders[version] = served_history_first(meta, self.config.model.history_first)
        return self._orders[version]

    def _fit(self, text: str, history: list[Exchange]) -> tuple[str, str]:
        """The prompt within the engine's token budget: oldest turns go first (history_step at a
        time, so the next prompts keep this start), then the least similar canon, then the end of
        the message itself. Returns the prompt and the message text it holds."""
        budget = self.engine.max_prompt_tokens
        version = self.engine.adapter_version
        canon = list(self.canon.lookup(text, version, self.engine.count_tokens)) if self.canon else []
        history_first = self._history_first(version)
        while True:
            prompt = self.engine.render(Sample(instruction=neutralise(text), history=tuple(history), canon=tuple(canon)),
                                        history_first=history_first)
            used = self.engine.count_tokens(prompt)
            if used <= budget:
                return prompt, text
            if history:
                del history[: self.config.generation.history_step]
            elif canon:
                canon.pop()
            elif len(text) > 1:
                text = text[: max(1, min(len(text) - 1, int(len(text) * budget / used * 0.9)))]
            else:
                raise UserError(f"[character] persona alone is longer than the prompt budget "
                                f"({used} > {budget} tokens); shorten it or raise [model] max_seq_length")

    def _settings(self, sampling: Overrides | None) -> GenerationSettings:
        base = self.config.generation
        if sampling is None:
            return base
        changes: dict[str, Any] = {}
        if sampling.max_tokens is not None:
            # [generation] max_new_tokens is the ceiling: one request cannot hold the model longer.
            changes["max_new_tokens"] = max(1, min(sampling.max_tokens, base.max_new_tokens))
        if sampling.temperature is not None:
            changes["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            changes["top_p"] = sampling.top_p
        return dataclasses.replace(base, **changes)

    # Ratings

    async def rate(self, platform: str, user_id: str, message_id: int, value: int, *,
                   display_name: str | None = None, chat_id: str | None = None) -> db.Rating:
        """Record (or change) a user's 👍 (+1) or 👎 (-1) on a reply. Raises ``RatingError``
        for an unknown message, a user's own message or a value other than ±1; with
        ``chat_id``, a reply outside that chat is unknown (``UnknownMessage``): only a user who
        can see a reply rates it."""
        if type(value) is not int or value not in (1, -1):
            raise db.RatingError(f"rating value {value!r} for message {message_id}: use 1 or -1")
        if not self._accepting:
            raise UserError("the bot is shutting down; rate again once it is back")
        self._enter()
        try:
            return await self.store.rate(message_id, platform, clean_label(str(user_id)), value,
                                         display_name=clean_label(display_name) if display_name else display_name,
                                         chat_id=None if chat_id is None else clean_label(str(chat_id)))
        except db.UnknownReply as exc:
            raise UnknownMessage(str(exc)) from None
        finally:
            self._leave()

    async def rate_platform_message(self, platform: str, chat_id: str, platform_message_id: str,
                                    user_id: str, value: int, *,
                                    display_name: str | None = None) -> db.Rating:
        """A 👍/👎 on a platform message (a reaction, a button under it): the reply it carries
        is rated. Raises ``UnknownMessage`` when it carries none of the bot's replies."""
        reply = await self.reply_by_platform_id(platform, chat_id, platform_message_id)
        if reply is None:
            raise UnknownMessage(f"{platform} message {platform_message_id} carries no reply in the log")
        return await self.rate(platform, user_id, reply.id, value, display_name=display_name, chat_id=chat_id)

    async def unrate_platform_message(self, platform: str, chat_id: str, platform_message_id: str,
                                      user_id: str, value: int) -> bool:
        """A 👍/👎 taken back (a reaction removed); only a rating of that ``value`` goes, so
        removing 👍 keeps a 👎 the user switched to since. True if one was removed."""
        if not self._accepting:
            raise UserError("the bot is shutting down; rate again once it is back")
        self._enter()
        try:
            reply = await self.reply_by_platform_id(platform, chat_id, platform_message_id)
            if reply is None:
                return False
            return await self.store.unrate(reply.id, platform, str(user_id), value)
        finally:
            self._leave()

    async def reply_by_platform_id(self, platform: str, chat_id: str,
                                   platform_message_id: str) -> db.Message | None:
        """The bot's reply that a platform message carries, or None (a user's message, or one
        the log does not know). The chat is part of the key: Telegram numbers messages per chat."""
        row = await self.store.message_by_platform_id(platform, str(chat_id), str(platform_message_id))
        return row if row is not None and row.role == "assistant" else None

    async def greet(self, platform: str, chat_id: str, display_name: str | None = None) -> db.Message | None:
        """Open the chat's current conversation with [character] greeting, addressed to
        ``display_name``, for the front-end to show; None when no greeting is configured or the
        conversation has begun (the greeting is already there, or the user spoke first)."""
        text = self.config.character.greeting_for(clean_label(display_name or "") or USER_SPEAKER)
        return None if text is None else await self.store.greet(platform, str(chat_id), text, self.config.store_key)

    async def posted(self, reply: Reply, platform_message_id: str) -> None:
        """A front-end posted part of ``reply`` as this platform message: linked at once, so a
        rating on that part finds its reply even while it streams."""
        await self.store.link_platform_messages(reply.message_id, [str(platform_message_id)])

    # Commands

    async def _command(self, msg: IncomingMessage, name: str, args: str) -> Answer:
        """Every command goes through here, so access control is in one place."""
        admin = msg.admin or self.is_admin(msg.platform, str(msg.user_id))
        if name in ADMIN_COMMANDS and not admin:
            return Answer(f"/{name} is for admins only.")
        try:
            if name == "stop":
                return Answer("Stopped." if self.stop(msg.platform, str(msg.chat_id)) else NOTHING_TO_STOP)
            if name == "reset":
                await self.store.new_conversation(msg.platform, str(msg.chat_id), self.config.store_key)
                text = "A new conversation begins; earlier messages are no longer in the prompt."
                greeting = await self.greet(msg.platform, str(msg.chat_id), msg.display_name)
                return Answer(f"{text}\n\n{greeting.text}" if greeting else text)
            if name == "forget":
                gone = await self.store.forget_user(msg.platform, str(msg.user_id))
                return Answer(f"Forgotten: {gone.messages} of your messages, {gone.replies} replies "
                              f"to them and {gone.ratings} ratings.")
            if name == "status":
                if self.cast is not None and len(self.cast) > 1:
                    return Answer("\n\n".join([as_text(await s.status()) for s in self.cast]))
                return Answer(as_text(await self.status()))
            if name in ("retrain", "rollback"):
                # /retrain 华妃: a cast member by name or alias; no name: this chat's character
                target = self.cast.require(args.strip() or None) if self.cast is not None else self
                of = f" of {target.character}" if self.cast is not None and len(self.cast) > 1 else ""
                if name == "rollback":
                    return Answer(f"Rolled back{of}: now serving adapter {await target.rollback()}.")
                run = await target.retrain(f"{msg.platform}:{msg.user_id}", self._notify(msg))
                return Answer(f"Retrain run {run.id}{of} started; you will hear when it ends.")
        except UserError as exc:
            return Answer(str(exc))
        known = USER_COMMANDS + (ADMIN_COMMANDS if admin else ())
        intro = "" if name == "help" else f"Unknown command /{name}. "
        return Answer(intro + "Commands: " + ", ".join(f"/{c}" for c in known)
                      + ". /retry answers your last message again; /stop stops the reply being written; "
                      "/reset starts a new conversation; /forget deletes your messages and ratings.")

    def _notify(self, msg: IncomingMessage) -> Callable[[str], Awaitable[None]] | None:
        send = self.notifiers.get(msg.platform)
        return (lambda text: send(str(msg.chat_id), text)) if send else None

    # Admin actions (commands and the web admin API)

    async def status(self) -> ServiceStatus:
        counts = await self.store.counts()
        versions = await asyncio.to_thread(self.adapters.versions)
        return ServiceStatus(
            character=self.character,
            active_version=self.engine.adapter_version,
            versions=tuple(v.name for v in versions),
            users=counts.users,
            conversations=counts.conversations,
            messages=counts.messages,
            replies=counts.replies,
            ratings=counts.ratings,
            replies_in_flight=len(self._tasks),
            retrain=await self._retrain_status(),
            engine=self.engine.status(),
        )

    async def _retrain_status(self) -> RetrainStatus:
        if self.retrainer is not None:
            return await self.retrainer.status()
        return RetrainStatus(running=False, last_run=await self.store.last_run(character=self.config.store_key if len(self.config.members) > 1 else None))

    async def retrain(self, requested_by: str, notify: Callable[[str], Awaitable[None]] | None = None):
        """Start a retrain (raises ``NotSetUp`` without a retrainer, ``UserError`` if one runs)."""
        if self.retrainer is None:
            raise NotSetUp(NOT_SET_UP)
        return await self.retrainer.request(trigger="admin", requested_by=requested_by, notify=notify)

    async def rollback(self) -> str:
        """Serve the adapter version active before the current one; returns its name."""
        return (await self.adapters.rollback()).name

    # Shutdown

    def _enter(self) -> None:
        self._calls += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._calls -= 1
        if self._calls == 0:
            self._idle.set()

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting messages; let replies in flight finish for ``grace_s`` seconds, then
        cancel the rest (their rows are marked interrupted). The store and engine stay open:
        whoever opened them closes them."""
        self._accepting = False
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending | self._background:
            task.cancel()
        await asyncio.gather(*pending, *self._background, return_exceptions=True)
        if self._saver is not None:
            self._saver.cancel()
            await asyncio.gather(self._saver, return_exceptions=True)
        await self._idle.wait()


_STATUS: dict[str, ReplyStatus] = {"stop": "complete", "length": "complete", "interrupted": "interrupted"}


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _settle(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _sampling_json(settings: GenerationSettings) -> dict:
    return {k: getattr(settings, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "stop")}


def _reply_cost(stats, started: float) -> db.ReplyCost:
    """The engine's measurements in the store's units; our own clock when it has none."""
    if stats is None:
        return db.ReplyCost(latency_ms=(time.perf_counter() - started) * 1000)
    return db.ReplyCost(
        latency_ms=stats.total_s * 1000,
        first_token_ms=stats.first_token_s * 1000 if stats.first_token_s is not None else None,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
    )
