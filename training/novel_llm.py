"""The LLM pass over a novel: who said the lines the rule pass left unknown.

The novel is cut into chunks of whole paragraphs (``chunk_chars`` long, each starting with the
last ``overlap_chars`` of the one before, within a chapter), and only chunks holding an unknown
line are sent. Each request asks for ``{"lines": [{speaker, line, addressee}]}`` under a JSON
schema (servers that refuse ``response_format`` are asked again without it). Every item of
every answer is checked before it counts:

- the answer must be JSON holding such objects, else it is asked again (``malformed_retries``)
  and then given up, counted;
- ``line`` must be a quoted line of the chunk (its words, punctuation aside), else dropped as
  invented;
- ``speaker`` must be named in the chunk (or be the narrator's 我), and not be the one the
  line calls out (林妹妹，… is not 林答应's), else dropped;
- a line the rule pass attributed keeps the rule's speaker (agreement is counted); a line an
  earlier chunk answered keeps that answer.

Answers are cached by the chunk's hash (model, prompt) in a JSON-lines file beside the output,
one line appended and flushed as each arrives (a chunk given up is cached with its last
answer): a run that is killed resumes where it stopped, and a re-run costs nothing. Transport failures are retried with back-off by the client
(``training.llm``); chunks still unanswered fail the run with nothing written as final.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from training.augment import FENCE, comparison_key
from training.errors import UserError
from training.llm import Answer, ChatClient, Endpoint
from training.novel import GENERIC, Novel

PROMPT_VERSION = 1
NOT_AN_ITEM = "an item without a speaker and a line"
INVENTED = "line is not in the text"
STRANGER = "speaker is not in the chunk"
UNNAMED = "speaker is not a name (a pronoun, unknown or empty)"
ANSWERED = "line already answered by an earlier chunk"
CALLED = "speaker is the one the line calls out (林妹妹，… is not 林答应's)"
KIN = ("妹妹", "姐姐", "哥哥", "弟弟", "姑娘", "小主", "公公", "大人", "太医")
NOT_NAMES = {"她", "他", "它", "某人", "有人", "未知", "不详", "无", "unknown", "none", "null", "narrator", "旁白",
             "n/a", "?", "？"}

SCHEMA = {
    "name": "dialogue",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"lines": {"type": "array", "items": {
            "type": "object",
            "properties": {"speaker": {"type": "string"}, "line": {"type": "string"},
                           "addressee": {"type": "string"}},
            "required": ["speaker", "line", "addressee"], "additionalProperties": False}}},
        "required": ["lines"], "additionalProperties": False,
    },
}


@dataclass(frozen=True)
class Settings:
    endpoint: Endpoint
    cache: Path
    chunk_chars: int = 1500
    overlap_chars: int = 300
    malformed_retries: int = 1


@dataclass(frozen=True)
class Chunk:
    chapter_label: str
    text: str
    quotes: tuple[int, ...]  # indices into the novel's quotes (spoken lines only)
    prompt: str
    key: str


@dataclass(frozen=True)
class Estimate:
    """What the pass will send before it sends anything; cached chunks cost nothing."""

    chunks: int
    cached: int
    unknown: int  # lines the chunks are sent for
    prompt_tokens: int
    completion_tokens: int

    def cost(self, price: tuple[float, float]) -> float:
        """USD at ``price`` = (input, output) USD per million tokens."""
        return (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6


@dataclass
class Report:
    """requested = received + failed + cancelled (the client's counters); received = parsed +
    malformed; chunks = cached + parsed + gave_up + unanswered."""

    chunks: int = 0
    cached: int = 0
    done: int = 0
    requested: int = 0
    received: int = 0
    failed: int = 0
    cancelled: int = 0
    attempts: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    parsed: int = 0
    malformed: int = 0
    gave_up: int = 0
    unanswered: int = 0  # chunks whose requests all failed
    schema_refused: bool = False
    items: int = 0  # = accepted + agreed + differed + sum(dropped)
    accepted: int = 0
    agreed: int = 0  # the rule pass had the line, with the same speaker
    differed: int = 0  # …with another speaker: the rule's is kept
    added: int = 0  # lines given a speaker (an accepted item can be two quotes joined)
    dropped: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def estimate_tokens(text: str) -> int:
    """About one token a CJK character and one per four other characters: on the high side
    for Chinese-capable tokenizers (Qwen2.5's counts 0.79 of it on the sample novel)."""
    cjk = sum(1 for c in text if "\u3000" <= c <= "\u9fff" or "\uff00" <= c <= "\uffef")
    return cjk + (len(text) - cjk + 3) // 4


# --- chunks and prompts ---------------------------------------------------------------

def chunks(novel: Novel, settings: Settings, names: tuple[str, ...]) -> list[Chunk]:
    """The chunks that hold at least one line the rule pass left unknown."""
    by_paragraph: dict[int, list[int]] = {}
    for index, q in enumerate(novel.quotes):
        if q.spoken:
            by_paragraph.setdefault(q.paragraph, []).append(index)
    out = []
    for group in _windows(novel, settings.chunk_chars, settings.overlap_chars):
        quotes = tuple(i for p in group for i in by_paragraph.get(p, []))
        if not any(not novel.quotes[i].speaker for i in quotes):
            continue
        label = novel.paragraphs[group[0]].chapter_label
        text = "\n".join([label] * bool(label) + [novel.paragraphs[p].text for p in group])
        # The character's names first, then the others the rule pass learned from the novel.
        cast = tuple(dict.fromkeys((*names, *novel.names)))
        prompt = extraction_prompt(text, cast, novel.narrator)
        key = hashlib.sha256(f"{PROMPT_VERSION}\n{settings.endpoint.model}\n{prompt}".encode()).hexdigest()
        out.append(Chunk(label, text, quotes, prompt, key))
    return out


def _windows(novel: Novel, size: int, overlap: int) -> list[list[int]]:
    """Paragraph indices per chunk: whole paragraphs, within one chapter."""
    windows: list[list[int]] = []
    current: list[int] = []
    for index, paragraph in enumerate(novel.paragraphs):
        if current and (novel.paragraphs[current[0]].chapter != paragraph.chapter
                        or sum(len(novel.paragraphs[p].text) + 1 for p in current) + len(paragraph.text) > size):
            windows.append(current)
            same_chapter = novel.paragraphs[current[0]].chapter == paragraph.chapter
            kept: list[int] = []
            for p in reversed(current if same_chapter else []):
                if sum(len(novel.paragraphs[k].text) for k in kept) >= overlap or len(kept) + 1 >= len(current):
                    break
                kept.insert(0, p)
            current = kept
        current.append(index)
    if current:
        windows.append(current)
    return windows


def extraction_prompt(text: str, names: tuple[str, ...], narrator: str) -> str:
    cast = "、".join(names) if names else "(none given)"
    first = (f'When the narrator says "我" (I), the speaker is {narrator}. ' if narrator else "")
    return (
        "Below is an excerpt of a novel. List every line of dialogue in it: the words inside "
        "quotation marks (“…”, 「…」 or \"…\"), in order, with who says each and to whom.\n"
        f"Known characters (and other names of them): {cast}. {first}"
        "Name the speaker as the excerpt names them; never answer with a pronoun. Copy each line "
        "exactly as it stands between its quotation marks. Leave out quoted words that nobody "
        "says aloud (names, titles, writing). Use \"\" for an addressee you cannot tell.\n"
        'Answer with only JSON: {"lines": [{"speaker": "...", "line": "...", "addressee": "..."}]}\n\n'
        f"Excerpt:\n{text}"
    )


def estimate(novel: Novel, settings: Settings, names: tuple[str, ...]) -> Estimate:
    todo = chunks(novel, settings, names)
    cached = read_cache(settings.cache)
    asked = [c for c in todo if c.key not in cached]
    prompt = sum(estimate_tokens(c.prompt) for c in asked)
    # The answer repeats each line with about 20 tokens of JSON, speaker and addressee.
    completion = sum(estimate_tokens(novel.quotes[i].text) + 20 for c in asked for i in c.quotes)
    unknown = len({i for c in todo for i in c.quotes if not novel.quotes[i].speaker})
    return Estimate(len(todo), len(todo) - len(asked), unknown, prompt, completion)


# --- the cache ------------------------------------------------------------------------

def read_cache(path: Path) -> dict[str, dict]:
    """Answers by chunk key; a line cut short by a kill is skipped (its chunk is asked again)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the LLM cache ({exc}) — delete it to ask every chunk again") from None
    found = {}
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("answer"), str):
            found[entry["key"]] = entry
    return found


def _append(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# --- reading and checking answers -----------------------------------------------------

def parse_items(text: str) -> list | None:
    """The list of items in an answer (a bare array or ``{"lines": [...]}``, fenced or not);
    None when it holds no such JSON. An answer cut off by the token limit keeps the items it
    completed."""
    fenced = FENCE.search(text)
    body = fenced[1] if fenced else text
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", body):
        try:
            value, _ = decoder.raw_decode(body, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if isinstance(value, list):
            return value
    return _complete_items(body, decoder)


def _complete_items(body: str, decoder: json.JSONDecoder) -> list | None:
    """The whole objects of an array that never closes: ``[{…}, {…}, {"speaker": "甄``."""
    start = body.find("[")
    if start < 0:
        return None
    items, at = [], start + 1
    while (at := body.find("{", at)) >= 0:
        try:
            item, end = decoder.raw_decode(body, at)
        except ValueError:
            break
        items.append(item)
        at = end
    return items or None


class Checker:
    """Matches answered items to the chunk's quotes and says why an item does not count."""

    def __init__(self, novel: Novel, names: tuple[str, ...]):
        self.novel = novel
        self.names = names
        self.keys = [comparison_key(q.text) for q in novel.quotes]

    def line_of(self, line: str, chunk: Chunk) -> tuple[int, ...]:
        """The quotes an answered line is: one, or consecutive ones of one paragraph that the
        model joined (“A，”皇后道，“B” → "A，B"); () when it is not in the text."""
        key = comparison_key(line)
        if not key:
            return ()
        for n, i in enumerate(chunk.quotes):
            if self.keys[i] == key:
                return (i,)
            joined, run = self.keys[i], [i]
            for j in chunk.quotes[n + 1:]:
                if self.novel.quotes[j].paragraph != self.novel.quotes[i].paragraph or len(joined) >= len(key):
                    break
                joined += self.keys[j]
                run.append(j)
                if joined == key:
                    return tuple(run)
        return ()

    def speaker_problem(self, speaker: str, chunk: Chunk) -> str:
        if not speaker or speaker.casefold() in NOT_NAMES or speaker in GENERIC and speaker not in self.names:
            return UNNAMED
        if speaker == "我":
            return "" if self.novel.narrator else UNNAMED
        if len(speaker) < 2 and speaker not in self.names:
            return UNNAMED  # one character of a name matches anywhere
        if speaker in chunk.text or speaker == self.novel.narrator and "我" in chunk.text:
            return ""
        if speaker in self.names and any(name in chunk.text for name in self.names):
            return ""  # the character, named in the chunk by another of her names
        return STRANGER

    def calls_out(self, line: str, speaker: str) -> bool:
        """The line opens by calling the speaker: by a name of theirs, or their surname and a
        kinship or rank word (林妹妹 for 林答应)."""
        vocative = re.match(r"([^，,！!？?。…]{1,5})[，,！!]", line)
        if not vocative:
            return False
        called = vocative[1]
        names = self.names if speaker in self.names else (speaker,)
        return called in names or any(called == name[0] + kin for name in names for kin in KIN)

    def speaker(self, speaker: str) -> str:
        return self.novel.narrator if speaker == "我" else speaker


# --- the run --------------------------------------------------------------------------

class Extractor:
    """``await Extractor(novel, settings, names).run()`` → the novel with the LLM's speakers."""

    def __init__(self, novel: Novel, settings: Settings, names: tuple[str, ...],
                 on_update: Callable[[Report], None] = lambda r: None):
        self.novel = novel
        self.settings = settings
        self.names = names
        self.on_update = on_update
        self.report = Report()
        self.chunks = chunks(novel, settings, names)
        self.checker = Checker(novel, names)
        self.found: dict[int, str] = {}  # quote index → speaker from the LLM
        self._schema = True

    async def run(self) -> Novel:
        report = self.report
        cached = read_cache(self.settings.cache)
        report.chunks = len(self.chunks)
        answers = {c.key: parse_items(cached[c.key]["answer"]) or [] for c in self.chunks if c.key in cached}
        report.cached = report.done = len(answers)
        pending = [c for c in self.chunks if c.key not in answers]
        self.on_update(report)
        client = ChatClient(self.settings.endpoint, report, "novel")
        try:
            queue = iter(pending)
            workers = [self._worker(queue, client, answers) for _ in range(max(1, self.settings.endpoint.concurrency))]
            await asyncio.gather(*workers)
        finally:
            await client.close()
        if client.fatal:
            raise client.fatal
        if report.unanswered:
            reason = report.failures.most_common(1)[0][0] if report.failures else "no answer"
            raise UserError(f"{self.settings.endpoint.base_url}: {report.unanswered} of {report.chunks} chunks got "
                            f"no answer ({reason}) — nothing was written; the {report.cached + report.parsed} "
                            f"answered are kept in {self.settings.cache}; check that the server is running and "
                            "--base-url points at its /v1, then run the same command again to resume")
        # In the novel's order, so that overlapping chunks resolve the same way whatever
        # order their answers arrived in.
        for chunk in self.chunks:
            self._take(chunk, answers.get(chunk.key, []))
        quotes = tuple(replace(q, speaker=self.found[i], how="llm") if i in self.found else q
                       for i, q in enumerate(self.novel.quotes))
        return replace(self.novel, quotes=quotes)

    async def _worker(self, queue, client: ChatClient, answers: dict[str, list]) -> None:
        for chunk in queue:
            if client.fatal:
                return
            items = await self._ask(chunk, client)
            if items is not None:
                answers[chunk.key] = items
            self.report.done += 1
            self.on_update(self.report)

    async def _ask(self, chunk: Chunk, client: ChatClient) -> list | None:
        """The chunk's items, cached as soon as they are read; None when none could be had."""
        report = self.report
        last = None  # the last answer that came back unreadable
        for _ in range(1 + self.settings.malformed_retries):
            extra = {"response_format": {"type": "json_schema", "json_schema": SCHEMA}} if self._schema else {}
            answer = await client.ask(chunk.prompt, **extra)
            if answer.text is None and answer.status in (400, 422) and self._schema:
                # A server without structured output (it says 400): the prompt says it all.
                self._schema = False
                report.schema_refused = True
                answer = await client.ask(chunk.prompt)
            report.prompt_tokens += answer.prompt_tokens
            report.completion_tokens += answer.completion_tokens
            if answer.text is None:
                if not answer.again or client.fatal:
                    report.unanswered += 1
                    return None
                continue
            items = parse_items(answer.text)
            if items is not None:
                report.parsed += 1
                self._cache(chunk, answer)
                return items
            report.malformed += 1
            last = answer
            self.on_update(report)
        report.gave_up += 1
        if last is not None:
            self._cache(chunk, last)  # given up for good: a re-run does not pay for it again
        return []

    def _cache(self, chunk: Chunk, answer: Answer) -> None:
        _append(self.settings.cache, {"key": chunk.key, "chapter": chunk.chapter_label,
                                      "model": self.settings.endpoint.model, "answer": answer.text,
                                      "prompt_tokens": answer.prompt_tokens,
                                      "completion_tokens": answer.completion_tokens})

    def _take(self, chunk: Chunk, items: list) -> None:
        report = self.report
        for item in items:
            report.items += 1
            verdict, quotes, speaker = self._check(item, chunk)
            if verdict == "agreed":
                report.agreed += 1
            elif verdict == "differed":
                report.differed += 1
            elif verdict:
                report.dropped[verdict] += 1
            else:
                for i in quotes:
                    self.found[i] = speaker
                report.accepted += 1
                report.added += len(quotes)

    def _check(self, item, chunk: Chunk) -> tuple[str, tuple[int, ...], str]:
        """("", quotes, speaker) for an item that counts; else why not."""
        if not isinstance(item, dict) or not isinstance(item.get("speaker"), str) or not isinstance(item.get("line"), str):
            return NOT_AN_ITEM, (), ""
        quotes = self.checker.line_of(item["line"], chunk)
        if not quotes:
            return INVENTED, (), ""
        speaker = item["speaker"].strip()
        if problem := self.checker.speaker_problem(speaker, chunk):
            return problem, (), ""
        speaker = self.checker.speaker(speaker)
        if self.checker.calls_out(self.novel.quotes[quotes[0]].text, speaker):
            return CALLED, (), ""
        rule = {self.novel.quotes[i].speaker for i in quotes} - {""}
        if rule:
            return ("agreed" if rule == {speaker} else "differed"), (), ""
        if any(i in self.found for i in quotes):
            return ANSWERED, (), ""
        return "", quotes, speaker
