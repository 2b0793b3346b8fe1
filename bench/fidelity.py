#!/usr/bin/env python3
"""What a newcomer hears, measured: each builtin base model in each prompt format, trained on
episodes 1-8 of the script and scored on the held-out episodes 9-10, base and adapter, each
without and with canon, in one run.

For every (model, format) it makes a project folder and runs the product's own commands there:
``rolebot prepare SCRIPT --val-episodes 2`` (pairs of episodes 1-8, the held-out pairs of 9-10,
the canon index of 1-8), ``rolebot train`` with the CPU recipe (``--steps`` single 512-token
rows, the recipe of the first run and of a retrain without a GPU) and ``rolebot eval``
(held-out NLL over every held-out pair, greedy replies of at most ``--tokens`` tokens to
``--limit`` of them and to the 20 identity probes, scored as the engine's filter shows them).
It prints one table per (model, format), the wall time of each stage, and the targets of the
default model (issue: held-out NLL >= 30% below the base, >= 95% of replies in the script's
language, none with scaffolding, <= 2% role confusion, >= 95% of identity probes in character).

    python bench/fidelity.py                       # the real script in ../shared, both models, both formats
    python bench/fidelity.py --models qwen2.5-coder-0.5b --formats chat --steps 24
    python bench/fidelity.py --script my_script.txt --val-episodes 2

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
from pathlib import Path

from bot.commands.eval import ROWS as EVAL_ROWS

REAL_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "data" / "zhenhuan" / "甄嬛传剧本01-10.txt"
ROWS = ("base", "base+canon", "adapter", "adapter+canon")
# The rows of ``rolebot eval``'s own table.
METRICS = EVAL_ROWS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", type=Path, default=REAL_SCRIPT, help="the screenplay (default: the real one in ../shared)")
    parser.add_argument("--character", default="甄嬛")
    parser.add_argument("--val-episodes", type=int, default=2, help="held-out last episodes (default 2: 9-10)")
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m", help="builtin models, comma-separated")
    parser.add_argument("--formats", default="chat,alpaca", help="prompt formats, comma-separated")
    parser.add_argument("--steps", type=int, default=24, help="training steps of one 512-token row (the CPU recipe)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (the tutorial's)")
    parser.add_argument("--limit", type=int, default=40, help="held-out pairs to generate replies for")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens of each greedy reply")
    parser.add_argument("--work", type=Path, help="keep the projects here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    args = parser.parse_args()
    if not args.script.exists():
        print(f"fidelity: {args.script} not found; pass --script (a screenplay with 10 or more episodes)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="rolebot-fidelity-"))
    results = []
    for model in args.models.split(","):
        for fmt in args.formats.split(","):
            results.append(run(work / f"{model}-{fmt}", model.strip(), fmt.strip(), args))
            print(render(results[-1]), flush=True)
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def run(project: Path, model: str, fmt: str, args) -> dict:
    project.mkdir(parents=True, exist_ok=True)
    (project / "config.toml").write_text(f"""
[character]
name = "{args.character}"
[model]
base = "builtin:{model}"
prompt_format = "{fmt}"
[training]
batch_size = 1
grad_accum = 1
warmup_steps = 0
pack_length = 512
max_steps = {args.steps}
learning_rate = {args.lr}
[generation]
max_new_tokens = {args.tokens}
[console]
enabled = false
""", encoding="utf-8")
    data = project / "data" / f"{args.character}.json"
    wall = {}
    wall["prepare"] = rolebot(project, "prepare", str(args.script), "--character", args.character,
                              "--val-episodes", str(args.val_episodes), "--output", str(data))
    wall["train"] = rolebot(project, "train", "--data", str(data), "--val", str(data.with_suffix(".val.json")))
    wall["eval"] = rolebot(project, "eval", "--limit", str(args.limit))
    versions = sorted((project / "adapters" / args.character).glob("v*/meta.json"))
    meta = json.loads(versions[-1].read_text(encoding="utf-8"))
    return {"model": model, "format": fmt, "steps": meta["steps"], "train_runtime_s": meta["runtime_s"],
            "wall_s": wall, "eval": {row: meta["eval"][row] for row in ROWS if row in meta["eval"]},
            "held_out_pairs": meta["eval"]["base"]["pairs"]}


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
    lines = [f"\nbuiltin:{result['model']}, {result['format']} format: {result['steps']} steps "
             f"({result['train_runtime_s']:.0f} s of training); wall time prepare {wall['prepare']:.0f} s, "
             f"train {wall['train']:.0f} s, eval {wall['eval']:.0f} s; {result['held_out_pairs']} held-out pairs",
             "| metric | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for key, label, fmt in METRICS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(result["eval"][row][key]) for row in rows) + " |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """The targets, for each (model, format), on the adapter's best row (with or without canon)."""
    lines = ["\nTargets on the held-out episodes (adapter row; NLL against the base in the same prompt):",
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
