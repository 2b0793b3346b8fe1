"""The Telegram front-end through python-telegram-bot's real HTTP path, against the Bot API
emulator on loopback (``[telegram] base_url``), with the real service and engine (builtin model,
no adapter) and a real SQLite store. Each test plays a Telegram user."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import load_config
from bot.platforms import Options
from bot.platforms.telegram import MAX_UNITS, TelegramFrontend, from_config, keyboard, split, utf16_len
from bot.service import NOT_LAST, NOT_YOURS, NOTHING_TO_STOP, Service
from bot.status import RetrainStatus
from bot.store import Store
from emulators.telegram_api import TelegramEmulator

TOKEN = "123456:SECRET-telegram-token"
TOKEN_ENV = "ROLEBOT_TEST_TELEGRAM_TOKEN"
ADMIN, USER = 42, 7
GROUP = -100500
DONE_BUTTONS = [("👍", "rate:1"), ("👎", "rate:-1"), ("🔄", "retry")]  # under a finished reply
STREAMING_BUTTONS = [("👍", "rate:1"), ("👎", "rate:-1"), ("⏹", "stop")]  # while it streams
CONFIG = f"""
[generation]
max_new_tokens = 8
temperature = 0.0

[console]
enabled = false

[web]
enabled = false

[telegram]
token_env = "{TOKEN_ENV}"
allow_groups = true
edit_interval = 0.2

[service]
admins_telegram = ["{ADMIN}"]
"""


# Splitting: no model needed.


def test_long_text_is_split_at_4096_utf16_units_without_breaking_a_character():
    text = "嬛" * 4000 + "😀" * 100 + " tail"  # 😀 is two UTF-16 units
    parts = split(text)
    assert all(utf16_len(p) <= MAX_UNITS for p in parts) and "".join(parts) == text
    assert parts[0] == "嬛" * 4000 + "😀" * 48
    words = "word " * 2000
    first = split(words)[0]
    assert first.endswith("word") and split(words + "more words")[0] == first  # stable as it grows
    assert split("") == ["（…）"]


def test_the_front_end_is_on_only_when_its_token_variable_is_set(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text(CONFIG, encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert from_config(config, object(), Options()) is None
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    frontend = from_config(config, object(), Options())
    assert frontend.name == "telegram" and frontend.app.bot.token == TOKEN
    assert frontend.admins == [str(ADMIN)]


# The front-end with the real service.


@pytest.fixture(scope="module")
def project(tmp_path_factory, builtin_path) -> Path:
    root = tmp_path_factory.mktemp("telegram")
    (root / "config.toml").write_text(CONFIG, encoding="utf-8")
    return root


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(project):
    from bot.engine import make_engine

    engine = make_engine(load_config(str(project / "config.toml")), None)
    await engine.start()
    yield engine
    await engine.close()


@dataclasses.dataclass
class Bot:
    tg: TelegramEmulator
    service: Service
    frontend: TelegramFrontend

    def rows(self, sql: str, *params) -> list[sqlite3.Row]:
        with sqlite3.connect(self.service.config.database) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def platform_ids(self, message_id: int) -> list[str]:
        return [r[0] for r in self.rows(
            "SELECT platform_message_id FROM message_platform_ids WHERE message_id = ? ORDER BY rowid",
            message_id)]

    async def reply_to(self, chat: int, said: dict, timeout: float = 60):
        """The bot's finished reply to a user message: its row and its (last) Telegram message,
        found through the platform ids the store keeps."""
        def done():
            rows = self.rows("SELECT r.* FROM messages r JOIN message_platform_ids p ON p.message_id = r.reply_to "
                             "WHERE p.platform_message_id = ? AND r.status != 'generating'",
                             str(said["message_id"]))
            if not rows or not (ids := self.platform_ids(rows[0]["id"])):
                return None
            sent = next(m for m in self.tg.sent_messages(chat) if m.message_id == int(ids[-1]))
            finished = sent.buttons[-1:] == [("🔄", "retry")]  # the last edit's keyboard
            return sent.text == (rows[0]["text"] or "（…）") and finished and (rows[0], sent)
        return await eventually(done, timeout)

    def alternatives(self, user_message_id: int) -> list[sqlite3.Row]:
        return self.rows("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", user_message_id)

    async def alternative(self, chat: int, user_message_id: int, n: int, message_id: int):
        """The ``n``-th reply (1: the first) to a user message, once it is finished and the
        Telegram message ``message_id`` shows it in full, with the buttons of a finished reply."""
        def done():
            rows = self.alternatives(user_message_id)
            if len(rows) < n or rows[n - 1]["status"] == "generating":
                return None
            [sent] = [m for m in self.tg.sent_messages(chat) if m.message_id == message_id]
            return sent.text == (rows[n - 1]["text"] or "（…）") and sent.buttons == DONE_BUTTONS and rows[n - 1]
        return await eventually(done, 60)

    def ratings(self) -> list[tuple]:
        return [tuple(r) for r in self.rows(
            "SELECT r.message_id, u.platform_user_id, r.value FROM ratings r JOIN users u ON u.id = r.user_id")]

    async def command(self, chat: int, text: str) -> str:
        """What the bot answers to a command (its next message in the chat)."""
        before = len(self.tg.sent_messages(chat))
        await self.tg.user_sends(chat, chat, text)
        await self.tg.wait_for(lambda: len(self.tg.sent_messages(chat)) > before)
        return self.tg.sent_messages(chat)[before].text


async def eventually(predicate, timeout: float = 10):
    """Wait until ``predicate()`` is truthy. It polls: the emulator's own ``wait_for`` wakes only
    when the emulator's state changes, not when a row in the database does."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.05)
    return result


@pytest_asyncio.fixture(loop_scope="module")
async def bot(project, engine, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every log line, from before the bot exists, for the token check
    async with TelegramEmulator(token=TOKEN) as tg, running(project, engine, tmp_path, tg) as bot:
        yield bot
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # no handler failed


@asynccontextmanager
async def running(project: Path, engine, tmp_path: Path, tg: TelegramEmulator, *, token: str = TOKEN):
    """A service over a fresh database and a started Telegram front-end; stopped after."""
    config = load_config(str(project / "config.toml"))
    config.store.path = str(tmp_path / "bot.db")
    config.telegram.base_url = tg.base_url
    async with Store.open(config.database) as store:
        service = Service(config, store, engine)
        frontend = TelegramFrontend(service, config.telegram, token, admins=config.service.admins_telegram,
                                    retry_first_s=0.05)
        await frontend.start()  # returns at once: it connects in the background
        try:
            yield Bot(tg, service, frontend)
        finally:
            await frontend.stop()
            await service.close()
    assert not tg.unknown_methods


async def polling(bot: Bot) -> None:
    """Until the bot's first long poll is waiting."""
    await bot.tg.wait_for(lambda: bot.tg.calls_to("getUpdates"))


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_private_chat_reply_streams_with_buttons_and_is_rated(bot, caplog):
    tg = bot.tg
    tg.flood_control(0.2)  # Telegram refuses edits that come faster than the bot's pacing
    await polling(bot)
    said = await tg.user_sends(USER, USER, "皇上吉祥！", first_name="Alice")
    row, reply = await bot.reply_to(USER, said)

    # It typed, then showed the reply as it grew: every version begins the final text.
    assert tg.calls_to("sendChatAction")[0].params == {"chat_id": USER, "action": "typing"}
    texts = [v.text for v in reply.history]
    assert texts[-1] == row["text"] and all(row["text"].startswith(t) for t in texts)
    assert not tg.flood_violations
    assert reply.buttons == DONE_BUTTONS

    # Both sides are in SQLite with their Telegram ids.
    user_row = bot.rows("SELECT * FROM messages WHERE id = ?", row["reply_to"])[0]
    assert (user_row["role"], user_row["text"]) == ("user", "皇上吉祥！")
    assert bot.platform_ids(user_row["id"]) == [str(said["message_id"])]
    assert (row["role"], row["status"]) == ("assistant", "complete")
    assert bot.platform_ids(row["id"]) == [str(reply.message_id)]
    assert bot.rows("SELECT platform, chat_id FROM conversations")[0][:] == ("telegram", str(USER))

    # 👍, then a change of mind: the query is answered, the button shows the vote, the row counts it.
    query = await tg.user_clicks(USER, USER, reply.message_id, "rate:1")
    await tg.wait_for(lambda: tg.answered_callbacks and reply.buttons[0][0] == "👍 ✓")
    assert tg.answered_callbacks[-1] == {"callback_query_id": query, "text": "Rated 👍, thank you."}
    assert bot.ratings() == [(row["id"], str(USER), 1)]
    await tg.user_clicks(USER, USER, reply.message_id, "rate:-1")
    await tg.wait_for(lambda: reply.buttons == [("👍", "rate:1"), ("👎 ✓", "rate:-1"), ("🔄", "retry")])
    assert bot.ratings() == [(row["id"], str(USER), -1)]
    await tg.user_clicks(USER, USER, reply.message_id, "rate:-1")  # the same again: nothing to edit
    await tg.wait_for(lambda: len(tg.answered_callbacks) == 3)
    assert bot.ratings() == [(row["id"], str(USER), -1)] and reply.buttons[1][0] == "👎 ✓"
    # A button the bot does not know (an old keyboard, forged data) is answered too.
    query = await tg.user_clicks(USER, USER, reply.message_id, "launch:missiles")
    await tg.wait_for(lambda: len(tg.answered_callbacks) == 4)
    assert tg.answered_callbacks[-1] == {"callback_query_id": query, "text": "Unknown button."}
    assert bot.ratings() == [(row["id"], str(USER), -1)]

    # The token is in no log line and nowhere in the database.
    assert TOKEN not in caplog.text
    assert TOKEN.encode() not in Path(bot.service.config.database).read_bytes()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_commands_admins_and_the_command_menu(bot):
    tg = bot.tg
    retrains = []

    class Retrainer:  # stands in for the training subprocess; the run row is real
        async def request(self, *, trigger, requested_by, notify):
            run = await bot.service.store.start_run(trigger, requested_by)
            retrains.append(requested_by)
            asyncio.get_running_loop().call_later(0.1, lambda: asyncio.ensure_future(notify("Run finished.")))
            return run

        async def status(self):
            return RetrainStatus(running=bool(retrains), last_run=None)

    bot.service.retrainer = Retrainer()
    await polling(bot)
    assert [c["command"] for c in tg.commands['[{"type": "default"}, ""]']] == ["retry", "stop", "reset", "forget", "help"]
    admin_menu = tg.commands[f'[{{"chat_id": {ADMIN}, "type": "chat"}}, ""]']
    assert [c["command"] for c in admin_menu][-3:] == ["status", "retrain", "rollback"]

    command = bot.command
    assert "is listening" in await command(USER, "/start")
    bot.service.config.character.greeting = "{{user}}，嬛嬛给您请安。"
    try:  # a conversation that has not begun opens with the character's greeting, once
        await command(ADMIN, "/start")
        await tg.wait_for(lambda: tg.last_message(ADMIN).text.endswith("，嬛嬛给您请安。"))
        assert bot.rows("SELECT text FROM messages WHERE role = 'assistant' AND reply_to IS NULL")[0][0] \
            == tg.last_message(ADMIN).text
    finally:
        bot.service.config.character.greeting = ""
    assert await command(USER, "/retrain") == "/retrain is for admins only."
    assert retrains == [] and bot.rows("SELECT * FROM training_runs") == []
    assert "/retrain" not in await command(USER, "/help")

    assert (await command(ADMIN, "/retrain")).startswith("Retrain run 1 started")
    assert retrains == [f"telegram:{ADMIN}"]
    await tg.wait_for(lambda: tg.last_message(ADMIN).text == "Run finished.")
    assert "serving the base model (no adapter)" in await command(ADMIN, "/status")
    assert "new conversation" in await command(USER, "/reset")


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_groups_answer_only_when_addressed(bot):
    tg = bot.tg
    await polling(bot)
    await tg.user_sends(GROUP, USER, "people talking among themselves", chat_type="group")
    mention = "@rolebot_test_bot"
    said = await tg.user_sends(GROUP, USER, f"{mention} 你是谁？", chat_type="group",
                               entities=[{"type": "mention", "offset": 0, "length": len(mention)}])
    row, reply = await bot.reply_to(GROUP, said)
    assert "@rolebot_test_bot" not in bot.rows("SELECT text FROM messages WHERE id = ?", row["reply_to"])[0][0]
    answer = await tg.user_sends(GROUP, ADMIN, "说下去", chat_type="group", reply_to_message_id=reply.message_id)
    await bot.reply_to(GROUP, answer)
    assert [r[0] for r in bot.rows("SELECT text FROM messages WHERE role = 'user' ORDER BY id")] == ["你是谁？", "说下去"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_429_is_waited_out_and_a_dropped_poll_resumed(bot):
    tg = bot.tg
    await polling(bot)
    tg.fail_next("sendMessage", 429, retry_after=1)
    tg.drop_connections(1)  # cuts the waiting long poll
    tg.fail_next("getUpdates", 502)  # and Telegram's front answers a Bad Gateway once
    said = await tg.user_sends(USER, USER, "你还在吗？")
    row, reply = await bot.reply_to(USER, said)
    first, second = tg.calls_to("sendMessage")[:2]
    assert (first.status, second.status) == (429, 200) and second.at - first.at >= 1.0
    statuses = [c.status for c in tg.calls_to("getUpdates")]
    assert 0 in statuses and 502 in statuses and statuses[-1] in (200, None)
    assert reply.text == row["text"]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_telegram_down_at_start_is_retried(project, engine, tmp_path):
    async with TelegramEmulator(token=TOKEN) as tg:
        tg.fail_next("getMe", 502, times=2)
        async with running(project, engine, tmp_path, tg) as bot:
            await polling(bot)
            said = await tg.user_sends(USER, USER, "早安")
            await bot.reply_to(USER, said)
        assert [c.status for c in tg.calls_to("getMe")] == [502, 502, 200]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_bad_token_stops_telegram_with_one_clear_error(tmp_path, caplog):
    bad = "999:WRONG-token"
    (tmp_path / "config.toml").write_text(CONFIG, encoding="utf-8")
    async with TelegramEmulator(token=TOKEN) as tg, Store.open(tmp_path / "bot.db") as store:
        config = load_config(str(tmp_path / "config.toml"))
        config.telegram.base_url = tg.base_url
        frontend = TelegramFrontend(Service(config, store, engine=None), config.telegram, bad,
                                    retry_first_s=0.01)
        await frontend.start()
        await eventually(lambda: frontend.error)
        await asyncio.sleep(0.1)
        await frontend.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [frontend.error] and f"${TOKEN_ENV}" in frontend.error
    assert bad not in caplog.text
    assert "retrying" not in caplog.text  # a token Telegram refused is not tried again


@pytest.mark.asyncio(loop_scope="module")
async def test_every_button_press_is_answered_even_with_empty_data(tmp_path, caplog):
    """A callback query whose data is empty reaches every CallbackQueryHandler whatever its
    pattern (PTB matches patterns only against non-empty data), so the first, 👍/👎's: it must
    be answered as an unknown button, not fail before it answers (the user's client would show a
    spinner on the button)."""
    (tmp_path / "config.toml").write_text(CONFIG, encoding="utf-8")
    async with TelegramEmulator(token=TOKEN) as tg, Store.open(tmp_path / "bot.db") as store:
        config = load_config(str(tmp_path / "config.toml"))
        config.telegram.base_url = tg.base_url
        frontend = TelegramFrontend(Service(config, store, engine=None), config.telegram, TOKEN, retry_first_s=0.01)
        await frontend.start()
        try:
            await tg.user_sends(USER, USER, "/help")  # the chat begins; its answer is the bot's first message
            await tg.wait_for(lambda: tg.sent_messages(USER))
            sent = await frontend.app.bot.send_message(USER, "臣妾在。", reply_markup=keyboard())
            answers = {}
            for data in ("", "rate:1\n", "rate:", "rate:1"):
                query = await tg.user_clicks(USER, USER, sent.message_id, data)
                await tg.wait_for(lambda: any(a["callback_query_id"] == query for a in tg.answered_callbacks))
                answers[data] = next(a["text"] for a in tg.answered_callbacks if a["callback_query_id"] == query)
        finally:
            await frontend.stop()
    assert answers == {"": "Unknown button.", "rate:1\n": "Unknown button.", "rate:": "Unknown button.",
                       "rate:1": "This reply is no longer in the log."}
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_reply_longer_than_a_message_goes_on_in_a_second_one(bot):
    """The model is too slow on CPU to write 4096 units, so this reply's text is scripted;
    everything from the service's Reply onwards is the real path."""
    tg = bot.tg
    await polling(bot)
    said = await tg.user_sends(GROUP, USER, "讲个长故事", chat_type="group")  # not addressed: ignored
    store = bot.service.store
    user_row = await store.add_user_message("telegram", str(GROUP), str(USER), "讲个长故事",
                                            platform_message_id=str(said["message_id"]))
    row = await store.start_reply(user_row.id, adapter_version=None, prompt="", sampling={})
    text = "很久很久以前。" * 500 + "\n" + "从前有座山。" * 300  # 5,301 characters

    class ScriptedReply:
        message_id, user_message_id, adapter_version, notice = row.id, user_row.id, None, None

        async def __aiter__(self):
            for i in range(0, len(text), 700):
                await asyncio.sleep(0.05)
                yield text[i:i + 700]

        async def result(self):
            return dataclasses.make_dataclass("R", ["text"])(text.strip())

    from telegram import Message

    message = Message.de_json(said, bot.frontend.app.bot)
    tg.fail_next("editMessageText", 429, retry_after=1)  # flood control: waited out, then edited
    parts = await bot.frontend.stream(message, ScriptedReply(), asyncio.create_task(asyncio.sleep(0)))
    sent = tg.sent_messages(GROUP)
    assert [m.text for m in sent] == [p.text for p in parts] == split(text.strip())
    assert len(sent) == 2 and sent[0].reply_to_message_id == said["message_id"]
    assert sent[1].text.startswith("从前有座山")  # cut at the line break
    assert sent[0].buttons == [] and sent[1].buttons == DONE_BUTTONS
    assert bot.platform_ids(row.id) == [str(m.message_id) for m in sent]
    edits = tg.calls_to("editMessageText")
    assert edits[0].status == 429 and edits[1].status == 200 and edits[1].at - edits[0].at >= 1.0


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_rolebot_serve_runs_telegram_beside_the_web_chat(tmp_path, builtin_path, monkeypatch):
    from bot.app import App

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.delenv("DISCORD_BOT_TOKEN", raising=False)  # Discord stays off
    async with TelegramEmulator(token=TOKEN) as tg:
        config = CONFIG.replace("[web]\nenabled = false", "[web]\nport = 0").replace(
            f'token_env = "{TOKEN_ENV}"', f'token_env = "{TOKEN_ENV}"\nbase_url = "{tg.base_url}"')
        (tmp_path / "config.toml").write_text(config + "\n[scheduler]\nenabled = false\n", encoding="utf-8")
        app = await App.start(load_config(str(tmp_path / "config.toml")), train=False)
        try:
            assert [f.name for f in app.frontends] == ["web", "telegram"]
            bot = Bot(tg, app.service, app.frontends[1])
            said = await tg.user_sends(USER, USER, "在吗？")
            row, reply = await bot.reply_to(USER, said)
            assert reply.text == row["text"]
        finally:
            await app.stop()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_retry_writes_another_reply_into_the_same_message(bot):
    tg = bot.tg
    await polling(bot)
    mention = "@rolebot_test_bot"
    said = await tg.user_sends(GROUP, USER, f"{mention} 讲个故事", chat_type="group",
                               entities=[{"type": "mention", "offset": 0, "length": len(mention)}])
    first, reply = await bot.reply_to(GROUP, said)
    question = first["reply_to"]
    await tg.user_clicks(GROUP, USER, reply.message_id, "rate:1")
    await tg.wait_for(lambda: reply.buttons[0][0] == "👍 ✓")

    # Someone else in the group presses 🔄: told why not, nothing is written.
    query = await tg.user_clicks(GROUP, ADMIN, reply.message_id, "retry")
    await tg.wait_for(lambda: any(a["callback_query_id"] == query for a in tg.answered_callbacks))
    assert tg.answered_callbacks[-1] == {"callback_query_id": query, "text": NOT_YOURS}
    assert len(bot.alternatives(question)) == 1

    # Its author presses 🔄: a second alternative streams into the same message, buttons fresh.
    sent_before = len(tg.sent_messages(GROUP, include_deleted=True))
    query = await tg.user_clicks(GROUP, USER, reply.message_id, "retry")
    second = await bot.alternative(GROUP, question, 2, reply.message_id)
    assert any(a["callback_query_id"] == query for a in tg.answered_callbacks)
    assert len(tg.sent_messages(GROUP, include_deleted=True)) == sent_before  # edited, not posted
    assert second["status"] == "complete" and bot.platform_ids(second["id"]) == [str(reply.message_id)]
    assert any(v.reply_markup and v.text == reply.text for v in reply.history)
    # The old alternative keeps its row, its text and its 👍; a 👍 now rates the new one.
    [old] = bot.rows("SELECT * FROM messages WHERE id = ?", first["id"])
    assert (old["text"], old["status"]) == (first["text"], "complete")
    await tg.user_clicks(GROUP, USER, reply.message_id, "rate:-1")
    await tg.wait_for(lambda: reply.buttons[1][0] == "👎 ✓")
    assert sorted(bot.ratings()) == [(first["id"], str(USER), 1), (second["id"], str(USER), -1)]

    # /retry does the same: a third alternative, in the same message again.
    await tg.user_sends(GROUP, USER, "/retry", chat_type="group")
    third = await bot.alternative(GROUP, question, 3, reply.message_id)
    assert bot.platform_ids(third["id"]) == [str(reply.message_id)]
    assert [m.message_id for m in tg.sent_messages(GROUP)][-1] == reply.message_id

    # Once the conversation has gone on, 🔄 under the older reply rewrites nothing.
    said = await tg.user_sends(GROUP, USER, "然后呢", chat_type="group", reply_to_message_id=reply.message_id)
    await bot.reply_to(GROUP, said)
    query = await tg.user_clicks(GROUP, USER, reply.message_id, "retry")
    await tg.wait_for(lambda: any(a["callback_query_id"] == query for a in tg.answered_callbacks))
    assert tg.answered_callbacks[-1] == {"callback_query_id": query, "text": NOT_LAST}
    assert len(bot.alternatives(question)) == 3


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_regenerate_shorter_than_the_reply_it_replaces_deletes_the_extra_part(bot):
    """The first reply is scripted (the model is too slow on CPU for 4096 units); the regenerate
    is the real path: 🔄 under its last part."""
    tg = bot.tg
    await polling(bot)
    said = await tg.user_sends(USER, USER, "讲个长故事")
    first, _ = await bot.reply_to(USER, said)
    store = bot.service.store
    text = "很久很久以前。" * 700
    await store.finish_reply(first["id"], text, __import__("bot.store").store.ReplyCost())
    [old] = [m for m in tg.sent_messages(USER) if m.message_id == int(bot.platform_ids(first["id"])[0])]
    from telegram import Message

    parts = split(text)
    message = Message.de_json(tg._bot_message_dict(old), bot.frontend.app.bot)
    await message.edit_text(parts[0])
    more = await bot.frontend.app.bot.send_message(USER, parts[1], reply_markup=old.reply_markup)
    await store.link_platform_messages(first["id"], [str(more.message_id)])

    await tg.user_clicks(USER, USER, more.message_id, "retry")
    second = await bot.alternative(USER, first["reply_to"], 2, old.message_id)
    assert [m.message_id for m in tg.sent_messages(USER, include_deleted=True) if m.deleted] == [more.message_id]
    assert bot.platform_ids(second["id"]) == [str(old.message_id)]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_stop_ends_a_streaming_reply_and_keeps_its_text(bot):
    tg = bot.tg
    # Greedy, the builtin model counts on for all 400 tokens (half a minute on a CPU) here.
    bot.service.config.generation.max_new_tokens = 400
    await polling(bot)
    long = "请从一数到一千"

    async def streaming(chat, said):
        """The bot's message while the reply streams, with ⏹ under it, once the log links it to
        the reply (a moment after Telegram has it)."""
        def seen():
            message = next((m for m in tg.sent_messages(chat) if m.message_id > said["message_id"]
                            and m.buttons == STREAMING_BUTTONS), None)
            linked = message and bot.rows(
                "SELECT 1 FROM message_platform_ids p JOIN messages m ON m.id = p.message_id JOIN conversations c "
                "ON c.id = m.conversation_id WHERE p.platform_message_id = ? AND c.chat_id = ? AND m.role = 'assistant'",
                str(message.message_id), str(chat))
            return linked and message
        return await eventually(seen, 60)

    async def stopped(said, message):
        def done():
            rows = bot.rows("SELECT r.* FROM messages r JOIN message_platform_ids p ON p.message_id = r.reply_to "
                            "JOIN conversations c ON c.id = r.conversation_id "
                            "WHERE p.platform_message_id = ? AND c.chat_id = ? AND r.status != 'generating'",
                            str(said["message_id"]), str(said["chat"]["id"]))
            return rows and message.text == rows[0]["text"] and message.buttons == DONE_BUTTONS and rows[0]
        return await eventually(done, 60)

    # ⏹ under the reply.
    said = await tg.user_sends(USER, USER, long)
    message = await streaming(USER, said)
    query = await tg.user_clicks(USER, USER, message.message_id, "stop")
    row = await stopped(said, message)
    assert row["status"] == "interrupted" and row["text"]
    assert {"callback_query_id": query, "text": "Stopped."} in tg.answered_callbacks
    await tg.user_clicks(USER, USER, message.message_id, "rate:1")  # a stopped reply is rated like any
    await eventually(lambda: bot.ratings() == [(row["id"], str(USER), 1)])
    query = await tg.user_clicks(USER, USER, message.message_id, "stop")  # an old keyboard's ⏹
    await tg.wait_for(lambda: any(a["callback_query_id"] == query for a in tg.answered_callbacks))
    assert tg.answered_callbacks[-1]["text"] == "This reply is already finished."

    # /stop, in another chat.
    said = await tg.user_sends(ADMIN, ADMIN, long)
    message = await streaming(ADMIN, said)
    assert await bot.command(ADMIN, "/stop") == "Stopped."
    row = await stopped(said, message)
    assert row["status"] == "interrupted" and row["text"] and row["completion_tokens"] < 400
    assert await bot.command(ADMIN, "/stop") == NOTHING_TO_STOP
