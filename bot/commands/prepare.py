"""``rolebot prepare``: screenplays and novels become the tutorial's training data for one
character."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bot.commands import count
from bot.commands.augment import http_line, positive, seconds
from bot.config import load_config, secret
from training.errors import UserError
from training.llm import Endpoint
from training.novel import Novel, detect
from training.novel_llm import Estimate, Extractor, Settings, estimate
from training.novel_llm import Report as LLMReport
from training.pairs import (FORMATS, SOURCES, Character, PrepareRequest, novel_notes, prepare, read_novel_for,
                            validation_path)
from training.screenplay import read_script_text

DESCRIPTION = """\
Read screenplays in the 「角色（动作）：台词」 form, or novels with quoted dialogue, and
write training pairs for one character: each line of the character that answers someone
else's line in the same scene becomes {"instruction": their line, "input": "", "output":
the character's line}, the tutorial's Alpaca data. Stage directions are removed; lines with an action
(甄嬛（笑）：…), a colon inside the text, full- or half-width punctuation, CRLF, and
UTF-8 (with or without BOM), GBK or UTF-16 files are all read.

Beside the pairs it writes the canon index FILE.canon.jsonl (e.g. huanhuan.canon.jsonl): the
training episodes' exchanges (the line said, the character's answer, episode, scene,
speaker), which training and the bot search for the scenes most like the line at hand
([canon] in config.toml). Held-out episodes stay out of it.

A novel (prose with dialogue in “…”, 「…」 or "…", chapters 第一章/第一回…) is detected by
itself (--from auto: many quotes, few 名字： lines; the report says which was chosen). A free
rule pass attributes each quoted line from the narration around it (甄嬛笑道：“…”, “…”她说,
我笑道 as the --narrator); the previous quoted line of the chapter is the instruction, and
chapters count as episodes for --val-episodes. --llm asks any OpenAI-compatible model
(--base-url: a hosted API, vLLM, llama.cpp's server, or `rolebot serve`, the default) about the
lines left unknown, in overlapping chunks, checking every answer: a line not in the text or a
speaker not in the chunk is dropped and counted. Answers are cached in FILE's .llm-cache.jsonl
twin, so an interrupted run resumes and a re-run costs nothing; --dry-run shows the chunks and
tokens (and cost, with --price) it would send, and writes nothing.

Examples:
  rolebot prepare 甄嬛传剧本01-10.txt --character 甄嬛 --alias 嬛嬛 --alias 莞贵人 \\
      --output data/huanhuan.json
  rolebot prepare ep*.txt --character 甄嬛 --output data/huanhuan.jsonl --format jsonl \\
      --history 4 --val-episodes 1
  rolebot prepare 后宫甄嬛传.txt --character 甄嬛 --alias 莞贵人 --output data/huanhuan.json
  DEEPSEEK_API_KEY=... rolebot prepare 后宫甄嬛传.txt --character 甄嬛 --output data/huanhuan.json \\
      --llm --base-url https://api.deepseek.com/v1 --model deepseek-chat \\
      --api-key-env DEEPSEEK_API_KEY --price 0.27,1.10 --dry-run
"""

HELP = "turn screenplays or novels into training pairs for one character"
LLM_DEFAULTS = Endpoint("", "", temperature=0.0, max_tokens=2048)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scripts", nargs="+", type=Path, metavar="SCRIPT",
                        help="screenplay or novel files, in story order (their order decides which "
                             "episodes are the last ones)")
    parser.add_argument("--character", required=True, metavar="NAME",
                        help="the character to learn, as the script names its speaker")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME",
                        help="another speaker name of the same character (repeatable), "
                             "e.g. --alias 嬛嬛 --alias 莞贵人 (default: the config's aliases of that "
                             "character, [character] or a [[cast]] table, when --character is its name)")
    parser.add_argument("--output", required=True, type=Path, metavar="FILE",
                        help="the dataset file to write (its folder is created)")
    parser.add_argument("--format", choices=FORMATS, default=PrepareRequest.format,
                        help="alpaca: JSON array of instruction/input/output (the tutorial's); "
                             "sharegpt: JSON array of conversations; jsonl: one "
                             '{"messages": [...]} a line (default: %(default)s)')
    parser.add_argument("--history", type=count, default=PrepareRequest.history, metavar="N",
                        help="add up to N earlier lines of the scene: as earlier turns "
                             "(sharegpt, jsonl) or as 「角色：台词」 lines in input (alpaca) "
                             "(default: %(default)s)")
    parser.add_argument("--val-episodes", type=count, default=PrepareRequest.val_episodes,
                        metavar="K",
                        help="write the last K episodes' pairs to FILE's .val twin "
                             "(e.g. huanhuan.val.json) for evaluation (default: %(default)s)")
    parser.add_argument("--min-chars", type=count, default=PrepareRequest.min_chars,
                        metavar="N", help="drop replies shorter than N characters "
                                          "(default: %(default)s)")
    parser.add_argument("--max-chars", type=count, default=PrepareRequest.max_chars,
                        metavar="N", help="drop replies longer than N characters; 0: no "
                                          "limit (default: %(default)s)")
    parser.add_argument("--identity", type=count, default=PrepareRequest.identity, metavar="N",
                        help="add N self-cognition pairs to the training file: questions about who the "
                             "character is (none of them the evaluation's identity probes), answered in "
                             "character with the config's persona; \"source\": \"identity\" in alpaca; "
                             "never in the validation file or the canon index; 0: none (default: one per "
                             "12 of the script's training pairs, at least 4, at most 32, so that a small "
                             "script is not drowned in them)")
    novel = parser.add_argument_group("novels")
    novel.add_argument("--from", dest="source", choices=SOURCES, default="auto",
                       help="read the files as screenplays or novels; auto decides per file and "
                            "says which (default: %(default)s)")
    novel.add_argument("--narrator", metavar="NAME", default="",
                       help="who 我 is in a first-person novel (default: --character)")
    novel.add_argument("--llm", action="store_true",
                       help="ask an OpenAI-compatible model who says the lines the rule pass left unknown")
    novel.add_argument("--dry-run", action="store_true",
                       help="read the files and show what would be sent (chunks, tokens, cost) and "
                            "written; send and write nothing")
    novel.add_argument("--base-url", metavar="URL",
                       help="--llm: the endpoint's base URL, up to /v1 (default: `rolebot serve` at the "
                            "config's [web] host and port)")
    novel.add_argument("--model", metavar="NAME",
                       help="--llm: the model to ask for (default: the character's name, which "
                            "`rolebot serve` answers to)")
    novel.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="--llm: environment variable holding the API key; unset is fine for "
                            "servers without one (default: %(default)s)")
    novel.add_argument("--price", type=price, metavar="IN,OUT",
                       help="--llm: USD per million input and output tokens, for the cost estimate "
                            "(e.g. 0.27,1.10)")
    novel.add_argument("--chunk-chars", type=positive, default=Settings.chunk_chars, metavar="N",
                       help="--llm: characters of the novel in one request (default: %(default)s)")
    novel.add_argument("--overlap-chars", type=count, default=Settings.overlap_chars, metavar="N",
                       help="--llm: characters each chunk repeats of the one before (default: %(default)s)")
    novel.add_argument("--concurrency", type=positive, default=LLM_DEFAULTS.concurrency, metavar="C",
                       help="--llm: requests in flight at once (default: %(default)s)")
    novel.add_argument("--timeout", type=seconds, default=LLM_DEFAULTS.timeout, metavar="SECONDS",
                       help="--llm: seconds before one HTTP attempt fails (default: %(default)s)")
    novel.add_argument("--max-retries", type=count, default=LLM_DEFAULTS.max_retries, metavar="N",
                       help="--llm: the client's retries, with back-off, on 429, 5xx, timeouts and "
                            "connection errors (default: %(default)s)")
    novel.add_argument("--malformed-retries", type=count, default=Settings.malformed_retries, metavar="N",
                       help="--llm: times a chunk is asked again when its answer is not the JSON asked "
                            "for (default: %(default)s)")
    novel.add_argument("--max-tokens", type=positive, default=LLM_DEFAULTS.max_tokens, metavar="N",
                       help="--llm: longest answer in tokens (default: %(default)s)")
    parser.set_defaults(run=run)


def price(text: str) -> tuple[float, float]:
    try:
        given, taken = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not IN,OUT (USD per million tokens, e.g. 0.27,1.10)") from None
    if given < 0 or taken < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: prices are not negative")
    return given, taken


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset, then print what was read, written and skipped."""
    config = load_config(args.config)
    name = args.character.strip()
    aliases = tuple(a.strip() for a in args.alias)
    member = config.member(name) if name in (m.name for m in config.members) else None
    if not aliases and member:
        aliases = tuple(member.aliases)  # the cast member's, e.g. [[cast]] 皇帝's
    if (args.dry_run or args.llm) and args.source == "script":
        raise UserError("--llm and --dry-run are for novels — drop --from script, or use --from novel")
    request = PrepareRequest(
        scripts=tuple(args.scripts),
        character=Character(name, aliases),
        output=args.output,
        format=args.format,
        history=args.history,
        val_episodes=args.val_episodes,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        source=args.source,
        narrator=args.narrator.strip(),
        persona=member.persona if member else "",  # the identity pairs' facts
        identity=args.identity,
    )
    settings = llm_settings(args, config, name) if args.llm else None
    if args.dry_run:
        print(dry_run(request, settings, args.price))
        return 0
    if settings is None:
        print(prepare(request).render(args.format))
        return 0
    pass_ = LLMPass(settings, (name, *aliases), args.price)
    try:
        report = prepare(dataclasses.replace(request, extract=pass_))
    finally:
        if pass_.reports:
            print(pass_.render(), flush=True)
    print(report.render(args.format))
    return 0


def llm_settings(args: argparse.Namespace, config, character: str) -> Settings:
    host = f"[{config.web.host}]" if ":" in config.web.host else config.web.host
    endpoint = Endpoint(
        base_url=args.base_url or f"http://{host}:{config.web.port}/v1",
        model=args.model or character,
        api_key=secret(args.api_key_env),
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        max_retries=args.max_retries,
        concurrency=args.concurrency,
        temperature=LLM_DEFAULTS.temperature,
        max_tokens=args.max_tokens,
    )
    return Settings(endpoint, cache_path(args.output), args.chunk_chars, args.overlap_chars, args.malformed_retries)


def cache_path(output: Path) -> Path:
    """``data/huanhuan.json`` → ``data/huanhuan.llm-cache.jsonl``."""
    return output.with_name(f"{output.stem}.llm-cache.jsonl")


def dry_run(request: PrepareRequest, settings: Settings | None, prices: tuple[float, float] | None) -> str:
    """What a run would read and send; nothing is sent or written."""
    lines = []
    for path in request.scripts:
        text = read_script_text(path)
        shape = detect(text)
        kind = shape.kind if request.source == "auto" else request.source
        lines.append(shape.describe(str(path)) if request.source == "auto" else f"{path}: read as a {kind} (--from {kind})")
        if kind != "novel":
            continue
        novel = read_novel_for(text, str(path), request)
        lines += novel_notes(novel, request)
        if settings:
            lines.append("  " + describe_estimate(estimate(novel, settings, (request.character.name,
                                                                            *request.character.aliases)),
                                                 settings, prices))
    outputs = [request.output, *([validation_path(request.output)] if request.val_episodes else [])]
    lines.append(f"Dry run: nothing sent, nothing written (a run writes {', '.join(map(str, outputs))} and the "
                 "canon index)" + (f"; answers would be cached in {settings.cache}" if settings else ""))
    return "\n".join(lines)


def describe_estimate(plan: Estimate, settings: Settings, prices: tuple[float, float] | None) -> str:
    asked = plan.chunks - plan.cached
    cost = (f" ≈ ${plan.cost(prices):.4f} at ${prices[0]:g}/${prices[1]:g} per million tokens" if prices else
            " (--price IN,OUT for the cost)")
    return (f"LLM pass: {plan.chunks} chunks for {plan.unknown} unknown lines, {plan.cached} cached, {asked} to "
            f"send to {settings.endpoint.base_url} (model {settings.endpoint.model}): ≈{plan.prompt_tokens:,} "
            f"prompt + ≈{plan.completion_tokens:,} completion tokens{cost}")


class LLMPass:
    """The hook prepare calls for each novel: estimate, then extract with a progress bar."""

    def __init__(self, settings: Settings, names: tuple[str, ...], prices: tuple[float, float] | None):
        self.settings, self.names, self.prices = settings, names, prices
        self.reports: list[tuple[str, LLMReport]] = []

    def __call__(self, novel: Novel) -> Novel:
        console = Console(stderr=True)
        console.print(describe_estimate(estimate(novel, self.settings, self.names), self.settings, self.prices))
        extractor = Extractor(novel, self.settings, self.names)
        self.reports.append((novel.file, extractor.report))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("chunks", total=None)

            def show(report: LLMReport) -> None:
                bar.update(task, completed=report.done, total=report.chunks or None, description=(
                    f"chunks ({report.cached} cached, {report.malformed} malformed, {report.failed} failed)"))

            extractor.on_update = show
            try:
                return asyncio.run(extractor.run())
            except KeyboardInterrupt:
                bar.stop()
                print(f"interrupted: the answers so far are cached in {self.settings.cache}; the same command "
                      "resumes from them", file=sys.stderr)
                raise

    def render(self) -> str:
        endpoint = self.settings.endpoint
        lines = []
        for file, r in self.reports:
            lines.append(f"LLM pass on {file} via {endpoint.base_url} (model {endpoint.model}):")
            lines.append(f"  Chunks: {r.chunks} = {r.cached} cached + {r.parsed} answered + {r.gave_up} given up "
                         f"+ {r.unanswered} unanswered (cache: {self.settings.cache})")
            cancelled = f" + {r.cancelled} cancelled" if r.cancelled else ""
            lines.append(f"  Requests: {r.requested} requested = {r.received} received + {r.failed} failed{cancelled}"
                         f"; answers: {r.parsed} parsed + {r.malformed} malformed")
            lines += [f"  {n:6}  failed: {reason}" for reason, n in r.failures.most_common()]
            if r.schema_refused:
                lines.append("  the server refused response_format (JSON schema); asked with the prompt alone")
            lines.append(f"  {http_line(r)}")
            dropped = sum(r.dropped.values())
            lines.append(f"  Items: {r.items} = {r.accepted} accepted + {r.agreed} agree with the rule pass + "
                         f"{r.differed} disagree (the rule's kept) + {dropped} dropped; {r.added} lines added")
            lines += [f"  {n:6}  dropped: {reason}" for reason, n in r.dropped.most_common()]
            lines.append(f"  Tokens: {r.prompt_tokens:,} prompt + {r.completion_tokens:,} completion (as the "
                         "server counted them; 0 where it does not say)")
        return "\n".join(lines)
