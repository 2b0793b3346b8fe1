"""The chat page in a real headless Chromium (Debian's ``chromium``, driven by Playwright): send a
message and see it stream, stop one, regenerate, rate, reload and see the history, with no
missing resource and no script error."""

from __future__ import annotations

import shutil

import pytest
import pytest_asyncio

from served import rows, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install it with `apt-get install -y chromium "
                       "fonts-noto-cjk` (as root; .ci/run does this), then run the tests again"),
]
ASYNC = pytest.mark.asyncio(loop_scope="module")

CONFIG = """
[model]
max_seq_length = 512

[character]
persona = "你是甄嬛。"
greeting = "{{user}}，嬛嬛给您请安。"

[generation]
max_new_tokens = 160
temperature = 0.0
repetition_penalty = 1.0
stop = []

[web]
port = 0

[service]
rate_limit_per_minute = 1000
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def site(tmp_path_factory, builtin_path):
    async with serving(tmp_path_factory.mktemp("browser"), CONFIG) as (app, url):
        yield app, url


@pytest_asyncio.fixture(loop_scope="module")
async def page(site):
    from playwright.async_api import async_playwright

    problems: list[str] = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
        page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
        page.problems = problems
        yield page
        await browser.close()



async def send(page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


@ASYNC
async def test_chat_stream_stop_regenerate_rate_and_reload(site, page):
    app, url = site
    await page.goto(url)
    assert await page.title() == "甄嬛 · rolebot"
    [cookie] = [c for c in await page.context.cookies() if c["name"] == "rolebot_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # A new conversation opens with the character's greeting ([character] greeting).
    await page.wait_for_selector(".msg.bot")
    assert await page.text_content(".msg.bot") == "用户，嬛嬛给您请安。"

    # A reply streams: text shows while the send button is still the stop button.
    await send(page, "请讲一个很长的故事")
    # (Words, not just the spaces a reply may begin with: the row keeps the text stripped.)
    await page.wait_for_function("() => document.querySelectorAll('.msg.bot')[1]?.textContent.trim().length > 0 "
                                 "&& document.getElementById('send').textContent === '⏹'", timeout=60_000)
    # Stop it: the reply ends at the next step, its text kept and shown as interrupted.
    await page.click("#send")
    await page.wait_for_function("() => document.getElementById('send').textContent === '发送' "
                                 "&& document.querySelector('.msg.bot.interrupted')", timeout=60_000)
    [stopped] = rows(app, "SELECT id, status, text FROM messages WHERE role = 'assistant' AND prompt IS NOT NULL")
    assert stopped["status"] == "interrupted" and stopped["text"]
    assert await page.text_content(".msg.bot >> nth=1") == stopped["text"]

    # Another message, answered to the end, then 🔄: a second alternative in the same bubble.
    await send(page, "你好")
    await page.wait_for_function("() => document.querySelectorAll('.msg.bot').length === 3 "
                                 "&& document.getElementById('send').textContent === '发送'", timeout=120_000)
    [first] = rows(app, "SELECT id, text, reply_to FROM messages WHERE role = 'assistant' AND id > ?", stopped["id"])
    await page.click(".rate >> nth=-1 >> text=🔄")
    await page.wait_for_function("() => document.querySelector('.rate:last-of-type .pager, .pager')"
                                 "?.textContent.includes('2/2') && document.getElementById('send').textContent === '发送'",
                                 timeout=120_000)
    alternatives = rows(app, "SELECT id, text FROM messages WHERE reply_to = ? ORDER BY id", first["reply_to"])
    assert len(alternatives) == 2 and alternatives[0]["id"] == first["id"]
    assert len(await page.query_selector_all(".msg.bot")) == 3  # replaced in place, not added
    assert await page.text_content(".msg.bot >> nth=-1") == alternatives[1]["text"]

    # ◀ goes back to the first alternative; 👍 rates it.
    await page.click(".pager >> text=◀")
    await page.wait_for_function("() => document.querySelector('.pager').textContent.includes('1/2')")
    await page.click(".rate >> nth=-1 >> text=👍")
    await page.wait_for_selector(".rate >> nth=-1 >> button.chosen")
    assert [tuple(r) for r in rows(app, "SELECT message_id, value FROM ratings")] == [(first["id"], 1)]
    [kept] = rows(app, "SELECT kept_reply FROM messages WHERE id = ?", first["reply_to"])
    assert kept[0] == first["id"]

    # A reload shows the whole conversation from the database: nothing is lost.
    await page.reload()
    await page.wait_for_function("() => document.querySelectorAll('.msg.bot').length === 3")
    assert await page.locator(".msg.user").all_text_contents() == ["请讲一个很长的故事", "你好"]
    assert await page.text_content(".msg.bot >> nth=0") == "用户，嬛嬛给您请安。"
    assert await page.text_content(".msg.bot >> nth=1") == stopped["text"]
    assert await page.text_content(".msg.bot >> nth=-1") == first["text"]
    assert "1/2" in await page.text_content(".pager")
    assert await page.locator(".rate >> nth=-1 >> button.chosen").text_content() == "👍"
    assert page.problems == []  # no 404 (favicon), no script error


CAST = """
[model]
max_seq_length = 512

[character]
persona = "你是甄嬛。"

[[cast]]
name = "皇帝"
aliases = ["皇上"]
persona = "你是皇帝。"

[generation]
max_new_tokens = 8
temperature = 0.0
repetition_penalty = 1.0
stop = []

[web]
port = 0

[service]
rate_limit_per_minute = 1000
"""


@ASYNC
async def test_a_cast_picker_switches_characters_and_a_reload_keeps_the_choice(tmp_path, page, builtin_path):
    async with serving(tmp_path, CAST) as (app, url):
        await page.goto(url)
        await page.wait_for_selector("#who:not([hidden])")
        assert await page.locator("#who option").all_text_contents() == ["甄嬛", "皇帝"]
        assert await page.input_value("#who") == "甄嬛"
        # 皇帝: a message and its reply go to his own conversation
        await page.select_option("#who", "皇帝")
        await page.wait_for_function("() => document.title === '皇帝 · rolebot'")
        await send(page, "朕的江山如何？")
        await page.wait_for_function("() => document.querySelectorAll('.msg.bot').length === 1 "
                                     "&& document.getElementById('send').textContent === '发送'", timeout=60_000)
        logged = [tuple(r) for r in rows(app, "SELECT c.character, m.role, m.text FROM messages AS m "
                                              "JOIN conversations AS c ON c.id = m.conversation_id ORDER BY m.id")]
        assert [(c, r) for c, r, _ in logged] == [("皇帝", "user"), ("皇帝", "assistant")]
        # a reload keeps 皇帝 and shows his conversation
        await page.reload()
        await page.wait_for_function("() => document.querySelectorAll('.msg.user').length === 1")
        assert await page.input_value("#who") == "皇帝"
        assert await page.locator(".msg.user").all_text_contents() == ["朕的江山如何？"]
        assert await page.text_content(".msg.bot") == logged[1][2]
        # back to 甄嬛: her conversation is empty
        await page.select_option("#who", "甄嬛")
        await page.wait_for_function("() => document.title === '甄嬛 · rolebot' "
                                     "&& document.querySelectorAll('.msg.user').length === 0")
        assert page.problems == []
