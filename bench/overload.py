#!/usr/bin/env python3
"""More users than the bot can serve: ``--clients`` web clients chat at once for ``--duration``
seconds against a real ``rolebot serve`` (a subprocess, builtin model, shipped defaults but the
rate limit), each sending its next message as soon as the last one ends.

A client reads its reply as it streams and gives up after ``--timeout`` seconds (then it counts
as timed out, and it disconnects, as a person would). A ``503`` is a polite refusal; the client
waits what ``Retry-After`` says and tries again. After the run the bot is stopped with SIGTERM and
its database is checked: every reply a client received whole must be in its row, complete, with
the same text (anything else is a row lost), and ``PRAGMA integrity_check`` must pass.

``--previous PATH`` runs the same against another checkout (e.g. ``git worktree add /tmp/prev
c60b2e2``, the bot before backpressure) in the same run, as the baseline. One table:

    python bench/overload.py --clients 50,200 --duration 60 --previous /tmp/prev
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ASKS = ["今日可好？", "这茶如何？", "御花园的花开了。", "夜深了，早些歇息吧。", "你可知罪？", "华妃又在闹了。",
        "明日去圆明园。", "这碎玉轩冷清了些。", "雪下得真大。", "你想家吗？"]
CONFIG = """
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


@dataclass
class Outcome:
    kind: str  # answered | busy | timed_out | error
    first_token_s: float | None = None
    total_s: float | None = None
    message_id: int | None = None
    text: str = ""


@dataclass
class Run:
    label: str
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    lost: int = 0
    integrity: str = ""
    in_flight_at_end: int = 0


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


async def one_request(http: aiohttp.ClientSession, url: str, user: str, text: str, timeout: float) -> tuple[Outcome, float]:
    """One streamed chat; returns the outcome and how long to wait before the next."""
    body = {"messages": [{"role": "user", "content": text}], "user": user, "stream": True}
    started = time.perf_counter()
    first = None
    pieces: list[str] = []
    message_id = None
    try:
        async with asyncio.timeout(timeout):
            async with http.post(url + "/v1/chat/completions", json=body) as response:
                if response.status == 503:
                    after = float(response.headers.get("Retry-After", "1"))
                    await response.read()
                    return Outcome("busy", total_s=time.perf_counter() - started), after
                if response.status != 200:
                    await response.read()
                    return Outcome(f"error {response.status}", total_s=time.perf_counter() - started), 1.0
                finished = False
                async for line in response.content:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    message_id = message_id or (int(event["id"]) if event["id"].isdigit() else None)
                    for choice in event["choices"]:
                        if choice["delta"].get("content"):
                            first = first or time.perf_counter() - started
                            pieces.append(choice["delta"]["content"])
                        if choice["finish_reason"]:
                            finished = (event.get("rolebot") or {}).get("status", "complete") == "complete"
                total = time.perf_counter() - started
                if not finished:
                    return Outcome("dropped", first, total, message_id), 1.0
                return Outcome("answered", first, total, message_id, "".join(pieces).strip()), 0.0
    except TimeoutError:
        return Outcome("timed_out", first, timeout, message_id), 0.0
    except aiohttp.ClientError as exc:
        return Outcome(f"error {type(exc).__name__}", first, time.perf_counter() - started), 1.0


async def drive(url: str, clients: int, duration: float, timeout: float) -> list[Outcome]:
    deadline = time.monotonic() + duration
    outcomes: list[Outcome] = []
    connector = aiohttp.TCPConnector(limit=0)

    async def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            outcome, pause = await one_request(http, url, f"load{i}", f"{ASKS[(i + n) % len(ASKS)]}（{i}-{n}）", timeout)
            outcomes.append(outcome)
            n += 1
            if pause:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


def check_rows(db: Path, outcomes: list[Outcome]) -> tuple[int, str]:
    """Replies a client got whole that are not in their row as received; the integrity check."""
    with sqlite3.connect(db) as conn:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        lost = 0
        for o in outcomes:
            if o.kind != "answered":
                continue
            row = conn.execute("SELECT status, text FROM messages WHERE id = ?", (o.message_id,)).fetchone()
            if row is None or row[0] != "complete" or row[1] != o.text:
                lost += 1
    return lost, integrity


async def run_one(checkout: Path, label: str, clients: int, args) -> Run:
    work = Path(tempfile.mkdtemp(prefix="rolebot-overload-"))
    (work / "config.toml").write_text(CONFIG, encoding="utf-8")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(work / "config.toml"), "serve",
                             "--no-train", "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "bot.log", "w"))
    url = f"http://127.0.0.1:{port}"
    run = Run(label, clients)
    try:
        await wait_ready(url, proc)
        run.outcomes = await drive(url, clients, args.duration, args.timeout)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    run.lost, run.integrity = check_rows(work / "rolebot.db", run.outcomes)
    return run


def pct(values: list[float], q: float) -> str:
    if not values:
        return "—"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.2f}"


def table(runs: list[Run], duration: float, timeout: float) -> str:
    lines = [f"{duration:.0f} s of clients, each giving up after {timeout:.0f} s; 503s retried after Retry-After",
             "| bot | clients | requests | answered | answered/min | 503 busy | timed out | dropped/other | "
             "first token p50 / p95 s | whole reply p50 / p95 s | rows lost | integrity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        kinds = [o.kind for o in r.outcomes]
        answered = [o for o in r.outcomes if o.kind == "answered"]
        first = [o.first_token_s for o in answered if o.first_token_s is not None]
        whole = [o.total_s for o in answered]
        other = len(kinds) - sum(kinds.count(k) for k in ("answered", "busy", "timed_out"))
        lines.append(f"| {r.label} | {r.clients} | {len(kinds)} | {len(answered)} | {len(answered) / duration * 60:.1f} | "
                     f"{kinds.count('busy')} | {kinds.count('timed_out')} | {other} | {pct(first, .5)} / {pct(first, .95)} | "
                     f"{pct(whole, .5)} / {pct(whole, .95)} | {r.lost} | {r.integrity} |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="50,200", help="comma-separated client counts (default 50,200)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds clients keep sending (default 60)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for a whole reply (default 120)")
    parser.add_argument("--previous", type=Path, help="another checkout to run the same load against, as the baseline")
    args = parser.parse_args()
    checkouts = [(HERE.parent, "this")] + ([(args.previous.resolve(), f"previous ({args.previous.name})")] if args.previous else [])
    runs = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for checkout, label in checkouts:
            print(f"running {label} with {clients} clients…", file=sys.stderr, flush=True)
            runs.append(await run_one(checkout, label, clients, args))
    print(table(runs, args.duration, args.timeout))


if __name__ == "__main__":
    asyncio.run(main())
