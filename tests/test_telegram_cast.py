"""A cast on Telegram: ``/character`` and its buttons choose who answers in a chat, the choice
outlives a restart, and each character's replies, ratings, 🔄 and /reset stay in its own
conversation. The whole bot (``App``, builtin model, no adapters: each character speaks with the
base model) against the Bot API emulator through python-telegram-bot's real HTTP path."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bot.app import App
from bot.config import load_config
from bot.platforms.telegram import TelegramFrontend, cast_keyboard, chosen_name
from bot.service import Service
from bot.store import Store
from emulators.telegram_api import TelegramEmulator
from test_telegram import CONFIG, TOKEN, TOKEN_ENV, USER, Bot, polling

CHAT = 4242  # a second private chat, one that never chooses
EMPEROR = [("甄嬛", "character:甄嬛"), ("皇帝 ✓", "character:皇帝")]  # /character's buttons, 皇帝 answering
CAST = """
[[cast]]
name = "甄嬛"
aliases = ["嬛嬛", "莞贵人"]

[[cast]]
name = "{second}"
aliases = ["{alias}"]

[generation]
max_new_tokens = 8
temperature = 0.0

[web]
enabled = false

[console]
enabled = false

[scheduler]
enabled = false

[discord]
token_env = "ROLEBOT_TEST_NO_DISCORD"

[telegram]
token_env = "{token_env}"
base_url = "{base_url}"
edit_interval = 0.2
"""


@asynccontextmanager
async def serving(root: Path, tg: TelegramEmulator, second: str = "皇帝", alias: str = "皇上") -> AsyncIterator[Bot]:
    """``rolebot serve`` of a cast of 甄嬛 and ``second`` in ``root`` (its database stays there
    between runs), with Telegram on; stopped after."""
    (root / "config.toml").write_text(CAST.format(second=second, alias=alias, token_env=TOKEN_ENV,
                                                  base_url=tg.base_url), encoding="utf-8")
    app = await App.start(load_config(str(root / "config.toml")), train=False)
    try:
        [frontend] = app.frontends
        bot = Bot(tg, app.service, frontend)
        await polling(bot)
        yield bot
    finally:
        await app.stop()


@pytest.fixture
def telegram_on(monkeypatch, builtin_path, caplog):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    caplog.set_level(logging.INFO)
    yield
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # no handler failed


def characters(bot: Bot, chat: int) -> list[str]:
    """The character of each conversation of a chat: '' for the cast's first, else the name."""
    return [r[0] for r in bot.rows("SELECT character FROM conversations WHERE platform = 'telegram' AND chat_id = ? "
                                   "ORDER BY id", str(chat))]


async def pressed(bot: Bot, chat: int, message_id: int, data: str) -> str:
    """Press a button; what the query was answered."""
    query = await bot.tg.user_clicks(chat, chat, message_id, data)
    return (await bot.tg.wait_for(lambda: next(
        (a for a in bot.tg.answered_callbacks if a["callback_query_id"] == query), None), timeout=30))["text"]


@pytest.mark.slow
async def test_character_buttons_choose_who_answers_and_their_replies_are_theirs(tmp_path, telegram_on):
    async with TelegramEmulator(token=TOKEN) as tg, serving(tmp_path, tg) as bot:
        menu = [c["command"] for c in tg.commands['[{"type": "default"}, ""]']]
        assert menu == ["retry", "stop", "reset", "forget", "character", "help"]
        assert "/character chooses who answers in this chat (now 甄嬛)" in await bot.command(USER, "/help")

        assert await bot.command(USER, "/character") == "甄嬛 answers in this chat. Who should?"
        choice = tg.last_message(USER)
        assert choice.buttons == [("甄嬛 ✓", "character:甄嬛"), ("皇帝", "character:皇帝")]
        assert await pressed(bot, USER, choice.message_id, "character:皇帝") == "皇帝 answers here now."
        await tg.wait_for(lambda: choice.buttons == EMPEROR)
        assert choice.text == "皇帝 answers in this chat from now on."
        # An old keyboard's button of someone not in the cast, and forged data: a notice, no change.
        assert await pressed(bot, USER, choice.message_id, "character:华妃") == "That character is no longer in the cast."
        assert await pressed(bot, USER, choice.message_id, "character:") == "That character is no longer in the cast."
        assert choice.buttons == EMPEROR

        # 皇帝 answers, in a conversation of his own; a 👍 there is a rating of his.
        said = await tg.user_sends(USER, USER, "朕的江山如何？")
        row, reply = await bot.reply_to(USER, said)
        assert characters(bot, USER) == ["皇帝"]
        assert await pressed(bot, USER, reply.message_id, "rate:1") == "Rated 👍, thank you."
        assert bot.ratings() == [(row["id"], str(USER), 1)]
        store = bot.service.store
        assert (await store.ratings_since(0, "皇帝", first=False), await store.ratings_since(0, "甄嬛", first=True)) == (1, 0)

        # 🔄 writes 皇帝's reply again, in his conversation; /reset starts him a new one.
        await tg.user_clicks(USER, USER, reply.message_id, "retry")
        second = await bot.alternative(USER, row["reply_to"], 2, reply.message_id)
        assert second["conversation_id"] == row["conversation_id"]
        assert "new conversation" in await bot.command(USER, "/reset")
        assert characters(bot, USER) == ["皇帝", "皇帝"]

        # A chat that never chose talks to the cast's first.
        said = await tg.user_sends(CHAT, CHAT, "嬛嬛，你好")
        await bot.reply_to(CHAT, said)
        assert characters(bot, CHAT) == [""]


@pytest.mark.slow
async def test_character_by_name_and_the_choice_outlives_a_restart(tmp_path, telegram_on):
    async with TelegramEmulator(token=TOKEN) as tg:
        async with serving(tmp_path, tg) as bot:
            assert await bot.command(USER, "/character 华妃") == \
                "No 华妃 in the cast: choose one of 甄嬛, 皇帝 (/character shows them as buttons)."
            assert await bot.command(USER, "/character 皇上") == "皇帝 answers in this chat from now on."
            assert "皇帝 is listening" in await bot.command(USER, "/start")
            said = await tg.user_sends(USER, USER, "皇上吉祥")
            old, old_reply = await bot.reply_to(USER, said)

        async with serving(tmp_path, tg) as bot:  # the same database
            said = await tg.user_sends(USER, USER, "皇上还记得臣妾吗？")
            row, _ = await bot.reply_to(USER, said)
            assert row["conversation_id"] == old["conversation_id"] and characters(bot, USER) == ["皇帝"]
            await bot.command(USER, "/character")
            assert tg.last_message(USER).buttons == EMPEROR

        # 皇帝 leaves the cast: the chat falls back to the first; his buttons only get a notice.
        async with serving(tmp_path, tg, second="皇后", alias="皇后娘娘") as bot:
            said = await tg.user_sends(USER, USER, "嬛嬛？")
            await bot.reply_to(USER, said)
            assert characters(bot, USER) == ["皇帝", ""]
            assert await pressed(bot, USER, old_reply.message_id, "retry") == "That character is no longer in the cast."
            choice = next(m for m in tg.sent_messages(USER) if m.buttons == EMPEROR)
            assert await pressed(bot, USER, choice.message_id, "character:皇帝") == "That character is no longer in the cast."


async def test_a_cast_of_one_has_nothing_to_choose(tmp_path, caplog):
    (tmp_path / "config.toml").write_text(CONFIG, encoding="utf-8")
    async with TelegramEmulator(token=TOKEN) as tg, Store.open(tmp_path / "bot.db") as store:
        config = load_config(str(tmp_path / "config.toml"))
        config.telegram.base_url = tg.base_url
        frontend = TelegramFrontend(Service(config, store, engine=None), config.telegram, TOKEN, retry_first_s=0.01)
        await frontend.start()
        try:
            bot = Bot(tg, frontend.service, frontend)
            await polling(bot)
            assert await bot.command(USER, "/character") == "甄嬛 is the only character here."
            assert await bot.command(USER, "/character 皇帝") == "甄嬛 is the only character here."
            assert "/character" not in await bot.command(USER, "/help")
            assert [c["command"] for c in tg.commands['[{"type": "default"}, ""]']] == [
                "retry", "stop", "reset", "forget", "help"]
        finally:
            await frontend.stop()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_character_buttons_fit_telegrams_64_bytes_and_never_read_as_another_button():
    names = ["甄嬛", "皇帝", "爱新觉罗·胤禛" * 3, "rate:1", "retry"]
    markup = cast_keyboard(names, "皇帝").to_dict()["inline_keyboard"]
    assert [len(row) for row in markup] == [3, 2]
    data = [button["callback_data"] for row in markup for button in row]
    assert all(len(d.encode()) <= 64 and d.startswith("character:") for d in data)
    assert [chosen_name(d, names) for d in data] == names  # a long name by its digest
    assert chosen_name(data[2], ["甄嬛", "皇帝"]) is None and chosen_name("rate:1", names) is None
