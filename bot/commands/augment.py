"""``rolebot augment``: more in-style pairs for the character from an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bot.commands import count
from bot.config import Config, load_config, secret
from training.augment import (MODES, SAMPLE_QUESTIONS, SOURCE, Augmenter, Endpoint, Job, Report,
                              partial_path, read_questions)
from training.errors import UserError

DESCRIPTION = """\
Grow a character's dataset with an LLM, as the tutorial suggests, on any OpenAI-compatible
endpoint: a hosted API, a vLLM server, or rolebot's own `rolebot serve` (the default).

  fewshot    each request shows K real pairs (drawn with --seed, different for every request)
             and asks for --per-request new pairs in the same voice
  questions  each line of --questions is an everyday question; the K real pairs whose lines
             are most like it (BM25 over character n-grams) are shown as style examples and
             the character's answer becomes a new pair

Answers are read as JSON or numbered text; an unreadable answer is asked again up to
--malformed-retries times, then skipped and counted. Pairs are dropped when the reply is
outside --min-chars/--max-chars, breaks character (the detector `rolebot eval` uses), or is an
exact or near copy (character 3-gram Jaccard >= 0.8) of a real or generated reply. The output
holds the real pairs unchanged followed by the kept ones, each with "source":
"generated:fewshot" or "generated:questions".

The API key is read from the environment variable named by --api-key-env, never from the
command line. Ctrl-C keeps what was generated in OUTPUT's .partial twin; the same command
resumes from it.

Examples:
  rolebot augment --data data/huanhuan.json --output data/huanhuan.aug.json --n 200
  DEEPSEEK_API_KEY=... rolebot augment --data data/huanhuan.json --output data/huanhuan.aug.json \\
      --base-url https://api.deepseek.com/v1 --model deepseek-chat --api-key-env DEEPSEEK_API_KEY
  rolebot augment --data data/huanhuan.json --output data/huanhuan.q.json --mode questions \\
      --questions questions.txt
"""

HELP = "generate more in-style pairs with an OpenAI-compatible LLM"
FEWSHOT_N = 100


def register(sub) -> None:
    parser = sub.add_parser("augment", help=HELP, description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, metavar="FILE",
                        help="the real pairs (Alpaca JSON or JSON lines, e.g. from `rolebot prepare`)")
    parser.add_argument("--output", required=True, type=Path, metavar="FILE",
                        help="where the real pairs plus the generated ones are written")
    parser.add_argument("--mode", choices=MODES, default="fewshot", help="how to ask (default: %(default)s)")
    parser.add_argument("--questions", type=Path, metavar="FILE",
                        help="questions mode: one everyday question a line (default: rolebot's sample "
                             "of 20 Chinese questions)")
    parser.add_argument("--n", type=positive, metavar="N",
                        help=f"generated pairs to keep (default: {FEWSHOT_N} in fewshot mode, one per "
                             "question in questions mode)")
    parser.add_argument("--examples", type=positive, default=Job.examples, metavar="K",
                        help="real pairs shown in each request (default: %(default)s)")
    parser.add_argument("--per-request", type=positive, default=Job.per_request, metavar="M",
                        help="fewshot: new pairs asked for in each request (default: %(default)s)")
    parser.add_argument("--character", metavar="NAME",
                        help="the character the pairs are for (default: the config's [character] name)")
    parser.add_argument("--base-url", metavar="URL",
                        help="the endpoint's base URL, up to /v1 (default: `rolebot serve` at the "
                             "config's [web] host and port)")
    parser.add_argument("--model", metavar="NAME", help="model to ask for (default: the character's name, "
                                                        "which `rolebot serve` answers to)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                        help="environment variable holding the API key; unset is fine for servers "
                             "without one (default: %(default)s)")
    parser.add_argument("--concurrency", type=positive, default=Endpoint.concurrency, metavar="C",
                        help="requests in flight at once (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=Job.seed, metavar="S",
                        help="seed for the examples drawn (default: %(default)s)")
    parser.add_argument("--min-chars", type=count, default=Job.min_chars, metavar="N",
                        help="drop replies shorter than N characters (default: %(default)s)")
    parser.add_argument("--max-chars", type=count, default=Job.max_chars, metavar="N",
                        help="drop replies longer than N characters; 0: no limit (default: %(default)s)")
    parser.add_argument("--temperature", type=temperature, default=Endpoint.temperature, metavar="T",
                        help="sampling temperature (default: %(default)s)")
    parser.add_argument("--max-tokens", type=positive, default=Endpoint.max_tokens, metavar="N",
                        help="longest answer in tokens (default: %(default)s)")
    parser.add_argument("--timeout", type=seconds, default=Endpoint.timeout, metavar="SECONDS",
                        help="seconds before one HTTP attempt fails (default: %(default)s)")
    parser.add_argument("--max-retries", type=count, default=Endpoint.max_retries, metavar="N",
                        help="the client's retries, with back-off, on 429, 5xx, timeouts and "
                             "connection errors (default: %(default)s)")
    parser.add_argument("--malformed-retries", type=count, default=Job.malformed_retries, metavar="N",
                        help="times a prompt is asked again when its answer cannot be read "
                             "(default: %(default)s)")
    parser.set_defaults(run=run)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 1")
    return int(text)


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a temperature from 0 to 2")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def run(args: argparse.Namespace) -> int:
    """Generate, filter and write; show progress on stderr and the report on stdout."""
    config = load_config(args.config)
    job = make_job(args, config)
    endpoint = make_endpoint(args, config, job.character)
    augmenter = Augmenter(job, endpoint)  # reads and checks the files before anything is shown
    console = Console(stderr=True)
    if resumed := len(augmenter.kept):
        console.print(f"resuming: {resumed} generated pairs from {augmenter.partial}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("starting", total=None)
        counted = "pairs kept" if job.mode == "fewshot" else "questions done"

        def show(report: Report) -> None:
            bar.update(task, completed=report.done, total=report.goal or None, description=(
                f"{counted} ({report.kept} kept, {sum(report.dropped.values())} dropped, "
                f"{report.malformed} malformed, {report.failed} failed)"))

        augmenter.on_update = show
        try:
            report = asyncio.run(augmenter.run())
        except (KeyboardInterrupt, UserError):
            bar.stop()
            print(render_report(augmenter.report, job, endpoint), flush=True)
            raise
    print(render_report(report, job, endpoint))
    return 0


def make_job(args: argparse.Namespace, config: Config) -> Job:
    character = (args.character or config.character.name).strip()
    if not character:
        raise UserError("--character: the character's name is empty — pass --character NAME")
    if args.questions and args.mode != "questions":
        raise UserError("--questions is read in questions mode only — add --mode questions")
    questions = read_questions(args.questions or SAMPLE_QUESTIONS) if args.mode == "questions" else ()
    return Job(
        data=args.data, output=args.output, character=character, mode=args.mode, questions=questions,
        n=args.n if args.n is not None or args.mode == "questions" else FEWSHOT_N,
        examples=args.examples, per_request=args.per_request, seed=args.seed,
        min_chars=args.min_chars, max_chars=args.max_chars, malformed_retries=args.malformed_retries,
        # The persona describes the configured character, not another one named by --character.
        persona=config.character.persona if character == config.character.name else "",
    )


def make_endpoint(args: argparse.Namespace, config: Config, character: str) -> Endpoint:
    host = f"[{config.web.host}]" if ":" in config.web.host else config.web.host
    return Endpoint(
        base_url=args.base_url or f"http://{host}:{config.web.port}/v1",
        model=args.model or character,
        api_key=secret(args.api_key_env),
        api_key_env=args.api_key_env,
        timeout=args.timeout,
        max_retries=args.max_retries,
        concurrency=args.concurrency,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )


def render_report(report: Report, job: Job, endpoint: Endpoint) -> str:
    """Counts first, then reasons; each total is shown as the sum of its parts."""
    lines = [f"Augmented {job.data} ({report.real} real pairs) for {job.character}, {job.mode} mode, "
             f"via {endpoint.base_url} (model {endpoint.model})"]
    if report.resumed:
        lines.append(f"  resumed {report.resumed} generated pairs from {partial_path(job.output)}")
    cancelled = f" + {report.cancelled} cancelled" if report.cancelled else ""
    lines.append(f"Requests: {report.requested} requested = {report.received} received + "
                 f"{report.failed} failed{cancelled}")
    lines += [f"  {n:6}  failed: {reason}" for reason, n in report.failures.most_common()]
    lines.append(f"  {http_line(report)}")
    lines.append(f"Answers: {report.received} received = {report.parsed} parsed + {report.malformed} malformed; "
                 f"{report.gave_up} prompt(s) given up ({1 + job.malformed_retries} unusable answers each)")
    dropped = sum(report.dropped.values())
    lines.append(f"Pairs: {report.candidates} in the answers = {report.kept} kept + {dropped} dropped")
    lines += [f"  {n:6}  dropped: {reason}" for reason, n in report.dropped.most_common()]
    generated = report.resumed + report.kept
    if report.output:
        lines.append(f"Wrote {report.written} pairs to {report.output}: {report.written - generated} real + "
                     f'{generated} generated (source "{SOURCE}:…")')
    elif report.partial:
        lines.append(f"Kept {generated} generated pairs in {report.partial}; run the same command again to "
                     "resume")
    return "\n".join(lines)


def http_line(report: Report) -> str:
    """Every HTTP attempt by status, so the client's own retries show."""
    silent = report.attempts - sum(report.statuses.values())
    parts = [f"{code} ×{n}" for code, n in sorted(report.statuses.items())]
    parts += [f"no reply ×{silent}"] if silent else []
    retries = max(0, report.attempts - report.requested)
    return f"HTTP attempts: {report.attempts} ({', '.join(parts) or 'none'}); the client retried {retries}"
