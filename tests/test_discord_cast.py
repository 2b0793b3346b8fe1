"""A cast on Discord, through discord.py's real REST and gateway paths against the Discord
emulator, with real services on one shared engine (builtin model, no adapters: the base model
speaks for both) and a real SQLite store. Each test plays Discord users."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from bot.cast import Cast
from bot.cli import main
from bot.config import load_config
from bot.platforms.discord import DiscordFrontend, split
from bot.service import Service
from bot.store import Store
from emulators.discord_api import BOT_PERMISSIONS, MANAGE_WEBHOOKS, DiscordEmulator, SentMessage
from training.errors import UserError

TOKEN = "emulated.bot.token-SECRET"
USER, OTHER = 777, 888
AVATAR = "https://example.org/huangdi.png"
CAST = f"""
[[cast]]
name = "甄嬛"
aliases = ["嬛嬛", "莞贵人"]
avatar = "zhenhuan.png"

[[cast]]
name = "皇帝"
aliases = ["皇上"]
persona = "你是大清皇帝，威严而多疑。"
avatar = "{AVATAR}"

[generation]
max_new_tokens = 8
temperature = 0.0

[console]
enabled = false

[web]
enabled = false

[scheduler]
enabled = false
"""
DISCORD = """
[discord]
token_env = "ROLEBOT_TEST_DISCORD_TOKEN"
edit_interval = 0.2
"""
CHANNELS_LINE = (CAST + DISCORD).count("\n") + 1  # where a test's channels = … goes


# Config: no model needed.


@pytest.mark.parametrize(("channels", "message"), [
    ('{"123" = "华妃"}', f"bad.toml:{CHANNELS_LINE}: [discord] channels: \"123\" = '华妃': no character '华妃' in the cast — known: 甄嬛, 皇帝"),
    ('{"general" = "甄嬛"}', f"bad.toml:{CHANNELS_LINE}: [discord] channels: 'general' is not a channel id"),
    ('{"123" = 1}', f"bad.toml:{CHANNELS_LINE}: [discord] channels: expected a list of channel ids, or a table of channel id = cast member"),
])
def test_a_channel_given_to_someone_outside_the_cast_is_one_clear_line(tmp_path, capsys, channels, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(f"{CAST}{DISCORD}channels = {channels}\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_config(str(bad))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert main(["--config", str(bad), "chat", "--once", "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_channels_are_a_list_or_a_table_of_cast_members(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'{CAST}{DISCORD}channels = {{"123" = "皇上", "456" = "甄嬛"}}\n', encoding="utf-8")
    assert load_config(str(path)).discord.channels == {"123": "皇帝", "456": "甄嬛"}  # an alias: its name
    path.write_text(f'{CAST}{DISCORD}channels = ["123", 456]\n', encoding="utf-8")
    assert load_config(str(path)).discord.channels == ["123", "456"]


# The cast on the emulator.


@pytest.fixture(scope="module")
def project(tmp_path_factory, builtin_path) -> Path:
    root = tmp_path_factory.mktemp("discord_cast")
    (root / "config.toml").write_text(CAST + DISCORD, encoding="utf-8")
    return root


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engines(project):
    from bot.engine.base import make_engines

    engine, voices = make_engines(load_config(str(project / "config.toml")), {"甄嬛": None, "皇帝": None})
    await engine.start()
    yield voices
    await engine.close()


@dataclasses.dataclass
class Bot:
    dc: DiscordEmulator
    cast: Cast
    frontend: DiscordFrontend
    bold: bool = False  # replies open with the character's name in bold (no webhook)

    def shown(self, row: sqlite3.Row) -> str:
        """How the last part of a reply reads on Discord."""
        name = row["character"] or self.cast.default.character
        return split((f"**{name}**：" if self.bold else "") + row["text"].strip())[-1]

    def rows(self, sql: str, *params) -> list[sqlite3.Row]:
        with sqlite3.connect(self.cast.default.config.database) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    async def reply_to(self, said: dict) -> tuple[sqlite3.Row, SentMessage]:
        """The finished reply to a user message, its character (the conversation's: '' is the
        default one) and its Discord message, once that shows it in full with 👍/👎/🔄 under it."""
        def done():
            rows = self.rows(
                "SELECT r.*, c.character FROM messages r JOIN message_platform_ids p ON p.message_id = r.reply_to "
                "JOIN conversations c ON c.id = r.conversation_id "
                "WHERE p.platform_message_id = ? AND r.status != 'generating' ORDER BY r.id DESC", said["id"])
            if not rows:
                return None
            ids = [r[0] for r in self.rows("SELECT platform_message_id FROM message_platform_ids "
                                           "WHERE message_id = ? ORDER BY rowid", rows[0]["id"])]
            sent = ids and next(m for m in self.dc.sent_messages if m.id == int(ids[-1]))
            return (sent and sent.content == self.shown(rows[0]) and len(self.dc.reactions.get(sent.id, {})) == 3
                    and (rows[0], sent))
        return await self.dc.wait_for(done, 120)  # the CPU may be shared

    def ratings(self) -> list[tuple]:
        return [tuple(r) for r in self.rows(
            "SELECT r.message_id, u.platform_user_id, r.value FROM ratings r JOIN users u ON u.id = r.user_id")]


@asynccontextmanager
async def running(dc: DiscordEmulator, project: Path, engines, tmp_path: Path, channels: str = "", *,
                  bold: bool = False):
    """The cast's services over a fresh database, and the Discord front-end on the default's."""
    path = tmp_path / "config.toml"
    path.write_text(f"{CAST}{DISCORD}{channels}\n[store]\npath = \"{tmp_path / 'bot.db'}\"\n"
                    f"[adapters]\ndir = \"{project / 'adapters'}\"\n", encoding="utf-8")
    config = load_config(str(path))
    async with Store.open(config.database) as store:
        cast = Cast({name: Service(config.for_character(name), store, engines[name]) for name in engines})
        frontend = DiscordFrontend(cast.default, config.discord, TOKEN, guild_ready_timeout=0.1, retry_first_s=0.05)
        await frontend.start()
        try:
            await dc.wait_for(lambda: frontend.client and frontend.client.is_ready(), 10)
            yield Bot(dc, cast, frontend, bold)
        finally:
            await frontend.stop()
            await cast.close(5.0)
    assert dc.unhandled == []


@pytest.fixture
def no_errors(caplog):
    caplog.set_level(logging.INFO)
    yield
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # no handler failed
    assert "no webhook" not in caplog.text


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_each_channel_has_its_character_and_a_name_calls_another_through_the_webhook(
        project, engines, tmp_path, no_errors, caplog):
    async with DiscordEmulator(bot_token=TOKEN, bot_permissions=BOT_PERMISSIONS | MANAGE_WEBHOOKS) as dc:
        court = await dc.add_channel("court")
        with dc.patch_discord():
            async with running(dc, project, engines, tmp_path, f'channels = {{"{court}" = "皇上"}}') as bot:
                # The court channel is the emperor's: any message there is his to answer, posted
                # through the channel's webhook with his name and avatar, streamed by its edits.
                said = await dc.user_sends("今日朝中可有要事？", user_id=USER, channel_id=court)
                row, sent = await bot.reply_to(said)
                assert row["character"] == "皇帝" and sent.channel_id == court
                hook = dc.webhooks[sent.webhook_id]
                assert (hook["name"], hook["channel_id"], sent.username, sent.avatar_url) == ("rolebot", str(court), "皇帝", AVATAR)
                assert sent.content == bot.shown(row) and sent.pinged_user_ids == [] and sent.allowed_mentions["parse"] == []

                # Naming another cast member (by an alias) there: she answers, under her name.
                said = await dc.user_sends("嬛嬛，你怎么看？", user_id=USER, channel_id=court)
                her_row, hers = await bot.reply_to(said)
                assert her_row["character"] == "" and (hers.username, hers.avatar_url) == ("甄嬛", None)
                assert caplog.text.count("甄嬛's avatar zhenhuan.png is a file") == 1  # not sent: said once
                assert hers.webhook_id == sent.webhook_id  # one webhook per channel, made once, reused

                # A mention with a name in another channel: that character; without one: the default.
                said = await dc.user_sends("皇上万福", user_id=OTHER, mention_bot=True)
                row2, there = await bot.reply_to(said)
                assert row2["character"] == "皇帝" and there.username == "皇帝" and there.channel_id == dc.channel_id
                said = await dc.user_sends("你好", user_id=OTHER, mention_bot=True)
                row3, default = await bot.reply_to(said)
                assert row3["character"] == "" and default.username == "甄嬛"
                said = await dc.user_sends("无人理会的闲谈", user_id=OTHER)  # neither mapped nor mentioned
                made = [r for r in dc.requests if r.method == "POST" and r.path.endswith("/webhooks")]
                assert sorted(int(r.path.split("/")[2]) for r in made) == sorted([court, dc.channel_id])
                edits = [r for r in dc.requests if r.method == "PATCH"]
                assert edits and all(r.path.startswith("/webhooks/") and r.status == 200 for r in edits)

                # 👍 on the emperor's webhook reply: his reply is rated; 👎 on hers, hers.
                await dc.user_reacts(sent.id, "👍", user_id=USER)
                await dc.user_reacts(hers.id, "👎", user_id=OTHER)
                await dc.wait_for(lambda: sorted(bot.ratings()) == sorted(
                    [(row["id"], str(USER), 1), (her_row["id"], str(OTHER), -1)]))

                # 🔄 by the author under her reply: the emperor does not write it; she writes another
                # into the same webhook message, edited through the webhook.
                await dc.user_reacts(hers.id, "🔄", user_id=USER)

                def rewritten():
                    rows = bot.rows("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", her_row["reply_to"])
                    return (len(rows) == 2 and rows[1]["status"] != "generating"
                            and hers.content == split(rows[1]["text"].strip())[-1]
                            and len(dc.reactions.get(hers.id, {})) == 3 and rows[1])
                second = await dc.wait_for(rewritten, 120)
                assert bot.rows("SELECT character FROM conversations WHERE id = ?", second["conversation_id"])[0][0] == ""
                assert hers.username == "甄嬛" and hers.edits[-1].payload.get("username") is None  # edited, not posted

                # /retry in the emperor's channel: for her, whom the user's last message there went to.
                await dc.user_sends("/retry", user_id=USER, channel_id=court)

                def third():
                    rows = bot.rows("SELECT * FROM messages WHERE reply_to = ? ORDER BY id", her_row["reply_to"])
                    return (len(rows) == 3 and rows[2]["status"] != "generating"
                            and hers.content == split(rows[2]["text"].strip())[-1]
                            and len(dc.reactions.get(hers.id, {})) == 3 and rows[2])
                await dc.wait_for(third, 120)
                assert len(bot.rows("SELECT * FROM messages WHERE reply_to = ?", row["reply_to"])) == 1  # his: one

                # A server admin deletes the webhook: the next reply makes another.
                await dc.delete_webhook(sent.webhook_id)
                said = await dc.user_sends("朕乏了", user_id=OTHER, channel_id=court)
                _, anew = await bot.reply_to(said)
                assert anew.webhook_id in dc.webhooks and anew.username == "皇帝"
                made = [r for r in dc.requests if r.method == "POST" and r.path.endswith("/webhooks")]
                assert [int(r.path.split("/")[2]) for r in made].count(court) == 2
    texts = [r["text"] for r in bot.rows("SELECT text FROM messages WHERE role = 'user'")]
    assert "无人理会的闲谈" not in texts


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_without_manage_webhooks_the_reply_opens_with_the_name_and_a_dm_keeps_who_was_named(
        project, engines, tmp_path, no_errors):
    async with DiscordEmulator(bot_token=TOKEN) as dc:  # the bot's role may not manage webhooks
        with dc.patch_discord():
            listed = f'channels = ["{dc.channel_id}"]'  # the list form: the default character's channels
            async with running(dc, project, engines, tmp_path, listed, bold=True) as bot:
                said = await dc.user_sends("皇上，臣妾有事启奏", user_id=USER)
                row, sent = await bot.reply_to(said)
                assert row["character"] == "皇帝" and sent.content == split(f"**皇帝**：{row['text']}")[-1]
                assert sent.webhook_id is None and sent.reply_to == int(said["id"])  # a reply, as the bot
                await dc.user_reacts(sent.id, "👍", user_id=USER)  # the bot's own message: rated as before
                await dc.wait_for(lambda: bot.ratings() == [(row["id"], str(USER), 1)])
                said = await dc.user_sends("今天天气如何？", user_id=OTHER)
                row, sent = await bot.reply_to(said)
                assert row["character"] == "" and sent.content.startswith("**甄嬛**：")
                assert not [r for r in dc.requests if "webhooks" in r.path]

                # In a DM, the character named last goes on answering, also after a restart.
                said = await dc.user_sends("皇上吉祥", user_id=USER, dm=True)
                row, sent = await bot.reply_to(said)
                assert row["character"] == "皇帝" and sent.content.startswith("**皇帝**：")
                said = await dc.user_sends("今晚月色真美", user_id=USER, dm=True)
                row, sent = await bot.reply_to(said)
                assert row["character"] == "皇帝" and sent.content.startswith("**皇帝**：")
            async with running(dc, project, engines, tmp_path, bold=True) as bot:
                said = await dc.user_sends("还记得我吗", user_id=USER, dm=True)
                row, _ = await bot.reply_to(said)
                assert row["character"] == "皇帝"
                said = await dc.user_sends("莞贵人在吗", user_id=USER, dm=True)
                row, sent = await bot.reply_to(said)
                assert row["character"] == "" and sent.content.startswith("**甄嬛**：")
