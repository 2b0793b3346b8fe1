"""Growing a character's dataset with an LLM on any OpenAI-compatible endpoint.

The tutorial's two suggestions: *few-shot* shows the model K real pairs and asks for new ones in
the same voice; *questions* takes everyday questions and asks for the character's answer, with
the K most similar real pairs (BM25 over character n-grams, ``training.bm25``) as style examples. Answers are read
leniently (a JSON array or object, or numbered text), then filtered: length limits, replies that
break character (the detector ``rolebot eval`` uses), and exact or near duplicates of real or
already generated replies. Kept pairs carry ``source`` so training can weight or exclude them;
the real pairs are copied to the output unchanged.

Transport failures (429, 5xx, timeouts) are retried by the ``openai`` client itself with
back-off; an answer that cannot be read is asked again a bounded number of times, then skipped
and counted. An interrupted run leaves what it kept in ``<output>.partial.json``; the same
command resumes from there.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from training.bm25 import BM25
from training.character import breaks_character
from training.dataset import read_dataset
from training.errors import UserError
from training.identity import SOURCE as IDENTITY
from training.atomic import write_json_atomic
from training.llm import ChatClient, Endpoint

Mode = Literal["fewshot", "questions"]
MODES: tuple[Mode, ...] = ("fewshot", "questions")
SOURCE = "generated"  # kept pairs are marked "generated:fewshot" or "generated:questions"
NGRAM = 3
NEAR_DUPLICATE = 0.8  # character 3-gram Jaccard similarity from which two replies are one
# Few-shot stops after this many times the requests that --n needs, so a model whose answers
# are all dropped cannot spend requests without end.
REQUEST_BUDGET = 2
BEYOND_N = "beyond --n"
SAMPLE_QUESTIONS = Path(__file__).parent / "samples" / "questions.txt"


# What a run is asked to do


@dataclass(frozen=True)
class Pair:
    instruction: str
    output: str


@dataclass(frozen=True)
class Job:
    data: Path
    output: Path
    character: str
    mode: Mode = "fewshot"
    questions: tuple[str, ...] = ()
    n: int | None = None  # pairs to keep (few-shot needs it); questions: None answers them all
    examples: int = 3
    per_request: int = 5
    seed: int = 3407
    min_chars: int = 2
    max_chars: int = 400  # 0: no limit
    malformed_retries: int = 2
    persona: str = ""


@dataclass
class Report:
    """What happened to every request and every pair.

    requested = received + failed + cancelled; received = parsed + malformed;
    candidates (pairs in parsed answers) = kept + sum(dropped).
    """

    mode: Mode
    real: int = 0  # pairs in --data
    goal: int = 0  # few-shot: pairs to keep; questions: questions to answer
    done: int = 0  # progress toward goal
    resumed: int = 0
    requested: int = 0
    received: int = 0
    failed: int = 0
    cancelled: int = 0
    parsed: int = 0
    malformed: int = 0
    gave_up: int = 0  # prompts skipped after every attempt was malformed or unreadable
    candidates: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    attempts: int = 0  # HTTP requests sent, the client's retries included
    statuses: Counter[int] = field(default_factory=Counter)  # of the attempts that got a reply
    written: int = 0  # records in the output: real pairs + generated ones
    output: Path | None = None
    partial: Path | None = None


# Prompts


def fewshot_prompt(examples: list[Pair], character: str, count: int, persona: str = "") -> str:
    return (
        f"You are writing lines for {character}, a character in a screenplay. "
        f"{_about(persona)}In each real exchange below, someone says a line to {character} "
        f'("instruction") and {character} answers ("output"):\n\n{_as_json(examples)}\n\n'
        f"Write {count} new exchanges in the same voice: new situations and new wording, not "
        f"copies of the examples, in the same language and of about the same length. {character} "
        f"stays in the story's world and never mentions being an AI, a model or an assistant. "
        f'Answer with only a JSON array of {count} objects with the keys "instruction" and "output".'
    )


def question_prompt(question: str, examples: list[Pair], character: str, persona: str = "") -> str:
    return (
        f"You are writing lines for {character}, a character in a screenplay. "
        f"{_about(persona)}This is how {character} answers what others say "
        f'("instruction" is said to {character}, "output" is the answer):\n\n{_as_json(examples)}\n\n'
        f"Now someone says to {character}: {question}\n\n"
        f"Write {character}'s answer in the voice, language and length of the examples, staying in "
        f"the story's world and never mentioning being an AI, a model or an assistant. "
        f"Answer with only the words {character} says."
    )


def _about(persona: str) -> str:
    return f"About the character: {persona.strip()}\n\n" if persona.strip() else ""


def _as_json(pairs: list[Pair]) -> str:
    rows = [json.dumps({"instruction": p.instruction, "output": p.output}, ensure_ascii=False) for p in pairs]
    return "[\n" + ",\n".join(rows) + "\n]"


# Reading answers

FENCE = re.compile(r"```[A-Za-z]*\n?(.*?)(?:```|$)", re.S)
NUMBERED = re.compile(r"^[ \t]*(?:\d{1,3}|[一二三四五六七八九十]{1,3})[ \t]*[.)、．:：][ \t]*", re.M)
INSTRUCTION_KEYS = ("instruction", "question", "q", "prompt", "user", "line")
OUTPUT_KEYS = ("output", "answer", "a", "response", "reply")
INSTRUCTION_LABELS = ("instruction", "question", "q", "问题", "提问", "问", "对方")
OUTPUT_LABELS = ("output", "answer", "a", "回答", "答")
QUOTES = "\"'“”‘’「」『』"


def parse_pairs(text: str, character: str = "") -> list[Pair]:
    """New pairs from an answer: JSON (an array, an object holding one, or objects that survive
    truncation), else numbered or labelled text. [] when nothing can be read."""
    text = _unfence(text)
    return _json_pairs(text, character) or _text_pairs(text, character)


def parse_answer(text: str, character: str = "") -> str:
    """The character's reply from an answer to one question; '' when there is none."""
    text = _unfence(text).strip()
    if text[:1] in "[{":
        for value in _json_values(text):
            if reply := _reply_in(value, character):
                return reply
        if text[:1] == "{":
            return ""  # an object that does not decode: JSON gone wrong, not a line of dialogue
    label = re.compile(rf"^(?:{_labels(OUTPUT_LABELS, character)})\s*[:：]\s*", re.I)
    return _clean(label.sub("", text, count=1))


def _reply_in(value, character: str) -> str:
    """A reply in a JSON answer: a string, an object's output (or the character's key), or
    the first of a list."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, list):
        return _reply_in(value[0], character) if value else ""
    if isinstance(value, dict):
        keys = {str(k).strip().lower(): v for k, v in value.items()}
        return next((_clean(keys[k]) for k in (*OUTPUT_KEYS, character.lower()) if isinstance(keys.get(k), str)), "")
    return ""


def _unfence(text: str) -> str:
    fenced = FENCE.search(text or "")
    return fenced.group(1) if fenced else (text or "")


def _json_values(text: str) -> list:
    """The whole text as JSON, else every object that decodes where a ``{`` starts (which
    saves the complete objects of an array cut off by the token limit)."""
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    decoder, values, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at = text.find("{", at + 1)
            continue
        values.append(value)
        at = text.find("{", end)
    return values


def _json_pairs(text: str, character: str) -> list[Pair]:
    pairs: list[Pair] = []
    for value in _json_values(text):
        pairs += _pairs_in(value, character)
    return pairs


def _pairs_in(value, character: str) -> list[Pair]:
    if isinstance(value, list):
        return [pair for item in value for pair in _pairs_in(item, character)]
    if not isinstance(value, dict):
        return []
    keys = {str(k).strip().lower(): v for k, v in value.items()}
    said = next((keys[k] for k in INSTRUCTION_KEYS if isinstance(keys.get(k), str)), None)
    reply = next((keys[k] for k in (*OUTPUT_KEYS, character.lower()) if isinstance(keys.get(k), str)), None)
    if said is not None and reply is not None:
        pair = Pair(_clean(said), _clean(reply))
        return [pair] if pair.instruction and pair.output else []
    return [pair for v in value.values() if isinstance(v, (list, dict)) for pair in _pairs_in(v, character)]


def _text_pairs(text: str, character: str) -> list[Pair]:
    """Numbered items (the text before the first is a preamble), each labelled or two lines;
    unnumbered text only when labelled."""
    if not NUMBERED.search(text):
        return _labelled(text, character)
    pairs: list[Pair] = []
    for block in NUMBERED.split(text)[1:]:
        pairs += _labelled(block, character) or _two_lines(block, character)
    return pairs


def _labelled(block: str, character: str) -> list[Pair]:
    """``问：… 答：…`` / ``Instruction: … Output: …`` / ``…\\n甄嬛：…``, possibly several."""
    said, reply = _labels(INSTRUCTION_LABELS, ""), _labels(OUTPUT_LABELS, character)
    label = re.compile(rf"(?:^|(?<=\s))(?:(?P<said>{said})|(?P<reply>{reply}))\s*[:：]", re.I | re.M)
    marks = list(label.finditer(block))
    pairs, pending = [], None
    for mark, after in zip(marks, marks[1:] + [None]):
        part = _clean(block[mark.end(): after.start() if after else len(block)])
        if mark.group("said"):
            pending = part
        elif pending and part:
            pairs.append(Pair(pending, part))
            pending = None
    return pairs


def _two_lines(block: str, character: str) -> list[Pair]:
    lines = [_clean(line) for line in block.splitlines() if line.strip()]
    if len(lines) != 2 or not all(lines):
        return []
    speaker = re.compile(rf"^(?:{_labels(OUTPUT_LABELS, character)})\s*[:：]\s*", re.I)
    return [Pair(lines[0], _clean(speaker.sub("", lines[1])))]


def _labels(words: tuple[str, ...], character: str) -> str:
    names = [*words, character] if character else list(words)
    return "|".join(re.escape(w) for w in sorted(names, key=len, reverse=True))


def _clean(text: str) -> str:
    text = text.strip().rstrip(",，")
    while len(text) >= 2 and text[0] in QUOTES and text[-1] in QUOTES:
        text = text[1:-1].strip()
    return text


# Similarity: retrieval and duplicates


def comparison_key(text: str) -> str:
    """Case-folded, without spaces, punctuation or symbols: what two copies of a line share."""
    return "".join(c for c in text.casefold() if unicodedata.category(c)[0] not in "PSZC")


def ngrams(text: str, n: int = NGRAM) -> frozenset[str]:
    norm = comparison_key(text)
    if len(norm) <= n:
        return frozenset([norm]) if norm else frozenset()
    return frozenset(norm[i:i + n] for i in range(len(norm) - n + 1))


class Retriever:
    """The real pairs most like a question: BM25 over their instructions (``training.bm25``,
    shared with the canon index)."""

    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs
        self.index = BM25([p.instruction for p in pairs])

    def top(self, query: str, k: int, rng: random.Random) -> list[Pair]:
        """The k best matches; when fewer than k share anything with the query, random others."""
        ranked = self.index.top(query, k)
        if len(ranked) < k:
            chosen = set(ranked)
            rest = [i for i in range(len(self.pairs)) if i not in chosen]
            ranked += rng.sample(rest, min(k - len(ranked), len(rest)))
        return [self.pairs[i] for i in ranked]


class Seen:
    """Replies already in the dataset or generated, for exact and near-duplicate checks."""

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}
        self.grams: list[frozenset[str]] = []
        self.origin: list[str] = []
        self.postings: dict[str, list[int]] = {}

    def add(self, text: str, origin: str) -> None:
        self.exact.setdefault(comparison_key(text), origin)
        grams = ngrams(text)
        for gram in grams:
            self.postings.setdefault(gram, []).append(len(self.grams))
        self.grams.append(grams)
        self.origin.append(origin)

    def duplicate(self, text: str) -> str:
        """Why ``text`` is a copy ('' if it is not): exact or near, of a real or generated pair."""
        if (origin := self.exact.get(comparison_key(text))) is not None:
            return f"exact duplicate of a {origin} pair"
        grams = ngrams(text)
        shared = Counter(i for gram in grams for i in self.postings.get(gram, ()))
        for i, common in shared.most_common():
            if common / (len(grams) + len(self.grams[i]) - common) >= NEAR_DUPLICATE:
                return f"near duplicate of a {self.origin[i]} pair"
            if common < NEAR_DUPLICATE * len(grams):
                break  # fewer shared grams cannot reach the threshold
        return ""


# Files


def partial_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.partial{output.suffix or '.json'}")


def read_questions(path: Path) -> tuple[str, ...]:
    """One question a line (UTF-8, BOM allowed); blank lines and repeats are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: questions file not found — pass --questions FILE with one question a line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the questions ({exc}); save it as UTF-8, one question a line") from None
    questions = tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not questions:
        raise UserError(f"{path}: no questions in the file — write one everyday question a line")
    return questions


def _resumed_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable partial augmentation ({exc}); delete it to start over") from None
    good = isinstance(records, list) and all(
        isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
        and str(r.get("source", "")).startswith(SOURCE) for r in records)
    if not good:
        raise UserError(f"{path}: not a partial augmentation (generated pairs with source); delete it to start over")
    return records


# The run


@dataclass(frozen=True)
class _Task:
    prompt: str
    question: str = ""  # questions mode: the instruction of the pair it makes


class Augmenter:
    """One run: ``await Augmenter(job, endpoint).run()``. ``report`` is live while it runs and
    stays readable after an interruption."""

    def __init__(self, job: Job, endpoint: Endpoint, on_update: Callable[[Report], None] = lambda r: None):
        if job.output.resolve() == job.data.resolve():
            raise UserError(f"{job.output}: --output is the --data file; the real pairs are never overwritten — "
                            "name another output file")
        if job.mode == "questions" and not job.questions:
            raise UserError("questions mode needs questions: pass --questions FILE, one question a line")
        if job.mode == "fewshot" and not job.n:
            raise UserError("fewshot mode needs the number of pairs to generate: pass --n N")
        self.job = job
        self.endpoint = endpoint
        self.on_update = on_update
        self.report = Report(job.mode)
        self.source = f"{SOURCE}:{job.mode}"
        self.real_records, samples = read_dataset(job.data)
        # The examples: the script's pairs; identity pairs (``training.identity``) are templates,
        # not the character's voice, so they stay in the output but are never shown as examples.
        self.real = [Pair(s.instruction, s.output) for s, r in zip(samples, self.real_records)
                     if not (isinstance(r, dict) and r.get("source") == IDENTITY)]
        if not self.real:
            raise UserError(f"{job.data}: it holds only identity pairs — augmenting needs the script's pairs "
                            "as examples (rolebot prepare writes them)")
        self.report.real = len(samples)
        self.partial = partial_path(job.output)
        self.kept = _resumed_records(self.partial)
        self.seen = Seen()
        for sample in samples:
            self.seen.add(sample.output, "real")
        for record in self.kept:
            self.seen.add(record["output"], "generated")
        self._chat: ChatClient | None = None

    async def run(self) -> Report:
        """Ask, read, filter and keep until done; then write the output. Interrupted or failed,
        it writes what it kept to the partial file first."""
        report = self.report
        report.resumed = len(self.kept)
        self._chat = ChatClient(self.endpoint, report, "augment")
        try:
            tasks = self._tasks()
            self.on_update(report)
            workers = [self._worker(tasks) for _ in range(max(1, self.endpoint.concurrency))]
            await asyncio.gather(*workers)
            if self._chat.fatal:
                raise self._chat.fatal
            if report.requested and not report.received:
                reason = report.failures.most_common(1)[0][0] if report.failures else "no answer"
                raise UserError(f"{self.endpoint.base_url}: none of {report.requested} requests got an answer "
                                f"({reason}) — check that the server is running and --base-url points at its /v1")
        except BaseException:
            if self.kept:
                write_json_atomic(self.partial, self.kept)
                report.partial = self.partial
            raise
        finally:
            await self._chat.close()
        records = self.real_records + self.kept
        write_json_atomic(self.job.output, records)
        self.partial.unlink(missing_ok=True)
        report.written, report.output = len(records), self.job.output
        return report

    # Work

    def _tasks(self) -> Iterator[_Task]:
        """The prompts still to ask, lazily (each stops once --n pairs are kept); sets the goal
        that progress is shown against."""
        job, report = self.job, self.report
        if job.mode == "fewshot":
            report.goal, report.done = job.n, min(len(self.kept), job.n)
            remaining = max(0, job.n - len(self.kept))
            return self._fewshot_tasks(REQUEST_BUDGET * math.ceil(remaining / job.per_request))
        answered = {r["instruction"] for r in self.kept if r.get("source") == self.source}
        pending = [q for q in job.questions if q not in answered]
        report.goal, report.done = len(job.questions), len(job.questions) - len(pending)
        return self._question_tasks(pending)

    def _fewshot_tasks(self, budget: int) -> Iterator[_Task]:
        job, start = self.job, len(self.kept)
        for index in range(budget):
            if len(self.kept) >= job.n:
                return
            # Each request draws its own examples; a resumed run draws others than the first.
            rng = random.Random(f"{job.seed}/{start}/{index}")
            examples = rng.sample(self.real, min(job.examples, len(self.real)))
            yield _Task(fewshot_prompt(examples, job.character, job.per_request, job.persona))

    def _question_tasks(self, pending: list[str]) -> Iterator[_Task]:
        job = self.job
        retriever = Retriever(self.real)
        for question in pending:
            if job.n is not None and len(self.kept) >= job.n:
                return
            examples = retriever.top(question, job.examples, random.Random(f"{job.seed}/{question}"))
            yield _Task(question_prompt(question, examples, job.character, job.persona), question)

    async def _worker(self, tasks: Iterator[_Task]) -> None:
        # Workers share one iterator: each takes the next prompt when it is free.
        for task in tasks:
            if self._chat.fatal:
                return
            await self._attempt(task)

    async def _attempt(self, task: _Task) -> None:
        """Ask until an answer can be read, at most 1 + malformed_retries times."""
        report = self.report
        for _ in range(1 + self.job.malformed_retries):
            answer = await self._chat.ask(task.prompt)
            text, again = answer.text, answer.again
            pairs = self._read(text, task) if text is not None else []
            if pairs:
                report.parsed += 1
                self._keep(pairs)
                break
            if text is not None:
                report.malformed += 1
            self.on_update(report)
            if not again or self._chat.fatal:
                break
        else:
            report.gave_up += 1
        if task.question:
            report.done += 1
        self.on_update(report)

    def _read(self, text: str, task: _Task) -> list[Pair]:
        if task.question:
            reply = parse_answer(text, self.job.character)
            return [Pair(task.question, reply)] if reply else []
        return parse_pairs(text, self.job.character)

    def _keep(self, pairs: list[Pair]) -> None:
        job, report = self.job, self.report
        for pair in pairs:
            report.candidates += 1
            reason = self._reject(pair)
            if not reason and job.n is not None and len(self.kept) >= job.n:
                reason = BEYOND_N
            if reason:
                report.dropped[reason] += 1
                continue
            self.kept.append({"instruction": pair.instruction, "input": "", "output": pair.output,
                              "source": self.source})
            self.seen.add(pair.output, "generated")
            report.kept += 1
            if job.mode == "fewshot":
                report.done = min(len(self.kept), report.goal)

    def _reject(self, pair: Pair) -> str:
        size = len(pair.output)
        if size < self.job.min_chars:
            return f"output shorter than {self.job.min_chars} characters"
        if self.job.max_chars and size > self.job.max_chars:
            return f"output longer than {self.job.max_chars} characters"
        if breaks_character(pair.output):
            return "breaks character"
        return self.seen.duplicate(pair.output)
