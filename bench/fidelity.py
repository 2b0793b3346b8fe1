#!/usr/bin/env python3
"""What a newcomer hears, measured: each builtin base model in each prompt format, trained on
episodes 1-8 of the script and scored on the held-out episodes 9-10, base and adapter, each
without and with canon, in one run.

For every (model, format) it makes a project folder and runs the product's own commands there:
``rolebot prepare SCRIPT --val-episodes 2`` (pairs of episodes 1-8 and their identity pairs, the
held-out pairs of 9-10, the canon index of 1-8), ``rolebot train`` with the CPU recipe (single
512-token rows, batch 1, the row shape of the first run and of a retrain without a GPU) for
``--epochs`` (or ``--steps``), and ``rolebot eval`` (held-out NLL over every held-out pair, greedy
replies of at most ``--tokens`` tokens to ``--limit`` of them and to the 20 identity probes,
scored as the engine's filter shows them). The base model is trained and scored unquantised, as
on a CPU, unless ``--4bit``. It prints one table per (model, format), the wall time of each
stage, and the targets (issue: held-out NLL >= 30% below the base, >= 95% of replies in the
script's language, none with scaffolding, <= 2% role confusion, >= 95% of identity probes in
character).

    python bench/fidelity.py                       # the real script in ../shared, both models, both formats
    python bench/fidelity.py --models qwen2.5-coder-0.5b --formats chat --steps 24
    python bench/fidelity.py --script my_script.txt --val-episodes 2
    PYTHONPATH=/tmp/site:$PWD python3 bench/fidelity.py --jobs 4 --limit 200   # on a GPU machine

NLL per token is not comparable between models (their tokenizers cut Chinese differently);
NLL per character is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.commands.eval import ROWS as EVAL_ROWS  # noqa: E402

REAL_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "zhenhuan" / "甄嬛传剧本01-10.txt"
ROWS = ("base", "base+canon", "adapter", "adapter+canon")
# The rows of ``rolebot eval``'s own table.
METRICS = EVAL_ROWS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", type=Path, default=REAL_SCRIPT, help="the screenplay (default: the real one in ../shared)")
    parser.add_argument("--character", default="甄嬛")
    parser.add_argument("--persona", default="", help="the character's persona (default: the shipped config.toml's for this character)")
    parser.add_argument("--val-episodes", type=int, default=2, help="held-out last episodes (default 2: 9-10)")
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m", help="builtin models, comma-separated")
    parser.add_argument("--formats", default="chat,alpaca", help="prompt formats, comma-separated")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs of the training pairs (default 2)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps instead of epochs (24: the first run's)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (default the tutorial's 2e-4)")
    parser.add_argument("--identity", type=int, default=None, help="identity pairs prepare adds (default prepare's)")
    parser.add_argument("--limit", type=int, default=40, help="held-out pairs to generate replies for")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens of each greedy reply")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="on a GPU, train and score the 4-bit base (QLoRA)")
    parser.add_argument("--jobs", type=int, default=1, help="(model, format) runs at once (a GPU machine has room for 4)")
    parser.add_argument("--work", type=Path, help="keep the projects here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()
    if not args.script.exists():
        print(f"fidelity: {args.script} not found; pass --script (a screenplay with 10 or more episodes)", file=sys.stderr)
        return 2
    args.script = args.script.resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="rolebot-fidelity-"))).resolve()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    started = time.perf_counter()
    converted = convert(models)
    print(f"converted {', '.join(models)} in {converted:.0f} s", flush=True)
    combos = [(model, fmt) for model in models for fmt in formats]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run, work / f"{model}-{fmt}", model, fmt, args) for model, fmt in combos]
        for future in as_completed(futures):  # each table as soon as its run is done
            print(render(future.result()), flush=True)
    results = [future.result() for future in futures]
    print(summary(results, args))
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def convert(models: list[str]) -> float:
    """Each builtin model converted once, before the runs (which would otherwise race to do it)."""
    from training.builtin import resolve

    started = time.perf_counter()
    for model in models:
        resolve("builtin:" + model)
    return time.perf_counter() - started


def recipe(args) -> str:
    amount = f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs"
    return (f"{amount} of single 512-token rows, lr {args.lr:g}, "
            f"{'4-bit' if args.four_bit else 'unquantised'} base")


def run(project: Path, model: str, fmt: str, args) -> dict:
    project.mkdir(parents=True, exist_ok=True)
    persona = args.persona or shipped_persona(args.character)
    (project / "config.toml").write_text(f"""
[character]
name = "{args.character}"
persona = {json.dumps(persona, ensure_ascii=False)}
[model]
base = "builtin:{model}"
prompt_format = "{fmt}"
load_in_4bit = {"true" if args.four_bit else "false"}
[training]
batch_size = 1
grad_accum = 1
warmup_steps = 0
pack_length = 512
max_steps = {args.steps}
epochs = {args.epochs}
learning_rate = {args.lr}
[generation]
max_new_tokens = {args.tokens}
[console]
enabled = false
""", encoding="utf-8")
    data = project / "data" / f"{args.character}.json"
    wall = {}
    identity = [] if args.identity is None else ["--identity", str(args.identity)]
    wall["prepare"] = rolebot(project, "prepare", str(args.script), "--character", args.character,
                              "--val-episodes", str(args.val_episodes), "--output", str(data), *identity)
    wall["train"] = rolebot(project, "train", "--data", str(data), "--val", str(data.with_suffix(".val.json")))
    wall["eval"] = rolebot(project, "eval", "--limit", str(args.limit))
    versions = sorted((project / "adapters" / args.character).glob("v*/meta.json"))
    meta = json.loads(versions[-1].read_text(encoding="utf-8"))
    return {"model": model, "format": fmt, "steps": meta["steps"], "train_runtime_s": meta["runtime_s"],
            "train_pairs": meta.get("dataset", {}).get("pairs"), "recipe": recipe(args),
            "wall_s": wall, "eval": {row: meta["eval"][row] for row in ROWS if row in meta["eval"]},
            "held_out_pairs": meta["eval"]["base"]["pairs"]}


def shipped_persona(name: str) -> str:
    """The persona the shipped config.toml gives ``name`` (so the bench scores what a newcomer
    gets), else the one a cast member without a persona gets."""
    from bot.config import cast_persona, parse_config

    path = Path(__file__).resolve().parents[1] / "config.toml"
    shipped = parse_config(path.read_text(encoding="utf-8"), path)
    known = any(name in member.names for member in shipped.members)
    return shipped.member(name).persona if known else cast_persona(name)


def rolebot(project: Path, *command: str) -> float:
    """One rolebot command in ``project``; its wall time. Its output goes to the project's log."""
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(project / "bench.log", "a", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, "-m", "bot", "--config", str(project / "config.toml"), *command],
                              cwd=project, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"fidelity: `rolebot {' '.join(command)}` failed in {project}; see {project / 'bench.log'}")
    return round(time.perf_counter() - started, 1)


def render(result: dict) -> str:
    rows = [row for row in ROWS if row in result["eval"]]
    wall = result["wall_s"]
    lines = [f"\nbuiltin:{result['model']}, {result['format']} format, {result['recipe']}: {result['steps']} steps "
             f"({result['train_runtime_s']:.0f} s of training); wall time prepare {wall['prepare']:.0f} s, "
             f"train {wall['train']:.0f} s, eval {wall['eval']:.0f} s; {result['held_out_pairs']} held-out pairs",
             "| metric | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for key, label, fmt in METRICS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(result["eval"][row][key]) for row in rows) + " |")
    return "\n".join(lines)


def summary(results: list[dict], args) -> str:
    """The targets, for each (model, format), on the adapter row (without canon)."""
    lines = [f"\nTargets on the held-out episodes ({recipe(args)}; adapter row without canon; NLL against the base "
             "in the same prompt):",
             "| model | format | NLL vs base | in language ≥95% | scaffolding = 0 | confusion ≤2% | identity ≥95% | met |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        base, adapter = result["eval"]["base"], result["eval"]["adapter"]
        drop = 1 - adapter["nll"] / base["nll"]
        checks = [drop >= 0.30, adapter["language"] >= 0.95, adapter["scaffolding"] == 0,
                  adapter["confusion"] <= 0.02, adapter["identity"] >= 0.95]
        lines.append(f"| {result['model']} | {result['format']} | {-drop:+.0%} | {adapter['language']:.0%} | "
                     f"{adapter['scaffolding']:.0%} | {adapter['confusion']:.0%} | {adapter['identity']:.0%} | "
                     f"{sum(checks)}/5 |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
