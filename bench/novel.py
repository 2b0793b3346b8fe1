#!/usr/bin/env python3
"""How well and how fast a novel's dialogue is attributed: the free rule pass, then (with
``--base-url``) the LLM pass on what it left unknown, against the 200 hand-checked lines of
``tests/data/novel_check.jsonl`` (each quoted line of the sample novel with its true speaker).

Precision is the share of checked lines given a speaker whose speaker is right (the
character's aliases count as the character); coverage the share of checked lines given one.
The rule pass is timed over ``--repeat`` runs (the best one is shown). The LLM pass uses a
fresh cache unless ``--cache`` names one, so its requests and tokens are real.

    python bench/novel.py
    python bench/novel.py --base-url http://127.0.0.1:8765/v1 --model 甄嬛    # rolebot serve
    DEEPSEEK_API_KEY=... python bench/novel.py --base-url https://api.deepseek.com/v1 \\
        --model deepseek-chat --api-key-env DEEPSEEK_API_KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from training.llm import Endpoint
from training.novel import SAMPLE_NOVEL, Novel, read_novel, rule_counts
from training.novel_llm import Extractor, Settings, estimate, read_cache
from training.screenplay import read_script_text

CHECK_SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "novel_check.jsonl"


def score(novel: Novel, check: list[dict], names: tuple[str, ...], only: str = "") -> tuple[int, int]:
    """(lines given a speaker, of them right) on the check set; ``only``: found that way."""
    found = {(q.chapter_label, q.text): q for q in novel.lines}
    given = right = 0
    for c in check:
        quote = found.get((c["chapter"], c["line"]))
        if quote is None or not quote.speaker or (only and quote.how != only):
            continue
        given += 1
        right += (names[0] if quote.speaker in names else quote.speaker) == c["speaker"]
    return given, right


def row(label: str, lines: str, given: int, right: int, total: int, seconds: str, tokens: str) -> str:
    precision = f"{right / given:.1%}" if given else "—"
    return (f"| {label} | {lines} | {given}/{total} ({given / total:.0%}) | {right}/{given} = {precision} "
            f"| {seconds} | {tokens} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--novel", type=Path, default=SAMPLE_NOVEL)
    parser.add_argument("--check", type=Path, default=CHECK_SET)
    parser.add_argument("--character", default="甄嬛")
    parser.add_argument("--alias", action="append", default=None)
    parser.add_argument("--narrator", default="")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--base-url")
    parser.add_argument("--model")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--chunk-chars", type=int, default=Settings.chunk_chars)
    parser.add_argument("--overlap-chars", type=int, default=Settings.overlap_chars)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--malformed-retries", type=int, default=Settings.malformed_retries)
    parser.add_argument("--max-chunks", type=int, default=0,
                        help="send only the first N chunks (a slow CPU model); 0: all")
    args = parser.parse_args()

    names = (args.character, *(args.alias if args.alias is not None else ["嬛嬛", "莞贵人", "甄常在"]))
    narrator = args.narrator or args.character
    check = [json.loads(line) for line in args.check.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = read_script_text(args.novel)
    times = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        novel = read_novel(text, str(args.novel), names, narrator)
        times.append(time.perf_counter() - start)
    counts = rule_counts(novel)
    print(f"{args.novel}: {len(text):,} characters, {novel.chapters()} chapters, {counts.lines} quoted lines; "
          f"check set {args.check.name}: {len(check)} lines")
    print("| pass | lines attributed / unknown | checked lines given a speaker | precision | seconds | tokens |")
    print("|---|---|---|---|---|---|")
    given, right = score(novel, check, names)
    print(row("rule pass", f"{counts.attributed} / {counts.unknown}", given, right, len(check),
              f"{min(times):.3f}", "0"))
    if not args.base_url:
        print("(no --base-url: the LLM pass was not run)")
        return
    cache = args.cache or Path(tempfile.mkdtemp(prefix="rolebot-novel-bench-")) / "cache.jsonl"
    endpoint = Endpoint(args.base_url, args.model or args.character, os.environ.get(args.api_key_env),
                        args.api_key_env, timeout=args.timeout, concurrency=args.concurrency, temperature=0.0,
                        max_tokens=args.max_tokens)
    settings = Settings(endpoint, cache, chunk_chars=args.chunk_chars, overlap_chars=args.overlap_chars,
                        malformed_retries=args.malformed_retries)
    plan = estimate(novel, settings, names)
    extractor = Extractor(novel, settings, names)
    if args.max_chunks:
        extractor.chunks = extractor.chunks[:args.max_chunks]  # the rest stay unknown, unasked
    start = time.perf_counter()
    after = asyncio.run(extractor.run())
    seconds = time.perf_counter() - start
    report = extractor.report
    # What the answers cost when they were asked, cached ones included (the cache keeps it).
    entries = read_cache(cache)
    spent = sum(entries[c.key].get("prompt_tokens", 0) + entries[c.key].get("completion_tokens", 0)
                for c in extractor.chunks if c.key in entries)
    tokens = f"{spent:,} (server)" if spent else f"≈{plan.prompt_tokens + plan.completion_tokens:,} (estimate)"
    added_given, added_right = score(after, check, names, only="llm")
    print(row(f"LLM pass ({endpoint.model}), lines it added", f"+{report.added}", added_given, added_right,
              len(check), f"{seconds:.1f}", tokens))
    given, right = score(after, check, names)
    counts = rule_counts(after)
    print(row("rule + LLM", f"{counts.attributed} / {counts.unknown}", given, right, len(check),
              f"{min(times) + seconds:.1f}", tokens))
    dropped = ", ".join(f"{reason}: {n}" for reason, n in report.dropped.most_common()) or "none"
    print(f"LLM answers: {report.chunks} of {plan.chunks} chunks sent, {report.parsed} parsed, {report.malformed} malformed, "
          f"{report.gave_up} given up; items {report.items} = {report.accepted} accepted + {report.agreed} agree + "
          f"{report.differed} disagree + {sum(report.dropped.values())} dropped ({dropped})")


if __name__ == "__main__":
    main()
