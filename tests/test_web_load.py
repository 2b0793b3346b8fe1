"""Overload (issue 15, item 3): a bot with room for 2 replies generating and 2 waiting, over real
HTTP. Beyond that a message gets a 503 with Retry-After at once; the admitted ones finish; a
client that leaves cancels its reply in the engine; a reply the engine's forecast says would wait
too long is refused at once (issue 27, item 7), and one that waits too long anyway is dropped."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import pytest_asyncio

from bot.app import App
from served import rows, serving

CONFIG = """
[model]
max_seq_length = 512

[character]
persona = "你是甄嬛。"

[generation]
max_new_tokens = 400
temperature = 0.0
repetition_penalty = 1.0
stop = []
max_batch_size = 2

[web]
port = 0

[service]
rate_limit_per_minute = 1000
max_waiting = 2
"""

pytestmark = pytest.mark.slow
ASYNC = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def site(tmp_path_factory, builtin_path):
    async with serving(tmp_path_factory.mktemp("load"), CONFIG) as (app, url):
        yield app, url



def body(text: str, user: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "user": user, **extra}


async def idle(app: App) -> None:
    """Until nothing is in flight, in the service or the engine."""
    for _ in range(2400):
        status = app.engine.status()
        if not app.service._tasks and status.generating == 0 and status.queue_depth == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still busy: {app.engine.status()}")


@ASYNC
async def test_more_clients_than_the_queue_holds_get_503_while_the_admitted_finish(site):
    app, url = site

    async def one(http, i):
        async with http.post(url + "/v1/chat/completions", json=body(f"第{i}位客人", f"crowd{i}", max_tokens=24)) as r:
            return r.status, r.headers.get("Retry-After"), await r.json()

    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(one(http, i) for i in range(10)))
    answered = [b for s, _, b in results if s == 200]
    busy = [(after, b) for s, after, b in results if s == 503]
    assert len(answered) + len(busy) == 10
    assert len(answered) >= app.service.capacity and busy  # 2 generating + 2 waiting got in
    for reply in answered:
        assert reply["choices"][0]["message"]["content"] and reply["rolebot"]["status"] == "complete"
    for after, refusal in busy:
        assert int(after) >= 1 and refusal["error"]["code"] == "busy"
        assert "甄嬛" in refusal["error"]["message"]  # in character
    # A refused message is not logged; every admitted one is, with its finished reply.
    logged = rows(app, "SELECT COUNT(*) FROM messages m JOIN users u ON u.id = m.user_id "
                       "WHERE u.platform_user_id LIKE 'crowd%'")[0][0]
    assert logged == len(answered)
    await idle(app)


@ASYNC
async def test_a_client_that_disconnects_cancels_its_reply_in_the_engine(site):
    app, url = site
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=body("请讲一个很长的故事", "leaver", stream=True)) as response:
            first = json.loads((await response.content.readline()).decode().removeprefix("data: "))
            await response.content.readline()
            # Leave once text is flowing.
            while b'"content": ""' in (line := await response.content.readline()) or not line.strip():
                pass
    await idle(app)  # the engine let go of the row: nobody generates for a client that left
    [row] = rows(app, "SELECT status, text, completion_tokens FROM messages WHERE id = ?", int(first["id"]))
    assert row["status"] == "interrupted"
    assert row["completion_tokens"] < 400  # cut short, not generated to the end


async def late_behind_two_hogs(app: App, url: str, tag: str) -> tuple[int, str | None, dict]:
    """Two long replies hold both rows; then, with [service] max_wait_s = 1, a third message
    comes: its answer. (The test restores max_wait_s.) ``tag`` names this call's users, so that
    each call's hogs start new conversations (an earlier call's would be in their history)."""
    async with aiohttp.ClientSession() as http:
        long = [asyncio.create_task(http.post(url + "/v1/chat/completions", json=body("说个长故事", f"hog{i}-{tag}",
                                                                                      max_tokens=200)))
                for i in range(2)]
        for _ in range(2400):  # until both hold a row (however slow the machine is today)
            if app.engine.status().generating == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the hogs never held both rows: {app.engine.status()}")
        app.service.config.service.max_wait_s = 1.0
        async with http.post(url + "/v1/chat/completions", json=body("我来晚了", f"late-{tag}")) as response:
            answer = response.status, response.headers.get("Retry-After"), await response.json()
        for task in long:  # their clients leave, which cancels them too
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
    return answer


@ASYNC
async def test_a_reply_that_would_wait_past_max_wait_is_refused_at_once(site):
    """Issue 27, item 7: the engine's forecast (its measured steps) says the third reply would not
    begin within max_wait_s, so it is not admitted to be dropped later: a 503 with Retry-After
    now, in OpenAI's error shape, and nothing logged."""
    app, url = site
    for _ in range(64):  # recent replies ran to their limit: the hogs are planned at their whole 200 tokens
        app.engine.pace.note_reply(200, 200)
    try:
        status, after, refusal = await late_behind_two_hogs(app, url, "refused")
    finally:
        app.service.config.service.max_wait_s = 60.0
    assert status == 503 and int(after) >= 1 and refusal["error"]["code"] == "busy"
    assert refusal["error"]["type"] == "server_error" and "应接不暇" in refusal["error"]["message"]
    assert not rows(app, "SELECT 1 FROM messages m JOIN users u ON u.id = m.user_id WHERE u.platform_user_id = 'late-refused'")
    await idle(app)


@ASYNC
async def test_a_reply_that_waits_past_max_wait_is_dropped_with_a_notice(site):
    """Where the forecast is wrong or admission by capacity is off, the wait is still bounded."""
    app, url = site
    app.service.config.service.max_reply_s = 0
    try:
        status, after, refusal = await late_behind_two_hogs(app, url, "dropped")  # it waits for a row: dropped after 1 s
    finally:
        app.service.config.service.max_wait_s = 60.0
        app.service.config.service.max_reply_s = 120.0
    assert status == 503 and int(after) >= 1 and refusal["error"]["code"] == "busy"
    assert "没能回您这句话" in refusal["error"]["message"]
    [row] = rows(app, "SELECT m.status, m.text FROM messages m JOIN messages q ON q.id = m.reply_to "
                      "JOIN users u ON u.id = q.user_id WHERE u.platform_user_id = 'late-dropped'")
    assert row["status"] == "interrupted" and row["text"] == ""  # logged, and never trained on
    await idle(app)
