"""The Telegram front-end (python-telegram-bot 22.x): the character in private chats (and in
groups when asked), 👍/👎 buttons under every reply, and commands.

| what a user does                          | what the bot does                                         |
|-------------------------------------------|-----------------------------------------------------------|
| writes in a private chat; in a group      | types, then streams the reply by editing one message (at   |
| (``allow_groups``) mentions or replies to | most once per ``edit_interval``), more past 4096 UTF-16    |
| the bot                                   | units, with 👍/👎/⏹ under its last part while it streams,  |
|                                           | 👍/👎/🔄 once it is done                                    |
| presses 👍 or 👎                           | records the rating and marks the chosen button             |
| presses ⏹ (or sends ``/stop``)            | stops the reply there; its text so far stays, rateable     |
| presses 🔄 under the last reply (or sends | writes another reply to the user's last message into the   |
| ``/retry``); only the one who wrote that  | same message(s), edited in place, with fresh buttons; the  |
| message may                               | old reply stays in the log as an alternative               |
| ``/character`` (a cast,                   | the cast as buttons, the one answering here marked; a      |
| ``[[cast]]``) or ``/character 皇帝``      | press (or the name) makes that one answer in this chat     |
| (a name or an alias)                      | from then on, across restarts                              |
| ``/start``, ``/reset``, ``/forget``       | a greeting, or the service's answer                        |
| ``/status``, ``/retrain``, ``/rollback``  | the same, for admins: ``[service] admins_telegram``        |

Each chat talks to one character of the cast: the one it chose with ``/character``, else the
cast's first. Its messages, ``/reset``, ``/retry`` and ``/stop`` go to that character's service;
a button under a reply goes to the character who wrote it.

The Application runs inside rolebot's event loop (initialize, start, updater polling; no
``run_polling``, which would own the loop). ``concurrent_updates`` lets a button press through
while a long reply streams; ``AIORateLimiter`` paces calls to Telegram's limits and waits out a
429. The bot is on when the environment variable named by ``[telegram] token_env`` holds its
token; ``[telegram] base_url`` points it at a Bot API server of your own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
)
from telegram.constants import ChatAction, MessageEntityType
from telegram.error import BadRequest, InvalidToken, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot.config import Config, TelegramSettings, UnknownCharacter, secret
from bot.logs import keep_secret
from bot.platforms import Options
from bot.platforms.text import NO_TEXT, RATINGS, RETRY, STOP, Showing, paced_edits, take_over, utf16_len
from bot.platforms.text import split as text_split
from bot.service import ADMIN_COMMANDS, Answer, IncomingMessage, Reply, Service, UnknownMessage, parse_command
from training.errors import UserError

if TYPE_CHECKING:
    from bot import store as db

log = logging.getLogger(__name__)

PLATFORM = "telegram"
MAX_UNITS = 4096  # Telegram's longest message, in UTF-16 code units
CHOSEN = " ✓"  # marks the button of the vote just cast, and the character answering
RATE_DATA = {f"rate:{value}": value for value in RATINGS.values()}  # a 👍/👎 button's data → its vote
CHOOSE = "character:"  # a /character button's data: this prefix and the character's name
MAX_CALLBACK_BYTES = 64  # Telegram's limit on a button's callback data, in UTF-8 bytes
CAST_ROW = 3  # /character buttons per row
NOT_IN_CAST = "That character is no longer in the cast."  # a button of one removed since
NOT_MODIFIED = "message is not modified"  # PTB lowercases and capitalizes the API's wording
GONE = "not found"  # "Message to edit not found": the user deleted it
TYPING_EVERY_S = 4.5  # a chat action shows for 5 s or until the bot's next message
RATE_LIMIT_RETRIES = 3  # AIORateLimiter waits out this many 429s (retry_after + 0.1 s) per call
POLL_TIMEOUT_S = 10
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 300.0
# Loggers that write Bot API URLs, and so the token: PTB's bot at DEBUG, httpx at INFO.
TOKEN_LOGGERS = ("telegram.Bot", "telegram.ext.ExtBot", "httpx")
USER_COMMANDS = [
    BotCommand("retry", "Write another reply to your last message"),
    BotCommand("stop", "Stop the reply being written"),
    BotCommand("reset", "Start a new conversation"),
    BotCommand("forget", "Delete your messages and ratings"),
    BotCommand("help", "What the bot understands"),
]
CAST_COMMAND = BotCommand("character", "Choose who answers in this chat")  # in a cast's menu only
ADMIN_COMMAND_MENU = [
    BotCommand("status", "What the bot serves and how retraining stands"),
    BotCommand("retrain", "Retrain the character from the rated replies"),
    BotCommand("rollback", "Serve the previous adapter version"),
]


def menu(cast_size: int) -> list[BotCommand]:
    """Everyone's commands; /character (before /help) when there is a cast to choose from."""
    return USER_COMMANDS[:-1] + [CAST_COMMAND] + USER_COMMANDS[-1:] if cast_size > 1 else list(USER_COMMANDS)


def from_config(config: Config, service: Service, options: Options) -> TelegramFrontend | None:
    token = secret(config.telegram.token_env)
    if token is None:
        return None
    return TelegramFrontend(service, config.telegram, token, admins=config.service.admins_telegram)


class TelegramFrontend:
    """An Application polling in the background; ``start()`` never waits for Telegram, so a
    platform that is down delays nothing else."""

    name = "telegram"

    def __init__(self, service: Service, settings: TelegramSettings, token: str, *,
                 admins: list[str] = (), retry_first_s: float = RETRY_FIRST_S):
        self.service = service
        self.settings = settings
        self.token = token
        self.admins = list(admins)
        self.retry_first_s = retry_first_s
        self.error: str | None = None  # why this platform gave up, if it did
        keep_secret(token)  # every line rolebot writes, beside the loggers that log Bot API URLs
        self._redact_filter = Redact(token)
        for name in TOKEN_LOGGERS:  # before the bot exists: it logs its URL when made
            logging.getLogger(name).addFilter(self._redact_filter)
        self.app = self._build()
        self._votes: dict[int, int | None] = {}  # reply row → vote, while the reply streams
        self._showing = Showing()  # the replies streaming now, for ⏹ and for 🔄 in place
        self._task: asyncio.Task | None = None

    def _build(self) -> Application:
        app = (ApplicationBuilder().token(self.token).base_url(self.settings.base_url)
               .concurrent_updates(True)
               .rate_limiter(AIORateLimiter(max_retries=RATE_LIMIT_RETRIES))
               .build())
        chats = filters.ChatType.PRIVATE
        if self.settings.allow_groups:
            chats = chats | filters.ChatType.GROUPS
        app.add_handler(CommandHandler("start", self.greet, filters=chats))
        app.add_handler(CommandHandler(["stop", "reset", "forget", "help", *ADMIN_COMMANDS], self.command,
                                       filters=chats))
        app.add_handler(CommandHandler("retry", self.retry_command, filters=chats))
        app.add_handler(CommandHandler("character", self.character, filters=chats))
        app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND & chats, self.chat))
        app.add_handler(CallbackQueryHandler(self.rate, pattern=r"^rate:-?1\Z"))
        app.add_handler(CallbackQueryHandler(self.retry, pattern=r"^retry$"))
        app.add_handler(CallbackQueryHandler(self.stop_button, pattern=r"^stop$"))
        app.add_handler(CallbackQueryHandler(self.choose_button, pattern=f"^{CHOOSE}"))
        app.add_handler(CallbackQueryHandler(self.unknown_button))
        app.add_error_handler(self.on_error)
        return app

    async def start(self) -> None:
        for service in self._cast():  # a retrain of any character reports to the chat that asked
            service.notifiers[PLATFORM] = self.notify
        self._task = asyncio.create_task(self._connect(), name="telegram")

    async def stop(self) -> None:
        for service in self._cast():
            service.notifiers.pop(PLATFORM, None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.app.updater.running:
            await self.app.updater.stop()
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()
        for name in TOKEN_LOGGERS:
            logging.getLogger(name).removeFilter(self._redact_filter)

    async def _connect(self) -> None:
        """Start polling, retrying with back-off while Telegram cannot be reached. Once it
        polls, PTB's updater retries a failed or dropped getUpdates by itself."""
        delay = self.retry_first_s
        while True:
            try:
                await self.app.initialize()  # getMe: checks the token
                await self._set_commands()
                await self.app.updater.start_polling(
                    timeout=POLL_TIMEOUT_S, allowed_updates=["message", "callback_query"],
                    error_callback=self._polling_failed)
                await self.app.start()
                log.info("Telegram: polling as @%s", self.app.bot.username)
                return
            except InvalidToken:  # its message holds the token: never log it
                self.error = (f"Telegram refused the bot token in ${self.settings.token_env}: check "
                              "the variable (@BotFather → /token); Telegram is off until rolebot restarts")
                log.error("%s", self.error)
                return
            except TelegramError as exc:
                log.warning("Telegram: cannot connect (%s); retrying in %.1f s", self._redact(exc), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _set_commands(self) -> None:
        """The command menu: everyone's commands (with /character for a cast), and in each
        admin's private chat theirs too."""
        users = menu(len(self._cast()))
        await self.app.bot.set_my_commands(users)
        for admin in self.admins:
            try:
                await self.app.bot.set_my_commands(users + ADMIN_COMMAND_MENU, scope=BotCommandScopeChat(int(admin)))
            except (BadRequest, ValueError) as exc:  # e.g. the admin has not opened the chat yet
                log.info("Telegram: no admin command menu for %s: %s", admin, exc)

    def _polling_failed(self, exc: TelegramError) -> None:
        log.warning("Telegram: polling failed (%s); retrying", self._redact(exc))

    def _redact(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}".replace(self.token, "[token]")

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Errors of handlers (a failed send, say) are logged; the bot carries on."""
        log.error("Telegram: an update could not be handled: %s", self._redact(context.error),
                  exc_info=context.error)

    async def notify(self, chat_id: str, text: str) -> None:
        """Send to a chat unprompted (e.g. that a retrain ended)."""
        for part in split(text):
            await self.app.bot.send_message(int(chat_id), part)

    # Commands

    async def greet(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/start: who is here and what the buttons and commands do, then the character's
        greeting ([character] greeting) if this conversation has not begun."""
        message = update.effective_message
        service = await self._answering(message.chat_id)
        cast = self._cast()
        others = (f" /character chooses who answers here: {', '.join(s.character for s in cast)}."
                  if len(cast) > 1 else "")
        await message.reply_text(
            f"{service.character} is listening: just write. 👍 or 👎 under a reply rates it, "
            f"{RETRY} (or /retry) writes another one in its place, {STOP} (or /stop) stops one being "
            "written; /reset starts a new conversation, /forget deletes your messages and ratings." + others)
        greeting = await service.greet(PLATFORM, str(message.chat_id), update.effective_user.full_name)
        if greeting is not None:
            for part in split(greeting.text):
                await message.reply_text(part)

    async def command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/stop, /reset, /forget, /help and the admin commands: the service of the character
        answering in this chat decides who may."""
        message = update.effective_message
        service = await self._answering(message.chat_id)
        out = await service.handle(self._incoming(update, message.text))
        text = out.text
        if parse_command(message.text)[0] == "help" and len(self._cast()) > 1:
            text += f"\n\n/character chooses who answers in this chat (now {service.character})."
        for part in split(text):  # a command is answered with an Answer, never a Reply
            await message.reply_text(part)

    async def character(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/character: the cast as buttons, the character answering here marked; /character NAME
        (a name or an alias) chooses directly. A cast of one has nothing to choose."""
        message = update.effective_message
        cast = self._cast()
        if len(cast) == 1:
            await message.reply_text(f"{self.service.character} is the only character here.")
            return
        name = " ".join(context.args or ())
        if not name:
            current = await self._answering(message.chat_id)
            await message.reply_text(f"{current.character} answers in this chat. Who should?",
                                     reply_markup=cast_keyboard([s.character for s in cast], current.character))
            return
        try:
            chosen = await self.service.cast.choose(PLATFORM, str(message.chat_id), name)
        except UnknownCharacter:
            await message.reply_text(f"No {name} in the cast: choose one of "
                                     f"{', '.join(s.character for s in cast)} (/character shows them as buttons).")
            return
        await message.reply_text(chosen_text(chosen.character))

    # Messages

    def addressed(self, message: Message, username: str, bot_id: int) -> bool:
        """Private chats always; in groups, a message that mentions the bot or replies to it."""
        if message.chat.type == "private":
            return True
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == bot_id:
            return True
        mentions = message.parse_entities([MessageEntityType.MENTION]).values()
        return any(m.lower() == f"@{username}".lower() for m in mentions)

    async def chat(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A message to the character: stream the reply, with 👍/👎 buttons under it."""
        message = update.effective_message
        bot = context.bot
        if not self.addressed(message, bot.username, bot.id):
            return
        text = message.text.replace(f"@{bot.username}", "").strip()
        typing = asyncio.create_task(self._typing(message.chat_id))
        try:
            service = await self._answering(message.chat_id)
            out = await service.handle(self._incoming(update, text))
            if isinstance(out, Answer):
                await message.reply_text(out.text)
                return
            if out.notice:
                await message.reply_text(out.notice)
            await self.stream(message, out, typing)
        finally:
            typing.cancel()

    async def retry_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/retry: another reply to the user's last message (to the character answering in this
        chat), written over the last reply."""
        message = update.effective_message
        service = await self._answering(message.chat_id)
        out = await service.handle(self._incoming(update, message.text))
        if isinstance(out, Answer):  # nothing to retry, not theirs, rate limited
            for part in split(out.text):
                await message.reply_text(part)
            return
        if out.notice:
            await message.reply_text(out.notice)
        await self.rewrite(message, out)

    def _cast(self) -> list[Service]:
        """The characters this bot plays, the default (``self.service``) first."""
        return list(self.service.cast) if self.service.cast is not None else [self.service]

    async def _answering(self, chat_id: int) -> Service:
        """The character answering in a chat: the one it chose with /character, else the default."""
        cast = self.service.cast
        return self.service if cast is None else await cast.answering(PLATFORM, str(chat_id))

    async def _speaker(self, reply: db.Message) -> Service | None:
        """The character who wrote ``reply``; None if it has left the cast since."""
        cast = self.service.cast
        return self.service if cast is None else await cast.speaker(reply)

    def _incoming(self, update: Update, text: str) -> IncomingMessage:
        user, message = update.effective_user, update.effective_message
        return IncomingMessage(PLATFORM, str(message.chat_id), str(user.id), text,
                               display_name=user.full_name, platform_message_id=str(message.message_id))

    async def _typing(self, chat_id: int) -> None:
        """"typing…" until the first text shows; a failed chat action only ends it."""
        try:
            while True:
                await self.app.bot.send_chat_action(chat_id, ChatAction.TYPING)
                await asyncio.sleep(TYPING_EVERY_S)
        except TelegramError as exc:
            log.info("Telegram: no typing indicator in chat %s: %s", chat_id, exc)

    async def stream(self, message: Message, reply: Reply, typing: asyncio.Task,
                     parts: list[Message] | None = None) -> list[Message]:
        """Show the reply as it grows: the first text as a reply to the user, then an edit at
        most every ``edit_interval`` seconds; past 4096 units it goes on in a new message. The
        buttons sit under the last part. Returns the messages, each linked to the reply's row.
        ``parts``: messages to write it into first (a regenerate's, see ``rewrite``)."""
        parts = [] if parts is None else parts
        self._votes[reply.message_id] = None

        async def show(text: str) -> bool:
            try:
                await self._show(message, reply, parts, text, done=False)
                return True
            except RetryAfter:  # the rate limiter gave up waiting: skip this edit
                log.info("Telegram: flood control; reply %d shown later", reply.message_id)
                return False
            finally:
                typing.cancel()

        try:
            with self._showing.showing(reply):
                final = await paced_edits(reply, self.settings.edit_interval, show, last_edit=True)
                await self._show(message, reply, parts, final, done=True)
        finally:
            del self._votes[reply.message_id]
        return parts

    async def _show(self, message: Message, reply: Reply, parts: list[Message], text: str, *,
                    done: bool) -> None:
        """Make the posted messages read ``text``: edit the parts that changed, post new ones."""
        chunks = split(text.strip())
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            markup = keyboard(self._votes.get(reply.message_id), streaming=not done) if last else None
            if i < len(parts):
                if (parts[i].text, parts[i].reply_markup) != (chunk, markup):
                    try:
                        parts[i] = await edit(parts[i], chunk, markup)
                        continue
                    except BadRequest as exc:  # the user deleted it: the text goes on in a new one
                        if GONE not in exc.message.lower():
                            raise
                    parts[i] = await message.get_bot().send_message(message.chat_id, chunk, reply_markup=markup)
                    await self.service.posted(reply, str(parts[i].message_id))
                continue
            if parts:
                sent = await message.get_bot().send_message(message.chat_id, chunk, reply_markup=markup)
            else:
                sent = await message.reply_text(chunk, reply_markup=markup)
            parts.append(sent)
            await self.service.posted(reply, str(sent.message_id))

    # Regenerate and stop

    async def retry(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """🔄 pressed under a reply: the service decides whether this user may have another (only
        the author of the last message, only under its reply); a refusal is the query's answer."""
        query = update.callback_query
        try:
            row = await self.service.reply_by_platform_id(PLATFORM, str(query.message.chat.id),
                                                          str(query.message.message_id))
            speaker = await self._speaker(row) if row is not None else None
            if speaker is None:
                await query.answer("This reply is no longer in the log." if row is None else NOT_IN_CAST)
                return
            user = query.from_user
            out = await speaker.regenerate(IncomingMessage(
                PLATFORM, str(query.message.chat.id), str(user.id), "", display_name=user.full_name),
                reply_id=row.id)
        except Exception:
            await query.answer("That did not work; please try again.")
            raise
        if isinstance(out, Answer):
            await query.answer(out.text)
            return
        await query.answer(out.notice)
        await self.rewrite(query.message, out)

    async def rewrite(self, anchor: Message, reply: Reply) -> list[Message]:
        """Stream a regenerated reply into the message that showed the reply it replaces (edited
        in place, with a fresh keyboard: no vote marked); that reply's further parts are deleted
        (see ``take_over``). Without messages to take over, it is posted as a reply to ``anchor``."""
        chat = anchor.chat
        typing = asyncio.create_task(self._typing(chat.id))
        try:
            with self._showing.showing(reply):  # from now: a second 🔄 waits for this one
                keep, drop = await take_over(self.service, self._showing, reply)
                for message_id in drop:
                    await self._drop(chat.id, int(message_id))
                parts = [known(anchor, int(message_id)) for message_id in keep]
                return await self.stream(parts[0] if parts else anchor, reply, typing, parts)
        finally:
            typing.cancel()

    async def _drop(self, chat_id: int, message_id: int) -> None:
        """Delete a part of a replaced reply; one Telegram will not delete (older than 48 hours)
        is emptied instead; one that is gone already is fine."""
        try:
            await self.app.bot.delete_message(chat_id, message_id)
        except BadRequest:
            try:
                await self.app.bot.edit_message_text(NO_TEXT, chat_id=chat_id, message_id=message_id)
            except BadRequest as exc:
                log.info("Telegram: part %s of a replaced reply left as it was: %s", message_id, exc)

    async def stop_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """⏹ pressed under a reply being written: it stops at the engine's next step; its text so
        far stays (interrupted) and the buttons turn to 👍/👎/🔄 with its last edit."""
        query = update.callback_query
        try:
            row = await self.service.reply_by_platform_id(PLATFORM, str(query.message.chat.id),
                                                          str(query.message.message_id))
            reply = self._showing.get(row.id) if row is not None else None
        except Exception:
            await query.answer("That did not work; please try again.")
            raise
        if reply is None:
            await query.answer("This reply is already finished.")
            return
        reply.cancel()
        await query.answer("Stopped.")

    # Choosing the character

    async def choose_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A character's button under /character pressed: that character answers in this chat
        from now on. The query is always answered (until it is, the client shows a spinner on
        the button); a button of a character since removed from the cast, or forged data, gets
        a notice."""
        query = update.callback_query
        names = [s.character for s in self._cast()]
        name = chosen_name(query.data, names)
        if name is None:
            await query.answer(NOT_IN_CAST)
            return
        cast = self.service.cast
        try:
            chosen = self.service if cast is None else await cast.choose(PLATFORM, str(query.message.chat.id), name)
        except Exception:
            await query.answer("That did not work; please try again.")
            raise
        await query.answer(f"{chosen.character} answers here now.")
        await edit(query.message, chosen_text(chosen.character), cast_keyboard(names, chosen.character))

    # Ratings

    async def rate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """👍/👎 pressed under a reply. The query is always answered: until it is, the user's
        client shows a spinner on the button. A query with empty data comes here too (PTB
        matches a handler's pattern only against non-empty data): it is an unknown button."""
        query = update.callback_query
        value = RATE_DATA.get(query.data)
        if value is None:
            await self.unknown_button(update, context)
            return
        try:
            rated, notice = await self._record(query, value)
        except Exception:
            await query.answer("That did not work; please try again.")
            raise
        await query.answer(notice)
        if rated is not None:
            streaming = rated in self._votes
            if streaming:  # its next edit keeps the mark
                self._votes[rated] = value
            await edit_markup(query.message, keyboard(value, streaming=streaming))

    async def unknown_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button this bot does not know (an old keyboard, a forged query): answered too, or the
        user's client shows a spinner on it."""
        await update.callback_query.answer("Unknown button.")

    async def _record(self, query, value: int) -> tuple[int | None, str]:
        """Store the vote; returns the reply's row (None if not rated) and what to tell the user."""
        try:
            rating = await self.service.rate_platform_message(
                PLATFORM, str(query.message.chat.id), str(query.message.message_id),
                str(query.from_user.id), value, display_name=query.from_user.full_name)
        except UnknownMessage:
            return None, "This reply is no longer in the log."
        except UserError as exc:
            return None, str(exc)
        return rating.message_id, f"Rated {'👍' if value > 0 else '👎'}, thank you."


class Redact(logging.Filter):
    """Replaces the token in the records of a logger that logs Bot API URLs, which hold it."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token in message:
            record.msg, record.args = message.replace(self.token, "[token]"), None
        return True


def keyboard(chosen: int | None = None, *, streaming: bool = False) -> InlineKeyboardMarkup:
    """👍/👎 under a reply, the chosen one marked; then ⏹ while it streams, 🔄 once it is done."""
    buttons = [InlineKeyboardButton(emoji + (CHOSEN if value == chosen else ""), callback_data=f"rate:{value}")
               for emoji, value in RATINGS.items()]
    buttons.append(InlineKeyboardButton(STOP, callback_data="stop") if streaming
                   else InlineKeyboardButton(RETRY, callback_data="retry"))
    return InlineKeyboardMarkup([buttons])


def cast_keyboard(names: list[str], current: str) -> InlineKeyboardMarkup:
    """A button per character of the cast, the one answering now marked."""
    buttons = [InlineKeyboardButton(name + (CHOSEN if name == current else ""), callback_data=choice_data(name))
               for name in names]
    return InlineKeyboardMarkup([buttons[i:i + CAST_ROW] for i in range(0, len(buttons), CAST_ROW)])


def choice_data(name: str) -> str:
    """A /character button's data: ``CHOOSE`` and the name, or a digest of a name too long for
    Telegram's 64 bytes of callback data. Never ``rate:…``, ``retry`` or ``stop``."""
    data = CHOOSE + name
    if len(data.encode()) <= MAX_CALLBACK_BYTES:
        return data
    return f"{CHOOSE}#{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def chosen_name(data: str | None, names: list[str]) -> str | None:
    """The character of ``names`` a /character button's data chooses; None for any other data
    (a character no longer in the cast, forged data)."""
    return next((name for name in names if choice_data(name) == data), None)


def chosen_text(name: str) -> str:
    return f"{name} answers in this chat from now on."


def known(anchor: Message, message_id: int) -> Message:
    """A message of the bot's in ``anchor``'s chat, to edit by id (its text unknown here)."""
    if message_id == anchor.message_id and isinstance(anchor, Message):
        return anchor
    message = Message(message_id, datetime.now(UTC), Chat(anchor.chat.id, anchor.chat.type))
    message.set_bot(anchor.get_bot())
    return message


async def edit(message: Message, text: str, markup: InlineKeyboardMarkup | None) -> Message:
    """Edit a message's text; an edit that changes nothing is not an error here."""
    try:
        return await message.edit_text(text, reply_markup=markup)
    except BadRequest as exc:
        if NOT_MODIFIED not in exc.message.lower():
            raise
        return message


async def edit_markup(message: Message, markup: InlineKeyboardMarkup) -> None:
    try:
        await message.edit_reply_markup(markup)
    except BadRequest as exc:
        if NOT_MODIFIED not in exc.message.lower():
            raise


def split(text: str, limit: int = MAX_UNITS) -> list[str]:
    """Telegram's limit is in UTF-16 units, not characters."""
    return text_split(text, limit, utf16_len)
