"""The Telegram Bot API emulator, driven by a real python-telegram-bot Application.

These tests pin down both the emulator and the PTB behaviour rolebot relies on: which Bot API
calls the lifecycle makes, how PTB reports the API's errors, that AIORateLimiter waits out a 429,
and that the updater survives a failing getUpdates.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
import pytest_asyncio
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import BadRequest, InvalidToken, RetryAfter
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

from emulators.telegram_api import NOT_MODIFIED, TelegramEmulator

TOKEN = "123:ABC"
CHAT, USER = 42, 7
KEYBOARD = InlineKeyboardMarkup([[InlineKeyboardButton("👍", callback_data="up"),
                                  InlineKeyboardButton("👎", callback_data="down")]])


@pytest_asyncio.fixture
async def tg() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator(token=TOKEN) as emulator:
        yield emulator


def build_app(tg: TelegramEmulator, *, token: str = TOKEN, max_retries: int = 0) -> Application:
    return (ApplicationBuilder().token(token).base_url(tg.base_url)
            .base_file_url(tg.base_file_url).concurrent_updates(True)
            .rate_limiter(AIORateLimiter(max_retries=max_retries)).build())


@asynccontextmanager
async def polling(tg: TelegramEmulator, *handlers, max_retries: int = 0
                  ) -> AsyncIterator[Application]:
    """Run an Application the way a bot inside a larger asyncio program does (no run_polling);
    handler exceptions fail the test."""
    app = build_app(tg, max_retries=max_retries)
    app.add_handlers(handlers)
    errors: list[BaseException] = []

    async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        errors.append(context.error)

    app.add_error_handler(on_error)
    await app.initialize()
    await app.start()
    await app.updater.start_polling(poll_interval=0.05, timeout=1)
    try:
        yield app
    finally:
        await app.updater.stop()
        await app.stop()
        await app.shutdown()
    assert not errors, errors


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.message.reply_text("hello")


async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await context.bot.send_chat_action(update.effective_chat.id, "typing")
    sent = await update.message.reply_text("…", do_quote=True)
    await sent.edit_text(f"echo: {update.message.text}", reply_markup=KEYBOARD)


async def rate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    await query.answer(f"got {query.data}")
    await query.edit_message_reply_markup(None)


@pytest.mark.asyncio
async def test_echo_edit_and_callback_through_ptb(tg: TelegramEmulator) -> None:
    async with polling(tg, CommandHandler("start", start),
                       MessageHandler(filters.TEXT & ~filters.COMMAND, echo),
                       CallbackQueryHandler(rate)):
        await tg.user_sends(CHAT, USER, "/start")
        await tg.wait_for(lambda: tg.sent_messages(CHAT))
        said = await tg.user_sends(CHAT, USER, "hello there")
        reply = await tg.wait_for(lambda: (m := tg.last_message(CHAT)) and m.buttons and m)
        query_id = await tg.user_clicks(CHAT, USER, reply.message_id, "up")
        await tg.wait_for(lambda: tg.answered_callbacks and reply.reply_markup is None)

    hello, echoed = tg.sent_messages(CHAT)
    assert hello.text == "hello"
    assert [v.text for v in echoed.history] == ["…", "echo: hello there", "echo: hello there"]
    assert echoed.history[1].reply_markup == KEYBOARD.to_dict()
    assert echoed.reply_to_message_id == said["message_id"]
    assert tg.answered_callbacks == [{"callback_query_id": query_id, "text": "got up"}]
    assert ("sendChatAction", {"chat_id": CHAT, "action": "typing"}) in tg.calls

    # What the PTB lifecycle calls: initialize() -> getMe; start_polling() -> deleteWebhook,
    # then getUpdates; updater.stop() -> one last getUpdates(timeout=0) confirming what it got.
    methods = [c.method for c in tg.calls]
    assert methods[:3] == ["getMe", "deleteWebhook", "getUpdates"]
    last = tg.calls[-1]
    assert last.method == "getUpdates" and last.params["timeout"] == 0
    assert last.params["offset"] == 1003  # update ids 1000..1002 were handled
    assert tg.pending_updates == []
    assert not tg.unknown_methods


@pytest.mark.asyncio
async def test_429_is_waited_out_by_the_rate_limiter(tg: TelegramEmulator) -> None:
    tg.fail_next("sendMessage", status=429, retry_after=1)
    async with polling(tg, CommandHandler("start", start), max_retries=1):
        await tg.user_sends(CHAT, USER, "/start")
        await tg.wait_for(lambda: tg.sent_messages(CHAT), timeout=5)
    first, second = tg.calls_to("sendMessage")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0  # AIORateLimiter sleeps retry_after + 0.1 s


@pytest.mark.asyncio
async def test_polling_survives_failed_get_updates(tg: TelegramEmulator) -> None:
    tg.fail_next("getUpdates", status=502, times=2)
    tg.drop_connections(1)
    async with polling(tg, CommandHandler("start", start)):
        await tg.user_sends(CHAT, USER, "/start")
        await tg.wait_for(lambda: tg.sent_messages(CHAT), timeout=5)
    statuses = [c.status for c in tg.calls_to("getUpdates")]
    assert statuses[:4] == [502, 502, 0, 200]


@pytest.mark.asyncio
async def test_bot_api_errors_surface_as_ptb_exceptions(tg: TelegramEmulator) -> None:
    with pytest.raises(InvalidToken):
        await build_app(tg, token="999:WRONG").initialize()

    user_message = await tg.user_sends(CHAT, USER, "hi")  # the chat exists once the user wrote
    app = build_app(tg)
    async with app:
        bot = app.bot
        sent = await bot.send_message(CHAT, "answer", reply_markup=KEYBOARD,
                                      reply_to_message_id=user_message["message_id"])
        assert sent.reply_to_message.text == "hi"
        assert sent.reply_markup == KEYBOARD
        with pytest.raises(BadRequest, match="(?i)message is not modified") as exc:
            await bot.edit_message_text("answer", CHAT, sent.message_id, reply_markup=KEYBOARD)
        # PTB strips "Bad Request: " from descriptions and capitalize()s the rest.
        assert exc.value.message == NOT_MODIFIED.removeprefix("Bad Request: ").capitalize()
        edited = await bot.edit_message_text("answer", CHAT, sent.message_id)  # drops keyboard
        assert edited.reply_markup is None
        with pytest.raises(BadRequest, match="(?i)message to edit not found"):
            await bot.edit_message_text("x", CHAT, 999)
        with pytest.raises(BadRequest, match="(?i)chat not found"):
            await bot.send_message(1234, "x")
        with pytest.raises(BadRequest, match="(?i)message is too long"):
            await bot.send_message(CHAT, "x" * 4097)
        tg.fail_next("sendMessage", status=400, description="Bad Request: can't parse entities")
        with pytest.raises(BadRequest, match="(?i)can't parse entities"):
            await bot.send_message(CHAT, "<b>", parse_mode="HTML")

        await bot.set_my_commands([("reset", "Start over"), ("forget", "Forget me")])
        assert [(c.command, c.description) for c in await bot.get_my_commands()] == [
            ("reset", "Start over"), ("forget", "Forget me")]
        await bot.delete_my_commands()
        assert await bot.get_my_commands() == ()
    assert [m.text for m in tg.sent_messages(CHAT)] == ["answer"]


@pytest.mark.asyncio
async def test_flood_control_checks_edit_pacing(tg: TelegramEmulator) -> None:
    await tg.user_sends(CHAT, USER, "hi")
    tg.flood_control(0.3, retry_after=1)
    async with build_app(tg) as app:  # max_retries=0: the 429 reaches the caller
        sent = await app.bot.send_message(CHAT, "a")
        await sent.edit_text("ab")
        with pytest.raises(RetryAfter):
            await sent.edit_text("abc")
        await asyncio.sleep(0.35)
        await sent.edit_text("abcd")
    assert len(tg.flood_violations) == 1
    times = tg.call_times("editMessageText", CHAT)
    assert len(times) == 2 and times[1] - times[0] >= 0.3
    assert [v.text for v in tg.sent_messages(CHAT)[0].history] == ["a", "ab", "abcd"]


@pytest.mark.asyncio
async def test_raw_protocol(tg: TelegramEmulator) -> None:
    """The wire format, without PTB: bodies, long polling, offsets, conflicts, error bodies."""
    url = f"{tg.base_url}{TOKEN}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{tg.base_url}1:nope/getMe") as r:
            assert r.status == 401
            assert await r.json() == {"ok": False, "error_code": 401,
                                      "description": "Unauthorized"}
        async with http.get(f"{url}/noSuchMethod") as r:
            assert r.status == 404

        # A long poll answers as soon as an update arrives.
        poll = asyncio.create_task(http.post(f"{url}/getUpdates", data={"timeout": "5"}))
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await tg.user_sends(CHAT, USER, "/reset now")
        async with await poll as r:
            updates = (await r.json())["result"]
        assert time.monotonic() - began < 1
        assert updates[0]["message"]["entities"] == [
            {"type": "bot_command", "offset": 0, "length": 6}]
        # Unconfirmed updates come again; an offset confirms them.
        async with http.post(f"{url}/getUpdates", json={"timeout": 0}) as r:
            assert (await r.json())["result"] == updates
        next_id = updates[-1]["update_id"] + 1
        async with http.post(f"{url}/getUpdates", json={"offset": next_id}) as r:
            assert (await r.json())["result"] == []

        # A second poll ends the first with 409, as on the real server.
        first = asyncio.create_task(http.post(f"{url}/getUpdates", json={"timeout": 5}))
        await asyncio.sleep(0.1)
        async with http.post(f"{url}/getUpdates", json={"timeout": 0}) as r:
            assert r.status == 200
        async with await first as r:
            assert r.status == 409

        # Form values are JSON-decoded, except those that are strings by definition.
        markup = json.dumps(KEYBOARD.to_dict())
        async with http.post(f"{url}/sendMessage", data={
                "chat_id": str(CHAT), "text": "123", "reply_markup": markup}) as r:
            sent = (await r.json())["result"]
        assert sent["text"] == "123" and sent["reply_markup"] == KEYBOARD.to_dict()
        assert sent["message_id"] == 2  # ids are per chat, shared with the user's messages

        tg.fail_next("editMessageText", retry_after=3)
        async with http.post(f"{url}/editMessageText", json={
                "chat_id": CHAT, "message_id": 2, "text": "x"}) as r:
            assert r.status == 429
            assert await r.json() == {
                "ok": False, "error_code": 429, "description": "Too Many Requests: retry after 3",
                "parameters": {"retry_after": 3}}
