#!/usr/bin/env python3
"""More users than the bot can serve: ``--clients`` web clients chat at once for ``--duration``
seconds against a real ``rolebot serve`` (a subprocess, builtin model, shipped defaults but the
rate limit), each sending its next message as soon as the last one ends.

A client reads its reply as it streams and gives up after ``--timeout`` seconds (then it counts
as timed out, and it disconnects, as a person would). A ``503`` is a polite refusal; the client
waits what ``Retry-After`` says and tries again. After the run the bot is stopped with SIGTERM and
its database is checked: every reply a client received whole must be in its row, complete, with
the same text (anything else is a row lost), and ``PRAGMA integrity_check`` must pass.

``--previous PATH`` runs the same against another checkout (e.g. ``git archive main | tar -x -C
/tmp/prev``) in the same run, as the baseline. ``--baseline`` runs this checkout as main ran
before admission by measured capacity (issue 27, item 7): ``[service] max_reply_s = 0`` and 32
rows. ``--rows 4,8,16`` runs this checkout at each ``[generation] max_batch_size`` (default: the
shipped auto). One table:

    python bench/overload.py --clients 50 --duration 60 --baseline --rows 0,16
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ASKS = ["今日可好？", "这茶如何？", "御花园的花开了。", "夜深了，早些歇息吧。", "你可知罪？", "华妃又在闹了。",
        "明日去圆明园。", "这碎玉轩冷清了些。", "雪下得真大。", "你想家吗？"]
CONFIG = """
[console]
enabled = false

[generation]
{generation}
[service]
rate_limit_per_minute = 10000
{service}
[scheduler]
enabled = false

[discord]
token_env = "ROLEBOT_BENCH_NO_DISCORD"

[telegram]
token_env = "ROLEBOT_BENCH_NO_TELEGRAM"
"""


@dataclass
class Outcome:
    kind: str  # answered | busy | timed_out | dropped | error
    admitted: bool = False  # the bot took it (200) rather than refusing it (503)
    first_token_s: float | None = None
    total_s: float | None = None
    message_id: int | None = None
    text: str = ""


@dataclass(frozen=True)
class Variant:
    label: str
    checkout: Path
    generation: str = ""  # lines added to [generation]
    service: str = ""  # lines added to [service]


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
    admitted = False
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
                admitted = True
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
                    return Outcome("dropped", True, first, total, message_id), 1.0
                return Outcome("answered", True, first, total, message_id, "".join(pieces).strip()), 0.0
    except TimeoutError:
        return Outcome("timed_out", admitted, first, timeout, message_id), 0.0
    except aiohttp.ClientError as exc:
        return Outcome(f"error {type(exc).__name__}", admitted, first, time.perf_counter() - started), 1.0


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


async def run_one(variant: Variant, clients: int, args) -> Run:
    work = Path(tempfile.mkdtemp(prefix="rolebot-overload-"))
    config = CONFIG.format(generation=variant.generation, service=variant.service)
    (work / "config.toml").write_text(config, encoding="utf-8")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(variant.checkout), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(work / "config.toml"), "serve",
                             "--no-train", "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "bot.log", "w"))
    url = f"http://127.0.0.1:{port}"
    run = Run(variant.label, clients)
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


def pct(values: list[float], q: float, digits: int = 2) -> str:
    if not values:
        return "—"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))]:.{digits}f}"


def table(runs: list[Run], duration: float, timeout: float) -> str:
    lines = [f"{duration:.0f} s of clients, each giving up after {timeout:.0f} s; 503s retried after Retry-After",
             f"| bot | clients | requests | admitted | completed within {timeout:.0f} s (per min) | admitted, not completed "
             "| 503 busy at once | 503 p50 / p95 ms | first token p50 / p95 s | whole reply p50 / p95 s | rows lost | integrity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        admitted = [o for o in r.outcomes if o.admitted]
        answered = [o for o in admitted if o.kind == "answered"]
        busy = [o.total_s * 1000 for o in r.outcomes if o.kind == "busy"]
        first = [o.first_token_s for o in answered if o.first_token_s is not None]
        whole = [o.total_s for o in answered]
        unfinished = Counter(o.kind.replace("_", " ") for o in admitted if o.kind != "answered")
        why = ", ".join(f"{n} {kind}" for kind, n in sorted(unfinished.items()))
        refused_other = sum(1 for o in r.outcomes if not o.admitted and o.kind != "busy")
        lines.append(f"| {r.label} | {r.clients} | {len(r.outcomes)} | {len(admitted)} | {len(answered)} "
                     f"({len(answered) / duration * 60:.1f}) | {sum(unfinished.values())}{f' ({why})' if why else ''} | "
                     f"{len(busy)}{f' (+{refused_other} other)' if refused_other else ''} | "
                     f"{pct(busy, .5, 0)} / {pct(busy, .95, 0)} | {pct(first, .5)} / {pct(first, .95)} | "
                     f"{pct(whole, .5)} / {pct(whole, .95)} | {r.lost} | {r.integrity} |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="50,200", help="comma-separated client counts (default 50,200)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds clients keep sending (default 60)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for a whole reply (default 120)")
    parser.add_argument("--previous", type=Path, help="another checkout to run the same load against, as the baseline")
    parser.add_argument("--baseline", action="store_true",
                        help="also run this checkout without admission by capacity, at 32 rows (main before issue 27, item 7)")
    parser.add_argument("--rows", default="0", help="comma-separated [generation] max_batch_size values for this checkout (0: auto)")
    args = parser.parse_args()
    here = HERE.parent
    variants = [Variant("this" if rows == "0" else f"this, {rows} rows", here, f"max_batch_size = {rows}\n")
                for rows in args.rows.split(",")]
    if args.baseline:
        variants.append(Variant("admission off, 32 rows", here, "max_batch_size = 32\n", "max_reply_s = 0\n"))
    if args.previous:
        variants.append(Variant(f"previous ({args.previous.name})", args.previous.resolve()))
    runs = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for variant in variants:
            print(f"running {variant.label} with {clients} clients…", file=sys.stderr, flush=True)
            runs.append(await run_one(variant, clients, args))
            print(table(runs[-1:], args.duration, args.timeout), file=sys.stderr, flush=True)
    print(table(runs, args.duration, args.timeout))


if __name__ == "__main__":
    asyncio.run(main())
