#!/usr/bin/env python3
"""Issue 27's probes, as an attacker sends them: against a real ``rolebot serve`` (a subprocess,
builtin model, no adapter, the default loopback bind with no keys, the admin token set, its log
in a file) and against ``rolebot card import`` (a copy of the shipped config.toml per card).

``--previous PATH`` runs the same against another checkout (e.g. ``git archive 5ec6a59 | tar -x
-C /tmp/before``, the bot before issue 27) in the same run. One table, a row per probe:

    python bench/probes.py --previous /tmp/before

The Telegram probe (a button press with empty data) needs the Bot API emulator; it is
``tests/test_telegram.py::test_every_button_press_is_answered_even_with_empty_data``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
TOKEN = "admin-token-probe-0123456789abcdef"
CONFIG = """
[generation]
max_new_tokens = 8

[console]
enabled = false

[service]
rate_limit_per_minute = 10000

[scheduler]
enabled = false

[discord]
token_env = "ROLEBOT_BENCH_NO_DISCORD"

[telegram]
token_env = "ROLEBOT_BENCH_NO_TELEGRAM"
"""
EVIL = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
MALFORMED = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(url: str, proc: subprocess.Popen, limit_s: float = 600) -> None:
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() - started < limit_s:
            if proc.poll() is not None:
                raise SystemExit(f"the bot exited with {proc.returncode} before it served")
            try:
                async with http.get(url + "/v1/models") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("the bot did not start serving in time")


async def send(http, method: str, url: str, body=None, headers=None) -> tuple[int, str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json"} if headers is None else headers
    async with http.request(method, url, data=data, headers=headers) as response:
        return response.status, await response.text()


async def turns(http, url: str, user: str) -> list[dict]:
    """The user's conversation, asked as a local tool asks (JSON, no Origin)."""
    async with http.get(f"{url}/api/conversation", params={"user": user}) as response:
        return (await response.json())["turns"]


async def web_probes(url: str, log: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    port = url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as http:
        status, text = await send(http, "POST", url + "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "记住我"}], "user": "alice2"})
        reply = json.loads(text)
        await send(http, "POST", url + "/api/ratings", {"message_id": int(reply["id"]), "user": "alice2", "value": 1})

        status, text = await send(http, "GET", f"{url}/api/conversation?user=alice2",
                                  headers={"Host": f"attacker.example:{port}"})
        found["rebinding"] = f"{status}, alice2's turns {'in' if '记住我' in text else 'not in'} the answer"

        status, _ = await send(http, "POST", url + "/api/ratings",
                               {"message_id": int(reply["id"]), "user": "alice2", "value": -1}, EVIL)
        rating = (await turns(http, url, "alice2"))[-1]["replies"][0]["rating"]
        found["csrf rating"] = f"{status}, alice2's 👍 {'kept' if rating == 1 else 'turned to 👎'}"
        status, _ = await send(http, "POST", url + "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "/forget"}], "user": "alice2"}, EVIL)
        left = [t for t in await turns(http, url, "alice2") if t["text"] == "记住我"]
        found["csrf forget"] = f"{status}, alice2's history {'kept' if left else 'gone'}"

        for field in ("max_tokens", "max_completion_tokens", "temperature", "top_p"):
            status, _ = await send(http, "POST", url + "/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": "hi"}], "user": "n", field: 10**400})
            found.setdefault("huge numbers", "")
            found["huge numbers"] += f"{field} {status}; "
        found["huge numbers"] = found["huge numbers"].rstrip("; ")

    before = log.read_text(encoding="utf-8", errors="replace")
    host, _ = url.removeprefix("http://").rsplit(":", 1)
    for _ in range(MALFORMED):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /api/admin/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\x00\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()
    await asyncio.sleep(1.0)
    after = log.read_text(encoding="utf-8", errors="replace")
    added = after[len(before):]
    lines = added.count("\n")
    found["malformed logs"] = (f"{lines} line{'s' * (lines != 1)}, {added.count(' ERROR ')} ERROR, "
                               f"{added.count('Traceback')} tracebacks, admin token {after.count(TOKEN)}×")
    return found


def png_card(text: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
            + chunk(b"tEXt", b"chara\0" + base64.b64encode(text)) + chunk(b"IEND", b""))


def v2(**data) -> str:
    fields = {"name": "Aldric", "description": "", "personality": "", "scenario": "", "first_mes": "",
              "mes_example": "", **data}
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": fields})


def hostile_cards() -> dict[str, bytes]:
    deep = "[" * 100_000 + "]" * 100_000
    return {
        "100,000-deep JSON": deep.encode(),
        "the same in a PNG": png_card(deep.encode()),
        "the same under extensions": v2(extensions={"x": 0}).replace('{"x": 0}', '{"x": ' + deep + "}").encode(),
        "lone surrogate in name": v2(name="\ud800").encode(),
        "5,000,000-character name": v2(name="A" * 5_000_000).encode(),
        "name ../../../etc/evil": v2(name="../../../etc/evil").encode(),
        "50 MB description": v2(description="d" * 50_000_000).encode(),
    }


def card_probes(checkout: Path) -> dict[str, str]:
    found = {}
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    for label, content in hostile_cards().items():
        work = Path(tempfile.mkdtemp(prefix="rolebot-probe-card-"))
        shutil.copy(checkout / "config.toml", work / "config.toml")
        shipped = (work / "config.toml").read_bytes()
        card = work / ("card.png" if content.startswith(b"\x89PNG") else "card.json")
        card.write_bytes(content)
        bot = [sys.executable, "-m", "bot", "--config", str(work / "config.toml")]
        imported = subprocess.run(bot + ["card", "import", str(card)], cwd=work, env=env, capture_output=True, text=True)
        listed = subprocess.run(bot + ["adapters", "list"], cwd=work, env=env, capture_output=True, text=True)
        size = (work / "config.toml").stat().st_size
        changed = "config unchanged" if (work / "config.toml").read_bytes() == shipped else f"config now {size:,} bytes"
        found[f"card: {label}"] = (f"exit {imported.returncode}{', traceback' if 'Traceback' in imported.stderr else ''}; "
                                   f"{changed}; next command exit {listed.returncode}")
        shutil.rmtree(work)
    return found


async def run_one(checkout: Path) -> dict[str, str]:
    work = Path(tempfile.mkdtemp(prefix="rolebot-probes-"))
    (work / "config.toml").write_text(CONFIG, encoding="utf-8")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "ROLEBOT_ADMIN_TOKEN": TOKEN}
    log = work / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(work / "config.toml"), "serve",
                             "--no-train", "--port", str(port)], cwd=work, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, proc)
        found = await web_probes(url, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return found | card_probes(checkout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", type=Path, help="another checkout to probe in the same run (the baseline)")
    args = parser.parse_args()
    runs = []
    if args.previous:
        runs.append(("before", asyncio.run(run_one(args.previous.resolve()))))
    runs.append(("now", asyncio.run(run_one(HERE.parent))))
    print("| probe | " + " | ".join(label for label, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for probe in runs[-1][1]:
        print(f"| {probe} | " + " | ".join(found.get(probe, "—") for _, found in runs) + " |")


if __name__ == "__main__":
    main()
