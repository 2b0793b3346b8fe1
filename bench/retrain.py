#!/usr/bin/env python3
"""One retrain cycle of the running bot, timed, with chats going on all through it.

The whole bot runs in this process exactly as ``rolebot serve`` runs it (``bot.app.App``: store,
engine, service, retrainer, web front-end). Its log holds ``--rated`` replies that users rated
(``--up-share`` of them 👍, the rest 👎), each with the prompt the bot rendered for it, written
through the store as the service writes them. ``--clients`` web clients keep chatting over
HTTP (streamed ``/v1/chat/completions``) for ``--before`` seconds; then an admin asks for a
retrain over ``/api/admin/retrain``, and the clients go on until the new version has been gated,
promoted and hot-swapped in, and ``--after`` seconds beyond. The retrain is the product's own:
rated logs → dataset (+ replay of the original pairs) → SFT in a subprocess from the active
adapter → gate → swap, with the ``[retrain]`` and ``[training]`` defaults unless told otherwise.

It prints two tables: the cycle (trigger → promoted, the training's own runtime, the swap) and
the replies before, during and after it (time to first token and whole-reply latency, p50/p95,
and failures: any reply that errs, ends interrupted or comes back empty counts).

    python bench/retrain.py                                              # CPU: builtin model, a short check
    PYTHONPATH=/tmp/site:$PWD python3 bench/retrain.py --random-llama8b \\
        --tokenizer .bench-tokenizer --out $OUT                          # GPU: Llama-3.1-8B shape, 4-bit

``--random-llama8b`` builds a Llama-3.1-8B-shaped model with random weights (as ``bench/serve.py``
does) and a random LoRA adapter as the active version: right for time and memory, not for text.

Measured on the H200 (torch 2.11, Unsloth 2026.10.9; 2026-11-28), 1,000 rated replies (779 👍),
8 clients, 64 new tokens, shipped defaults: trigger → promoted and swapped 347.8 s, of which
training 246.8 s (rows of 3,072 tokens); swap 32.3 ms; 0 failed replies of 512; reply p50 4.5 s
before, 6.9 s during (the training shares the GPU), 3.8 s after. With the earlier rows of 2,048
tokens: 279.7 s, training 188.2 s, 0 failed of 387.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

CHARACTER = "甄嬛"
PERSONA = "现在你要扮演皇帝身边的女人--甄嬛"
TOKEN_ENV = "ROLEBOT_BENCH_ADMIN_TOKEN"
OPENERS = ["皇上", "姐姐", "妹妹", "娘娘", "小主", "槿汐", "浣碧", "温太医", "眉姐姐", "皇后娘娘"]
ASKS = ["今日可好？", "这茶如何？", "御花园的花开了。", "夜深了，早些歇息吧。", "你可知罪？", "华妃又在闹了。",
        "明日去圆明园。", "这碎玉轩冷清了些。", "年羹尧又打了胜仗。", "太后请你去说话。", "雪下得真大。", "你想家吗？"]
REPLIES = ["臣妾给皇上请安，皇上万福金安。", "多谢姐姐挂念，一切都好。", "茶清香怡人，是今年的新茶。",
           "臣妾不知何罪之有，还请皇上明示。", "臣妾陪皇上去看看。", "是，臣妾告退。", "嬛嬛只愿岁岁常相见。",
           "逆风如解意，容易莫摧残。", "宫中之事，臣妾不敢妄言。", "臣妾谨记娘娘教诲。", "这雪景倒让臣妾想起家乡。"]
BAD = ["作为一个AI助手，我无法回答。", "I am an AI language model.", "好的。", "我不知道你在说什么。"]


PHASES = ("before the retrain", "during the retrain", "after the swap")


@dataclass
class Reply:
    started: float
    first_s: float | None
    total_s: float
    ok: bool
    version: str | None
    error: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", default="builtin:smollm2-135m", help="base model: builtin name or local path")
    parser.add_argument("--random-llama8b", action="store_true", help="build a random Llama-3.1-8B-shaped model")
    parser.add_argument("--tiny", action="store_true", help="with --random-llama8b: 2 small layers (a smoke test)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random model (default: the builtin model's)")
    parser.add_argument("--rated", type=int, default=1000, help="rated replies in the log (default 1000)")
    parser.add_argument("--up-share", type=float, default=0.8, help="share of them rated 👍 (the rest 👎)")
    parser.add_argument("--originals", type=int, default=1000, help="original pairs in [training] data (replayed)")
    parser.add_argument("--clients", type=int, help="web clients chatting all the time (default 8 on CUDA, 2 elsewhere)")
    parser.add_argument("--new-tokens", type=int, help="max new tokens per reply (default 64 on CUDA, 8 elsewhere)")
    parser.add_argument("--before", type=float, help="seconds of chatting before the retrain (default 30 / 10)")
    parser.add_argument("--after", type=float, help="seconds of chatting after the swap (default 20 / 5)")
    parser.add_argument("--max-steps", type=int, help="[retrain] max_steps (default: the shipped config's; CPU: 2)")
    parser.add_argument("--preference", choices=["none", "kto"], help="[retrain] preference (default: the shipped config's)")
    parser.add_argument("--yield-to-chats", action="store_true", help="[retrain] yield_to_chats = true (the training pauses while chats wait)")
    parser.add_argument("--engine", default="", help="[engine] overrides, KEY=VALUE '+'-joined (as bench/serve.py --variant)")
    parser.add_argument("--generation", default="", help="[generation] overrides, KEY=VALUE '+'-joined (e.g. history_step=1)")
    parser.add_argument("--tutorial-order", action="store_true",
                        help="[model] history_first = false: prompts in the tutorial's order, the message before the history")
    parser.add_argument("--tuning", default="", help="the engine's Tuning fields, KEY=VALUE '+'-joined (e.g. attention=sdpa)")
    parser.add_argument("--work", help="folder for the model, adapters and database (default: a temporary one)")
    parser.add_argument("--out", help="write results.md and results.json into this folder")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    args.clients = args.clients or (8 if cuda else 2)
    args.new_tokens = args.new_tokens or (64 if cuda else 8)
    args.before = args.before if args.before is not None else (30.0 if cuda else 10.0)
    args.after = args.after if args.after is not None else (20.0 if cuda else 5.0)
    if args.max_steps is None and not cuda:
        args.max_steps = 2
    work = Path(args.work or tempfile.mkdtemp(prefix="rolebot-bench-retrain-")).resolve()
    work.mkdir(parents=True, exist_ok=True)

    import serve as serve_bench  # bench/serve.py: the random model and adapter

    started = time.perf_counter()
    if args.random_llama8b:
        base = str(work / ("llama-tiny" if args.tiny else "llama-8b"))
        adapter = serve_bench.build_random_llama(Path(base), args.tokenizer, args.tiny, lora=True)
    else:
        base = args.model
        adapter = serve_bench.random_adapter_for(base)
    version = serve_bench.save_version(work, adapter, base)
    from training.registry import Registry

    Registry(work / "adapters", CHARACTER).activate(version.name)
    print(f"bench: model and {version.name} ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    write_originals(work, args.originals)
    (work / "config.toml").write_text(config_text(base, args, cuda), encoding="utf-8")
    os.environ[TOKEN_ENV] = "bench-admin"

    if args.tuning:
        tune_engine(serve_bench.split_variant(args.tuning)[1])
    count_graph_captures()
    result = asyncio.run(measure(work, args))
    report = render(result)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(report + "\n", encoding="utf-8")
        (out / "results.json").write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0 if result["cycle"].get("status") == "succeeded" and result["failed_replies"] == 0 else 1


def tune_engine(tuning: dict) -> None:
    """Every LocalEngine this process builds (the App builds its own) gets these Tuning fields."""
    from dataclasses import replace

    from bot.engine import local

    build = local.LocalEngine.__init__

    def init(self, config, version, _tuning=None):
        build(self, config, version, replace(local.Tuning(), **tuning))

    local.LocalEngine.__init__ = init


CAPTURES: list[tuple[float, float, int]] = []  # (wall clock, seconds, padded query tokens)


def count_graph_captures() -> None:
    """Record every CUDA-graph capture transformers' continuous batching makes (a capture stalls
    every row of the batch while it runs)."""
    try:
        from transformers.generation.continuous_batching.model_runner import ModelRunner
    except ImportError:
        return
    from bot.engine.local import step_io

    capture = ModelRunner._capture_graph

    def timed(self, *args, **kwargs):
        queries = step_io(self).num_q_tokens
        started, wall = time.perf_counter(), time.time()
        try:
            return capture(self, *args, **kwargs)
        finally:
            CAPTURES.append((wall, time.perf_counter() - started, queries))

    ModelRunner._capture_graph = timed


async def sample_loop(app, stop: asyncio.Event, samples: list[tuple]) -> None:
    """Every 20 ms: how late the event loop wakes (the web front-end, the service and the
    engine's streaming all run on it) and the engine's queue and batch."""
    period = 0.02
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(period)
        lag = time.perf_counter() - before - period
        status = app.engine.status()
        free = None
        try:  # the paged cache's free share (transformers' block manager), for the local engine
            cache = app.engine._manager.batch_processor.cache
            free = cache.get_num_free_blocks() / cache.num_blocks
        except AttributeError:
            pass
        samples.append((time.time(), lag, status.queue_depth, status.generating, free,
                        status.prompt_tokens, status.prompt_tokens_cached, status.prefills))


def write_originals(work: Path, count: int) -> None:
    """The character's original pairs ([training] data, replayed by the retrain) and held-out ones."""
    rng = random.Random(7)

    def pair() -> dict:
        return {"instruction": rng.choice(OPENERS) + "，" + rng.choice(ASKS), "input": "",
                "output": "".join(rng.sample(REPLIES, rng.randint(1, 3)))}

    (work / "data").mkdir(exist_ok=True)
    (work / "data" / "train.json").write_text(json.dumps([pair() for _ in range(count)], ensure_ascii=False), encoding="utf-8")
    (work / "data" / "val.json").write_text(json.dumps([pair() for _ in range(64)], ensure_ascii=False), encoding="utf-8")


def config_text(base: str, args, cuda: bool) -> str:
    steps = f"max_steps = {args.max_steps}\n" if args.max_steps is not None else ""
    if args.preference is not None:
        steps += f"preference = {json.dumps(args.preference)}\n"
    if args.yield_to_chats:
        steps += "yield_to_chats = true\n"
    small = "" if cuda else "batch_size = 1\ngrad_accum = 1\npack_length = 512\nwarmup_steps = 0\n"
    def overrides(joined: str) -> str:
        return "".join(f"{k} = {v if v in ('true', 'false') or v.replace('.', '').isdigit() else json.dumps(v)}\n"
                       for k, v in (item.split("=", 1) for item in joined.split("+") if item))

    engine, generation = overrides(args.engine), overrides(args.generation)
    order = "history_first = false\n" if args.tutorial_order else ""
    return f"""# bench/retrain.py: the shipped defaults, except what a bench needs
[character]
name = "{CHARACTER}"
persona = {json.dumps(PERSONA, ensure_ascii=False)}

[model]
base = {json.dumps(base)}
max_seq_length = {2048 if cuda else 512}
{order}
[training]
{small}data = "data/train.json"
val = "data/val.json"

[generation]
max_new_tokens = {args.new_tokens}
temperature = 0.0
repetition_penalty = 1.0
stop = []
{generation}
[engine]
{engine}
[service]
rate_limit_per_minute = 10000
admin_token_env = "{TOKEN_ENV}"

[retrain]
{steps}
[scheduler]
enabled = false

[web]
port = 0

[console]
enabled = false

[discord]
token_env = "ROLEBOT_BENCH_NO_DISCORD"

[telegram]
token_env = "ROLEBOT_BENCH_NO_TELEGRAM"
"""


async def seed(app, rated: int, up_share: float) -> dict:
    """``rated`` exchanges in the log as the service writes them (prompt as rendered by the
    engine, the adapter that answered), each rated by one or two users."""
    from bot.store import ReplyCost
    from training.prompts import Sample

    rng = random.Random(3407)
    store, engine = app.store, app.engine
    started = time.perf_counter()
    up = 0
    for i in range(rated):
        user = f"user{i % 97}"
        text = rng.choice(OPENERS) + "，" + rng.choice(ASKS)
        message = await store.add_user_message("web", user, user, text)
        prompt = engine.render(Sample(instruction=text))
        liked = rng.random() < up_share
        reply_text = "".join(rng.sample(REPLIES, rng.randint(1, 2))) if liked else rng.choice(BAD)
        reply = await store.start_reply(message.id, adapter_version=engine.adapter_version, prompt=prompt,
                                        sampling={"temperature": 0.0})
        await store.finish_reply(reply.id, reply_text, ReplyCost(
            latency_ms=1000.0, first_token_ms=100.0, prompt_tokens=engine.count_tokens(prompt),
            completion_tokens=engine.count_tokens(reply_text)))
        await store.rate(reply.id, "web", f"rater{i % 31}", 1 if liked else -1)
        if rng.random() < 0.2:  # a second opinion that agrees
            await store.rate(reply.id, "web", f"rater{(i + 7) % 31 + 31}", 1 if liked else -1)
        up += liked
    return {"rated": rated, "up": up, "down": rated - up, "seconds": round(time.perf_counter() - started, 1)}


async def chat(session, url: str, user: str, text: str) -> Reply:
    """One streamed chat completion; the reply is good only if it has content and ends complete."""
    started = time.perf_counter()
    first, version, finish, state, content, error = None, None, None, None, "", ""
    try:
        async with session.post(f"{url}/v1/chat/completions", json={
                "model": "rolebot", "user": user, "stream": True,
                "messages": [{"role": "user", "content": text}]}) as response:
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.text())[:200]}"
            else:
                async for raw in response.content:
                    line = raw.decode("utf-8").strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            content += piece
                            if first is None:
                                first = time.perf_counter() - started
                        finish = choice.get("finish_reason") or finish
                    if "rolebot" in event:
                        version = event["rolebot"].get("adapter_version", version)
                        state = event["rolebot"].get("status", state)
    except Exception as exc:  # counted, never raised: the bench keeps going
        error = f"{type(exc).__name__}: {exc}"
    ok = not error and bool(content) and finish in ("stop", "length") and state == "complete"
    if not ok and not error:
        error = f"finish_reason {finish!r}, status {state!r}, {len(content)} characters"
    return Reply(started, first, time.perf_counter() - started, ok, version, error)


async def measure(work: Path, args) -> dict:
    import aiohttp

    from bot.app import App
    from bot.config import load_config

    loaded = time.perf_counter()
    app = await App.start(load_config(str(work / "config.toml")), train=False)
    print(f"bench: bot up in {time.perf_counter() - loaded:.0f} s, {app.describe()}", file=sys.stderr, flush=True)
    admin = {"Authorization": "Bearer bench-admin"}
    replies: list[Reply] = []
    samples: list[tuple] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_loop(app, stop, samples))
    try:
        seeded = await seed(app, args.rated, args.up_share)
        print(f"bench: seeded {seeded}", file=sys.stderr, flush=True)
        url = next(f for f in app.frontends if f.name == "web").url
        chatting = time.time()  # reply rows are stamped with the wall clock

        async def client(session, n: int) -> None:
            rng = random.Random(n)
            while not stop.is_set():
                replies.append(await chat(session, url, f"client{n}", rng.choice(OPENERS) + "，" + rng.choice(ASKS)))

        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await chat(session, url, "warmup", "皇上吉祥！")  # first batch shapes (CUDA graphs) outside the timing
            clients = [asyncio.create_task(client(session, n)) for n in range(args.clients)]
            await asyncio.sleep(args.before)
            trigger, trigger_wall = time.perf_counter(), time.time()
            async with session.post(f"{url}/api/admin/retrain", headers=admin) as r:
                body = await r.json()
                if r.status != 202:
                    raise SystemExit(f"bench: /api/admin/retrain answered {r.status}: {body}")
            print(f"bench: retrain {body['run']['id']} started", file=sys.stderr, flush=True)
            status = {}
            while True:
                async with session.get(f"{url}/api/admin/status", headers=admin) as r:
                    status = await r.json()
                if not status["retrain"]["running"]:
                    break
                await asyncio.sleep(0.5)
            done, done_wall = time.perf_counter(), time.time()
            print(f"bench: retrain ended after {done - trigger:.0f} s: {status['retrain']['last_run']['reason']}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(args.after)
            stop.set()
            await asyncio.gather(*clients)
    finally:
        stop.set()
        await sampler
        await app.stop()

    last = status["retrain"]["last_run"]
    with sqlite3.connect(work / "rolebot.db") as conn:
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM messages WHERE role = 'assistant' GROUP BY status"))
    with sqlite3.connect(work / "rolebot.db") as conn:
        rows = conn.execute("SELECT created_at, first_token_ms, prompt_tokens FROM messages "
                            "WHERE role = 'assistant' AND created_at >= ?", (chatting,)).fetchall()
    from serve import percentile

    def window(name: str, wall: float) -> bool:
        """Whether a wall-clock time falls in phase ``name`` (reply rows, samples, captures)."""
        return {"before the retrain": chatting <= wall < trigger_wall, "during the retrain": trigger_wall <= wall < done_wall,
                "after the swap": wall >= done_wall}[name]

    # The engine's own first token (submit to first piece, as the reply row records it), beside
    # the client's: the difference is the service and the web front-end.
    engine_side = {name: [r for r in rows if window(name, r[0])] for name in PHASES}

    def loop_summary(name: str) -> dict:
        inside = [s for s in samples if window(name, s[0])]
        lags = [s[1] for s in inside]
        caught = [c for c in CAPTURES if window(name, c[0])]
        # Prompt tokens submitted in the phase, and the share read from cached blocks.
        submitted = inside[-1][5] - inside[0][5] if len(inside) > 1 else 0
        cached = inside[-1][6] - inside[0][6] if len(inside) > 1 else 0
        return {"prompt_tokens_submitted": submitted, "prompt_cached_share": cached / submitted if submitted else None,
                "prefills": inside[-1][7] - inside[0][7] if len(inside) > 1 else 0,
                "loop_lag_p95_ms": None if not lags else round(percentile(lags, 95) * 1000, 1),
                "loop_lag_max_ms": None if not lags else round(max(lags) * 1000, 1),
                "queue_max": max((s[2] for s in samples if window(name, s[0])), default=0),
                "batch_max": max((s[3] for s in samples if window(name, s[0])), default=0),
                "kv_free_min": min((s[4] for s in samples if window(name, s[0]) and s[4] is not None), default=None),
                "graph_captures": len(caught), "graph_capture_s": round(sum(c[1] for c in caught), 2),
                "graph_capture_q": sorted({c[2] for c in caught})}

    phases = {"before the retrain": [r for r in replies if r.started < trigger],
              "during the retrain": [r for r in replies if trigger <= r.started < done],
              "after the swap": [r for r in replies if r.started >= done]}
    metrics = last.get("metrics") or {}
    candidate_meta = work / "adapters" / CHARACTER / str(last.get("candidate_version")) / "meta.json"
    paused = json.loads(candidate_meta.read_text(encoding="utf-8")).get("paused_for_chats") if candidate_meta.exists() else None
    cycle = {"status": last["status"], "reason": last["reason"], "candidate": last.get("candidate_version"),
             "trigger_to_done_s": round(done - trigger, 1),
             "run_recorded_s": round(last["finished_at"] - last["started_at"], 1) if last.get("finished_at") else None,
             "training_runtime_s": metrics.get("runtime_s"), "final_loss": metrics.get("final_loss"),
             "liked": metrics.get("liked"), "disliked": metrics.get("disliked"), "replayed": metrics.get("replayed"),
             "gate": {k: metrics.get(k) for k in ("val_nll_active", "val_nll_candidate", "preference_active",
                                                   "preference_candidate", "heldout_up", "heldout_down")},
             "paused_for_chats": paused,
             "swap_ms": status["engine"].get("last_swap_ms"), "active_after": status["active_version"],
             "engine": status["engine"].get("batching"), "largest_batch": status["engine"].get("largest_batch")}
    from training.modeling import device

    return {"device": device().name, "model": str(app.config.model.base), "clients": args.clients,
            "new_tokens": args.new_tokens, "seeded": seeded, "cycle": cycle,
            "max_steps": app.config.retrain.max_steps, "phases": {k: {**summary(v), **engine_summary(engine_side[k]), **loop_summary(k)}
                                                               for k, v in phases.items()},
            "failed_replies": sum(not r.ok for r in replies), "errors": sorted({r.error for r in replies if r.error})[:5],
            "reply_statuses": statuses,
            "versions_after_swap": sorted({r.version or "base" for r in phases["after the swap"]})}


def summary(replies: list[Reply]) -> dict:
    from serve import percentile  # bench/serve.py's

    firsts = [r.first_s for r in replies]
    totals = [r.total_s for r in replies if r.ok]

    def pct(values: list[float | None], q: int) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 3)

    return {"replies": len(replies), "failed": sum(not r.ok for r in replies),
            "first_p50": pct(firsts, 50), "first_p95": pct(firsts, 95), "first_max": pct(firsts, 100),
            "total_p50": pct(totals, 50), "total_p95": pct(totals, 95),
            "versions": sorted({r.version or "base" for r in replies})}


def engine_summary(rows: list[tuple]) -> dict:
    from serve import percentile

    firsts = [r[1] / 1000 for r in rows if r[1] is not None]
    prompts = [r[2] for r in rows if r[2] is not None]
    p = lambda values, q: None if percentile(values, q) is None else round(percentile(values, q), 3)  # noqa: E731
    return {"engine_first_p50": p(firsts, 50), "engine_first_p95": p(firsts, 95),
            "prompt_tokens_p50": p(prompts, 50), "prompt_tokens_max": p(prompts, 100)}


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def render(result: dict) -> str:
    c, s = result["cycle"], result["seeded"]
    gate = c["gate"]
    lines = [f"{result['device']}, {result['model']}; {s['rated']} rated replies in the log "
             f"({s['up']} 👍, {s['down']} 👎), [retrain] max_steps = {result['max_steps']}, "
             f"{result['clients']} web clients chatting throughout, {result['new_tokens']} new tokens per reply",
             "", "| cycle | value |", "|---|---|",
             f"| outcome | {c['status']}: {c['reason']} |",
             f"| trigger → gated, promoted and swapped in | **{c['trigger_to_done_s']} s** |",
             f"| of which training (the SFT core's runtime) | {c['training_runtime_s']} s |",
             f"| trained on | {c['liked']} 👍 replies + {c['replayed']} replayed pairs ({c['disliked']} 👎 kept as negatives) |",
             f"| gate: held-out NLL active → candidate | {gate['val_nll_active']} → {gate['val_nll_candidate']} |",
             f"| gate: 👍 ranked above 👎, active → candidate | {share(gate['preference_active'])} → {share(gate['preference_candidate'])} "
             f"({gate['heldout_up']} 👍 × {gate['heldout_down']} 👎 held out) |",
             f"| training paused for waiting chats ([retrain] yield_to_chats) | "
             f"{'off' if not c.get('paused_for_chats') else '{pauses} times, {paused_s} s'.format(**c['paused_for_chats'])} |",
             f"| hot swap in the engine | {c['swap_ms']} ms |",
             f"| engine | {c['engine']}; largest batch {c['largest_batch']} |",
             "", "| replies | count | failed | first token p50 / p95 / max s | engine's first token p50 / p95 s "
             "| prompt tokens p50 / max | reply p50 / p95 s | versions |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in result["phases"].items():
        lines.append(f"| {name} | {p['replies']} | {p['failed']} | {p['first_p50']} / {p['first_p95']} / {p['first_max']} | "
                     f"{p.get('engine_first_p50')} / {p.get('engine_first_p95')} | "
                     f"{p.get('prompt_tokens_p50')} / {p.get('prompt_tokens_max')} | "
                     f"{p['total_p50']} / {p['total_p95']} | {', '.join(p['versions'])} |")
    lines += ["", "| replies | event loop late p95 / max ms | engine queue max | batch max | KV cache free min "
              "| prompt tokens submitted, read from cache | next starts prefilled "
              "| CUDA graphs captured (seconds; padded query tokens) |", "|---|---|---|---|---|---|---|---|"]
    for name, p in result["phases"].items():
        lines.append(f"| {name} | {p['loop_lag_p95_ms']} / {p['loop_lag_max_ms']} | {p['queue_max']} | {p['batch_max']} | "
                     f"{share(p['kv_free_min'])} | {p['prompt_tokens_submitted']:,}, {share(p['prompt_cached_share'])} | "
                     f"{p['prefills']} | {p['graph_captures']} ({p['graph_capture_s']} s; {', '.join(map(str, p['graph_capture_q'][:8]))}) |")
    lines += ["", f"failed replies: {result['failed_replies']}"
              + (f" ({'; '.join(result['errors'])})" if result["errors"] else "")
              + f"; reply rows in the log by status: {result['reply_statuses']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
