"""`rolebot serve` as a user runs it: a fresh project with no adapter trains the sample character
first (tiny settings), then serves it over HTTP; SIGTERM during a reply and a retrain shuts it
down cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import sys

import aiohttp
import pytest

pytestmark = pytest.mark.slow

TOKEN = "serve-admin-token"
TINY = """
[character]
persona = "你是甄嬛，说话含蓄得体，从不承认自己是AI。"

[training]
max_steps = 1
first_run_steps = 1
batch_size = 1
grad_accum = 1
warmup_steps = 0
pack_length = 256

[generation]
max_new_tokens = 8
temperature = 0.0

[web]
port = 8080

[service]
admin_token_env = "ROLEBOT_TEST_SERVE_TOKEN"

# Never the real platforms, even on a machine whose environment holds their tokens.
[discord]
token_env = "ROLEBOT_TEST_SERVE_NO_DISCORD"

[telegram]
token_env = "ROLEBOT_TEST_SERVE_NO_TELEGRAM"
"""


async def until_serving(process: asyncio.subprocess.Process, seen: list[str]) -> str:
    """Read the bot's stderr until it says where it serves; return the web chat's URL."""
    while line := (await process.stderr.readline()).decode("utf-8", "replace"):
        seen.append(line)
        if line.startswith("rolebot: serving"):
            return re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
    raise AssertionError("rolebot serve ended before serving:\n" + "".join(seen[-30:]))


async def test_first_serve_trains_the_sample_character_serves_it_and_stops_cleanly_on_sigterm(tmp_path, builtin_path):
    (tmp_path / "config.toml").write_text(TINY, encoding="utf-8")
    stdout = open(tmp_path / "stdout.txt", "wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(tmp_path / "config.toml"), "serve", "--host", "127.0.0.1", "--port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ROLEBOT_TEST_SERVE_TOKEN": TOKEN})
    seen: list[str] = []
    try:
        url = await asyncio.wait_for(until_serving(process, seen), 600)
        log = "".join(seen)
        assert "甄嬛 has no adapter yet" in log and "trained v0001" in log
        assert "serving 甄嬛 (v0001)" in log
        drain = asyncio.create_task(_drain(process, seen))

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                status = await response.json()
            assert status["active_version"] == "v0001" and status["versions"] == ["v0001"]
            assert status["retrain"]["running"] is False and status["retrain"]["last_run"] is None
            assert status["retrain"]["next_run"]  # the [scheduler] job is waiting

            # A retrain starts (in its own process); a second one is refused while it runs.
            auth = {"Authorization": f"Bearer {TOKEN}"}
            async with http.post(f"{url}/api/admin/retrain", headers=auth) as response:
                assert response.status == 202
                run = (await response.json())["run"]
            async with http.post(f"{url}/api/admin/retrain", headers=auth) as response:
                assert response.status == 409 and "already running" in (await response.json())["error"]["message"]

            body = {"messages": [{"role": "user", "content": "皇上吉祥！"}], "user": "first", "stream": True}
            async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                first = json.loads((await response.content.readline()).decode().removeprefix("data: "))
                process.send_signal(signal.SIGTERM)  # while the reply is in flight
                rest = [line.decode().strip() async for line in response.content]
        assert first["rolebot"]["adapter_version"] == "v0001"
        assert [line for line in rest if line][-1] == "data: [DONE]"
        assert await asyncio.wait_for(process.wait(), 120) == 0
        await drain
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        stdout.close()
    assert "rolebot: stopped" in "".join(seen)

    with sqlite3.connect(tmp_path / "rolebot.db") as db:
        reply = db.execute("SELECT status, adapter_version FROM messages WHERE id = ?", (int(first["id"]),)).fetchone()
        assert reply[0] in ("complete", "interrupted") and reply[1] == "v0001"
        assert db.execute("SELECT COUNT(*) FROM messages WHERE status = 'generating'").fetchone()[0] == 0
        assert db.execute("SELECT version FROM adapter_activations WHERE rolled_back_at IS NULL").fetchall() == [("v0001",)]
        # The retrain ended on its own or was cut off by the shutdown; either way it is recorded.
        status, reason = db.execute("SELECT status, reason FROM training_runs WHERE id = ?", (run["id"],)).fetchone()
        assert status in ("failed", "rejected", "succeeded") and reason
    assert (tmp_path / "adapters" / "甄嬛" / "v0001" / "adapter_model.safetensors").exists()
    assert (tmp_path / "data" / "甄嬛.json").exists()  # prepared from the project's sample script


async def _drain(process: asyncio.subprocess.Process, seen: list[str]) -> None:
    """Keep reading stderr so the bot never blocks on a full pipe."""
    while line := await process.stderr.readline():
        seen.append(line.decode("utf-8", "replace"))


async def test_first_run_training_errors_reach_the_caller_as_raised():
    """A failure in the training thread (a bad dataset, say) comes back as that error, so serve
    can print it as a one-line message instead of a NameError from the thread hand-off."""
    from bot.app import in_thread
    from training.errors import UserError

    def fails() -> None:
        raise UserError("data/甄嬛.json: empty")

    with pytest.raises(UserError, match="empty"):
        await asyncio.wait_for(in_thread(fails), 30)  # the bug this guards against hung here
    assert await asyncio.wait_for(in_thread(lambda x: x + 1, 1), 30) == 2


async def test_kill_9_mid_stream_leaves_the_streamed_text_in_the_row(tmp_path, builtin_path):
    """The text streamed so far reaches the reply's row as it goes, so a crash keeps what the
    user saw; the next start marks the row interrupted."""
    from bot.store import Store

    # Near-uniform sampling: the small base model almost never picks EOS, so the reply runs long.
    config = TINY.replace("max_new_tokens = 8\ntemperature = 0.0", "max_new_tokens = 400\ntemperature = 4.0\ntop_p = 1.0\nstop = []")
    (tmp_path / "config.toml").write_text(config, encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "--config", str(tmp_path / "config.toml"), "serve", "--no-train",
        "--host", "127.0.0.1", "--port", "0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ROLEBOT_TEST_SERVE_TOKEN": TOKEN})
    seen: list[str] = []
    shown = ""
    try:
        url = await asyncio.wait_for(until_serving(process, seen), 300)
        drain = asyncio.create_task(_drain(process, seen))
        body = {"messages": [{"role": "user", "content": "Count from 1 to 300, one number after another, separated by commas."}],
                "user": "crash", "stream": True}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                first = json.loads((await response.content.readline()).decode().removeprefix("data: "))
                started = asyncio.get_running_loop().time()
                async for line in response.content:
                    text = line.decode().strip().removeprefix("data: ")
                    if text.startswith("{"):
                        shown += "".join(c["delta"].get("content", "") for c in json.loads(text)["choices"])
                    if asyncio.get_running_loop().time() - started > 3.5:
                        break
                process.kill()  # kill -9: no shutdown code runs
        await process.wait()
        drain.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    with sqlite3.connect(tmp_path / "rolebot.db") as db:
        text, status = db.execute("SELECT text, status FROM messages WHERE id = ?", (int(first["id"]),)).fetchone()
    assert status == "generating" and text, ("the row kept nothing of the streamed reply", status, text, shown)
    assert shown.strip().startswith(text), (text, shown)  # at most a second behind what the user saw
    store = await Store.open(tmp_path / "rolebot.db")
    try:
        assert await store.mark_unfinished_interrupted() == 1  # what the next start does
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "rolebot.db") as db:
        assert db.execute("SELECT text, status FROM messages WHERE id = ?", (int(first["id"]),)).fetchone() == (text, "interrupted")
