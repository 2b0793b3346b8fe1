"""The loop end to end over the web API: people chat and rate, an admin asks for a retrain, the
new version passes the gate and is hot-swapped in while a client keeps chatting."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import aiohttp
import pytest

from bot.app import App
from bot.config import load_config
from training.registry import Registry

pytestmark = pytest.mark.slow

TOKEN_ENV = "ROLEBOT_TEST_LOOP_ADMIN_TOKEN"
CONFIG = f"""
[character]
persona = "你是甄嬛，说话含蓄得体，从不承认自己是AI。"

[model]
max_seq_length = 512

[training]
batch_size = 1
grad_accum = 1
warmup_steps = 0
learning_rate = 1e-3
pack_length = 512

[retrain]
start_from = "base"
max_steps = 2
cpu_max_steps = 0  # these steps even without a GPU
nll_tolerance = 0.05
yield_to_chats = true
# The gate's hygiene rule has its own tests (test_retrain.py); here a 2-step candidate of the 135M
# model against the base model would be judged on one reply in 16 either way.
hygiene_probes = 0

[generation]
max_new_tokens = 8
temperature = 0.0

[service]
rate_limit_per_minute = 1000
admin_token_env = "{TOKEN_ENV}"

[discord]
token_env = "ROLEBOT_TEST_LOOP_NO_DISCORD"

[telegram]
token_env = "ROLEBOT_TEST_LOOP_NO_TELEGRAM"

[console]
enabled = false

[web]
port = 0

[scheduler]
enabled = false
"""

LINES = ["皇上吉祥！", "妹妹近来可好？", "今日的茶如何？", "你可知罪？", "御花园的花开了。", "夜深了，早些歇息吧。"]
GOOD = ["臣妾给皇上请安。", "多谢姐姐挂念，一切都好。", "茶清香怡人。", "臣妾不知何罪之有。", "臣妾陪皇上去看看。", "是，臣妾告退。"]


async def ask(session, url: str, user: str, text: str) -> dict:
    async with session.post(f"{url}/v1/chat/completions", json={
            "model": "rolebot", "user": user, "messages": [{"role": "user", "content": text}]}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_admin_retrain_promotes_a_gated_version_while_a_client_keeps_chatting(tmp_path, builtin_path):
    (tmp_path / "config.toml").write_text(CONFIG, encoding="utf-8")
    os.environ[TOKEN_ENV] = "loop-admin"
    admin = {"Authorization": "Bearer loop-admin"}
    app = await App.start(load_config(str(tmp_path / "config.toml")), train=False)
    try:
        url = next(f for f in app.frontends if f.name == "web").url
        async with aiohttp.ClientSession() as session:
            replies = [await ask(session, url, f"u{i}", line) for i, line in enumerate(LINES)]
            for i, reply in enumerate(replies):
                # Good replies are what users liked; store them as the text the model said.
                with sqlite3.connect(app.config.database) as conn:
                    conn.execute("UPDATE messages SET text = ? WHERE id = ?", (GOOD[i], int(reply["id"])))
                async with session.post(f"{url}/api/ratings", json={
                        "message_id": reply["id"], "user": f"u{i}", "value": 1 if i < 5 else -1}) as r:
                    assert r.status == 200, await r.text()

            async with session.post(f"{url}/api/admin/retrain") as r:
                assert r.status == 401
            async with session.post(f"{url}/api/admin/retrain", headers=admin) as r:
                assert r.status == 202, await r.text()
                run_id = (await r.json())["run"]["id"]
            async with session.post(f"{url}/api/admin/retrain", headers=admin) as r:
                assert r.status == 409  # one at a time

            during, status = [], {}
            for _ in range(600):
                during.append(await ask(session, url, "steady", "今日天气如何？"))
                async with session.get(f"{url}/api/admin/status", headers=admin) as r:
                    status = await r.json()
                if not status["retrain"]["running"]:
                    break
                await asyncio.sleep(0.5)
            last = status["retrain"]["last_run"]
            assert last["id"] == run_id and last["status"] == "succeeded", last
            assert status["active_version"] == "v0001" and status["versions"] == ["v0001"]
            after = await ask(session, url, "steady", "今日天气如何？")
    finally:
        await app.stop()
    assert all(r["choices"][0]["message"]["content"] is not None for r in during + [after])
    with sqlite3.connect(tmp_path / "rolebot.db") as conn:
        statuses = {row[0] for row in conn.execute("SELECT status FROM messages WHERE role = 'assistant'")}
        version = conn.execute("SELECT adapter_version FROM messages WHERE id = ?", (int(after["id"]),)).fetchone()[0]
    assert statuses == {"complete"}, statuses
    assert version == "v0001"
    assert len(during) >= 2
    # The training stepped aside while the steady client's chats waited for their first word.
    meta = Registry(app.config.adapter_root, app.config.character.name).get("v0001").meta
    paused = meta["paused_for_chats"]
    assert paused["pauses"] >= 1 and paused["paused_s"] <= paused["pauses"] * 0.6, paused
