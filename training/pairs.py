"""Training pairs for one character, from screenplay turns to the tutorial's dataset files.

A pair is a line of someone else and the character's answer to it in the same scene:
the tutorial's ``instruction`` and ``output``. Optional scene history goes into ``input``
(Alpaca) or becomes earlier turns (ShareGPT, messages JSONL). ``prepare`` runs the whole
step and returns a ``Report`` of what was read, kept and skipped. Beside the pairs it writes
the canon index (``training.canon``): the training episodes' exchanges, for retrieval.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.canon import Record, canon_path, index_text
from training.errors import UserError
from training.hygiene import script_language
from training.identity import identity_count, identity_pairs
from training.novel import Novel, detect, read_novel, rule_counts, turns_of
from training.screenplay import Turn, parse_text, read_script_text

FORMATS = ("alpaca", "sharegpt", "jsonl")

FIRST_IN_SCENE = "first line of a scene"
SAME_SPEAKER = "previous line is the same speaker"
NO_SPEAKER_BEFORE = "previous line has no speaker"
SILENT = "line is only stage directions"
SILENT_BEFORE = "previous line is only stage directions"
JOINT = "spoken together with others under a group name (甲乙：…)"
DUPLICATE = "exact duplicate of an earlier pair"


@dataclass(frozen=True)
class Character:
    """The character the dataset teaches; the script may call them by other names."""

    name: str
    aliases: tuple[str, ...] = ()

    def speaks(self, speaker: str) -> bool:
        return speaker == self.name or speaker in self.aliases

    def among(self, speaker: str) -> bool:
        """A group speaker that includes the character, like ``甄嬛眉庄``."""
        return not self.speaks(speaker) and any(
            name in speaker for name in (self.name, *self.aliases))


@dataclass(frozen=True)
class Pair:
    """Someone's line (``prompt``), the character's answer, and earlier turns of the scene."""

    prompt: Turn
    reply: Turn
    history: tuple[Turn, ...] = ()

    @property
    def episode(self) -> tuple[str, int]:
        return (self.reply.file, self.reply.episode)


def find_pairs(turns: list[Turn], character: Character,
               history: int = 0) -> tuple[list[Pair], Counter[str]]:
    """Every line of the character that answers someone else's line in the same scene."""
    pairs: list[Pair] = []
    skipped: Counter[str] = Counter()
    spoken: list[Turn] = []  # this scene's dialogue so far
    for turn in turns:
        if spoken and (spoken[-1].file, spoken[-1].scene) != (turn.file, turn.scene):
            spoken = []
        if turn.kind not in ("dialogue", "unattributed"):
            continue
        if character.speaks(turn.speaker):
            reason = _why_not_a_reply(turn, spoken, character)
            if reason:
                skipped[reason] += 1
            else:
                earlier = [t for t in spoken[:-1] if t.kind == "dialogue" and t.text]
                pairs.append(Pair(spoken[-1], turn, tuple(earlier[-history:] if history else ())))
        elif character.among(turn.speaker):
            skipped[JOINT] += 1
        spoken.append(turn)
    return pairs, skipped


def _why_not_a_reply(turn: Turn, spoken: list[Turn], character: Character) -> str:
    if not turn.text:
        return SILENT
    if not spoken:
        return FIRST_IN_SCENE
    previous = spoken[-1]
    if previous.kind == "unattributed":
        # Someone spoke, but who? It may be the character herself: no pair beats a wrong one.
        return NO_SPEAKER_BEFORE
    if character.speaks(previous.speaker):
        return SAME_SPEAKER
    if not previous.text:
        return SILENT_BEFORE
    return ""


def filter_pairs(pairs: list[Pair], character: Character, min_chars: int,
                 max_chars: int) -> tuple[list[Pair], Counter[str]]:
    """Drop exact duplicates (the first one stays) and replies outside the length bounds."""
    kept: list[Pair] = []
    skipped: Counter[str] = Counter()
    seen: set[tuple] = set()
    for pair in pairs:
        size = len(pair.reply.text)
        key = _record_key(pair, character)
        if size < min_chars:
            skipped[f"reply shorter than {min_chars} characters"] += 1
        elif max_chars and size > max_chars:
            skipped[f"reply longer than {max_chars} characters"] += 1
        elif key in seen:
            skipped[DUPLICATE] += 1
        else:
            seen.add(key)
            kept.append(pair)
    return kept, skipped


def _record_key(pair: Pair, character: Character) -> tuple:
    history = tuple((_who(t, character), t.text) for t in pair.history)
    return (history, pair.prompt.text, pair.reply.text)


def split_holdout(pairs: list[Pair], turns: list[Turn],
                  val_episodes: int) -> tuple[list[Pair], list[Pair], list[tuple[str, int]]]:
    """The last ``val_episodes`` episodes (in story order) become validation, unshuffled."""
    if not val_episodes:
        return pairs, [], []
    episodes = story_episodes(turns)
    if val_episodes >= len(episodes):
        raise UserError(f"--val-episodes {val_episodes}: the scripts have only {len(episodes)} "
                        "episode(s) — hold out fewer so some are left for training")
    held = episodes[-val_episodes:]
    train = [p for p in pairs if p.episode not in held]
    val = [p for p in pairs if p.episode in held]
    return train, val, held


def story_episodes(turns: list[Turn]) -> list[tuple[str, int]]:
    """(file, episode) in story order; a title page before 第一集 is not an episode."""
    return list(dict.fromkeys((t.file, t.episode) for t in turns if t.kind == "dialogue"))


# --- dataset formats ------------------------------------------------------------------

def _who(turn: Turn, character: Character) -> str:
    return character.name if character.speaks(turn.speaker) else turn.speaker


def alpaca_record(pair: Pair, character: Character) -> dict[str, str]:
    context = "\n".join(f"{_who(t, character)}：{t.text}" for t in pair.history)
    return {"instruction": pair.prompt.text, "input": context, "output": pair.reply.text}


def _exchange(pair: Pair, character: Character) -> list[tuple[str, str]]:
    """(role, text) messages; the character is the assistant, everyone else the user."""
    messages: list[tuple[str, str]] = []
    for turn in (*pair.history, pair.prompt, pair.reply):
        role = "assistant" if character.speaks(turn.speaker) else "user"
        if messages and messages[-1][0] == role:
            messages[-1] = (role, f"{messages[-1][1]}\n{turn.text}")
        else:
            messages.append((role, turn.text))
    # Chat templates expect the user to open the conversation.
    while messages[0][0] == "assistant":
        messages.pop(0)
    return messages


def sharegpt_record(pair: Pair, character: Character) -> dict[str, list[dict[str, str]]]:
    return _sharegpt(_exchange(pair, character))


def messages_record(pair: Pair, character: Character) -> dict[str, list[dict[str, str]]]:
    return _messages(_exchange(pair, character))


def _sharegpt(messages: list[tuple[str, str]]) -> dict[str, list[dict[str, str]]]:
    speaker = {"user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": speaker[role], "value": text} for role, text in messages]}


def _messages(messages: list[tuple[str, str]]) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": role, "content": text} for role, text in messages]}


_RECORDS: dict[str, Callable[[Pair, Character], dict]] = {
    "alpaca": alpaca_record, "sharegpt": sharegpt_record, "jsonl": messages_record}


def render(pairs: list[Pair], character: Character, fmt: str,
           novels: frozenset[str] = frozenset(), extra: list[dict] = ()) -> str:
    """The file's text: a JSON array (alpaca, sharegpt) or one JSON object a line (jsonl).
    A pair from a novel (a file in ``novels``) says so, with its chapter. ``extra``: alpaca
    records (the identity pairs) that follow the pairs, in the file's format."""
    records = [_RECORDS[fmt](pair, character) | _origin(pair, novels) for pair in pairs]
    records += [one_turn_record(record, fmt) for record in extra]
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return json.dumps(records, ensure_ascii=False, indent=2) + "\n"


def one_turn_record(record: dict, fmt: str) -> dict:
    """An alpaca record with an empty input (an identity pair) in ``fmt``: alpaca keeps its
    ``source``; ShareGPT and messages JSONL get the question and answer as one exchange."""
    if fmt == "alpaca":
        return record
    exchange = [("user", record["instruction"]), ("assistant", record["output"])]
    return _sharegpt(exchange) if fmt == "sharegpt" else _messages(exchange)


def _origin(pair: Pair, novels: frozenset[str]) -> dict[str, str]:
    if pair.reply.file not in novels:
        return {}
    return {"source": "novel", "chapter": pair.reply.scene_label}


def write_atomically(files: dict[Path, str]) -> None:
    """Write every file or none: all go to temp files first, then each replaces its target."""
    temps: dict[Path, Path] = {}
    path = next(iter(files))
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            # A plain open (not mkstemp) so the file gets the usual permissions, not 0600.
            temps[path] = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temps[path].write_text(text, encoding="utf-8", newline="\n")
        for path, temp in temps.items():
            os.replace(temp, path)
    except OSError as exc:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({exc.strerror or exc}) — "
                        "choose a writable --output path") from None


def validation_path(output: Path) -> Path:
    """``data/huanhuan.json`` → ``data/huanhuan.val.json``."""
    return output.with_name(f"{output.stem}.val{output.suffix}")


# --- the whole step -------------------------------------------------------------------

SOURCES = ("auto", "script", "novel")


@dataclass(frozen=True)
class PrepareRequest:
    scripts: tuple[Path, ...]
    character: Character
    output: Path
    format: str = "alpaca"
    history: int = 0
    val_episodes: int = 0
    min_chars: int = 2
    max_chars: int = 400
    source: str = "auto"  # how to read the files: detected per file, or all as one kind
    narrator: str = ""  # who 我 is in a first-person novel ("" : the character)
    persona: str = ""  # the character's persona (config.toml), for the identity pairs' facts
    # identity pairs added to the training file (``training.identity``); None: as many as
    # ``identity_count`` gives the script's pairs; 0: none
    identity: int | None = None
    # The LLM pass over a novel the rule pass has read (``training.novel_llm``), if asked for.
    extract: Callable[[Novel], Novel] | None = dataclasses.field(default=None, compare=False)


@dataclass(frozen=True)
class Sources:
    """The files read as turns; which were novels, and what reading them found."""

    turns: list[Turn]
    novels: frozenset[str]
    notes: tuple[str, ...]
    unknown: int  # quoted lines of the novels nobody is named for


def read_sources(request: PrepareRequest) -> Sources:
    """Each file as a screenplay or a novel (``request.source``; ``auto`` decides per file)."""
    turns: list[Turn] = []
    novels, notes, unknown = set(), [], 0
    for path in request.scripts:
        text = read_script_text(path)
        shape = detect(text)
        kind = shape.kind if request.source == "auto" else request.source
        notes.append(shape.describe(str(path)) if request.source == "auto" else
                     f"{path}: read as {'a novel' if kind == 'novel' else 'a screenplay'} (--from {kind})")
        if kind == "script":
            turns += parse_text(text, str(path))
            continue
        novel = read_novel_for(text, str(path), request)
        novels.add(str(path))
        notes += novel_notes(novel, request)
        if request.extract:
            novel = request.extract(novel)
            after = rule_counts(novel)
            notes.append(f"  after the LLM pass: {after.attributed} of {after.lines} attributed, "
                         f"{after.unknown} unknown")
        unknown += rule_counts(novel).unknown
        turns += turns_of(novel)
    return Sources(turns, frozenset(novels), tuple(notes), unknown)


def narrator_of(request: PrepareRequest) -> str:
    return request.narrator or request.character.name


def read_novel_for(text: str, file: str, request: PrepareRequest) -> Novel:
    names = (request.character.name, *request.character.aliases)
    return read_novel(text, file, names, narrator_of(request))


def novel_notes(novel: Novel, request: PrepareRequest) -> list[str]:
    """The rule pass in two lines: how many lines it attributed, and how."""
    counts = rule_counts(novel)
    how = ", ".join(f"{HOW.get(h, h)} {n}" for h, n in counts.by_how)
    notes = [f"  {novel.chapters()} chapters · rule pass: {counts.attributed} of {counts.lines} quoted lines "
             f"attributed, {counts.unknown} unknown" + (f" ({how})" if how else "")]
    if any(h == "narrator" for h, _ in counts.by_how):
        chosen = "--narrator" if request.narrator else "the character; --narrator NAME to change"
        notes.append(f"  first-person narration: 我 is {novel.narrator} ({chosen})")
    return notes


HOW = {"before": "named before", "after": "named after", "beat": "action beat", "pronoun": "她/他",
       "narrator": "我", "turns": "turn-taking", "addressed": "answers who was addressed",
       "continued": "a speech going on", "llm": "LLM"}


@dataclass(frozen=True)
class Report:
    """What ``prepare`` read, wrote and skipped; counts are turns (asides count on their own)."""

    character: Character
    files: tuple[str, ...]
    episodes: int
    scenes: int
    dialogue_turns: int
    character_turns: int
    no_speaker: tuple[str, ...]  # "file:line" of spoken lines nobody is named for
    written: tuple[tuple[str, int], ...]  # (path, pairs): training file, then validation
    val_episodes: tuple[int, ...]
    skipped: tuple[tuple[str, int], ...]  # (reason, count), most frequent first
    interlocutors: tuple[tuple[str, int], ...]  # whose lines the character answers
    canon: tuple[str, int] = ("", 0)  # (path, exchanges) of the canon index
    sources: tuple[str, ...] = ()  # how each file was read (screenplay or novel) and what it found
    unit: str = "episodes"  # "chapters" when every file is a novel
    identity: int = 0  # identity pairs among the training file's (its last records)

    def render(self, fmt: str) -> str:
        """A plain-text report; counts come first so that CJK names need no column padding."""
        name = self.character.name
        aliases = f" ({', '.join(self.character.aliases)})" if self.character.aliases else ""
        lines = [f"Read {len(self.files)} file(s): {', '.join(self.files)}", *self.sources,
                 f"  {self.episodes} {self.unit} · {self.scenes} scenes · "
                 f"{self.dialogue_turns} dialogue turns · {self.character_turns} by "
                 f"{name}{aliases}"]
        if self.no_speaker:
            shown = ", ".join(self.no_speaker[:5]) + (" …" if len(self.no_speaker) > 5 else "")
            lines.append(f"  {len(self.no_speaker)} spoken line(s) name no speaker and were "
                         f"not used: {shown}")
        total = sum(n for _, n in self.written)
        lines.append(f"Wrote {total} pairs ({fmt}):")
        for index, (path, n) in enumerate(self.written):
            held = ", ".join(map(str, self.val_episodes))
            note = f"  validation: {self.unit[:-1]}(s) {held}" if index else ""
            lines.append(f"  {n:6}  {path}{note}")
        if self.identity:
            source = "source: identity; " if fmt == "alpaca" else ""
            lines.append(f"Added {self.identity} identity pairs to the training file, its last records "
                         f"({source}--identity 0 for none)")
        if self.canon[0]:
            lines.append(f"Canon index: {self.canon[1]} exchanges of the training {self.unit}")
            lines.append(f"  {self.canon[1]:6}  {self.canon[0]}")
        lines.append("Skipped:" if self.skipped else "Skipped: nothing")
        lines += [f"  {n:6}  {reason}" for reason, n in self.skipped]
        lines.append(f"Top interlocutors (whose lines {name} answers):")
        lines += [f"  {n:6}  {speaker}" for speaker, n in self.interlocutors]
        return "\n".join(lines)


def prepare(request: PrepareRequest) -> Report:
    """Scripts → pairs → (train, validation) files, written all or nothing."""
    sources = read_sources(request)
    turns = sources.turns
    files = ", ".join(str(p) for p in request.scripts)
    _check_speakers(turns, request.character, files, sources)
    found, skipped = find_pairs(turns, request.character, request.history)
    # Duplicates go before the split, so no validation pair repeats a training one.
    kept, dropped = filter_pairs(found, request.character, request.min_chars, request.max_chars)
    skipped += dropped
    if not kept:
        reasons = "; ".join(f"{r}: {n}" for r, n in skipped.most_common(3))
        raise UserError(f"{files}: none of {request.character.name}'s lines made a pair "
                        f"({reasons}) — lower --min-chars, raise --max-chars or add an --alias")
    train, val, held = split_holdout(kept, turns, request.val_episodes)
    if not train or (request.val_episodes and not val):
        empty = "training" if not train else "validation"
        raise UserError(f"{files}: --val-episodes {request.val_episodes} leaves the {empty} "
                        "set without pairs — choose another number of episodes")
    parts = {request.output: train}
    if request.val_episodes:
        parts[validation_path(request.output)] = val
    # Identity pairs go into the training file only: not validation, not the canon index.
    identity = identity_records(request, turns, len(train))
    files_text = {path: render(part, request.character, request.format, sources.novels,
                               identity if path == request.output else [])
                  for path, part in parts.items()}
    index = canon_path(request.output)
    files_text[index] = index_text([canon_record(pair) for pair in train])
    write_atomically(files_text)
    written = tuple((str(path), len(part) + (len(identity) if path == request.output else 0))
                    for path, part in parts.items())
    report = _report(request, turns, skipped, kept, written, tuple(e for _, e in held))
    unit = "chapters" if len(sources.novels) == len(request.scripts) else "episodes"
    return dataclasses.replace(report, canon=(str(index), len(train)), sources=sources.notes, unit=unit,
                               identity=len(identity))


def identity_records(request: PrepareRequest, turns: list[Turn], pairs: int) -> list[dict]:
    """Self-cognition pairs for the character (``identity_count`` of them beside ``pairs``
    training pairs), in the script's language, with the self-reference of the character's own
    lines and the facts of ``request.persona``."""
    count = identity_count(request.identity, pairs)
    if not count:
        return []
    own = [t.text for t in turns if t.kind == "dialogue" and t.text and request.character.speaks(t.speaker)]
    return identity_pairs(request.character.name, request.character.aliases, request.persona, own,
                          script_language(own), count)


def canon_record(pair: Pair) -> Record:
    """A pair as an exchange of the canon index: who said what, the answer, and where."""
    reply = pair.reply
    return Record(file=reply.file, episode=reply.episode, scene=reply.scene, scene_label=reply.scene_label,
                  speaker=pair.prompt.speaker, said=pair.prompt.text, replier=reply.speaker, reply=reply.text)


def _check_speakers(turns: list[Turn], character: Character, files: str, sources: Sources) -> None:
    speakers = Counter(t.speaker for t in turns if t.kind == "dialogue")
    llm = (f"; {sources.unknown} quoted lines have no speaker yet: --llm asks a model who says them"
           if sources.unknown else "")
    if not speakers:
        if sources.novels:
            raise UserError(f"{files}: no quoted line could be given a speaker{llm or ' — the novel has no quoted dialogue (“…” or 「…」)'}")
        raise UserError(f"{files}: no dialogue lines found — a script needs lines like "
                        "「角色：台词」 or 「角色（动作）：台词」 (a novel with quoted dialogue: --from novel)")
    if not any(character.speaks(name) for name in speakers):
        close = _closest_speakers(character.name, speakers)
        found = (f"speakers with close names: {'、'.join(close)}" if close else
                 f"the main speakers are {'、'.join(s for s, _ in speakers.most_common(5))}")
        raise UserError(f"{files}: no line is spoken by {character.name} — {found}; "
                        f"pass one as --character or --alias{llm}")


def _closest_speakers(name: str, speakers: Counter[str]) -> list[str]:
    """Most alike first, then most lines: for 甄环, 甄嬛 comes before 甄母."""
    def likeness(speaker: str) -> float:
        contained = name in speaker or speaker in name
        return max(difflib.SequenceMatcher(None, name, speaker).ratio(), 0.5 * contained)

    ranked = sorted(speakers, key=lambda s: (-likeness(s), -speakers[s]))
    return [s for s in ranked if likeness(s) >= 0.4][:5]


def _report(request: PrepareRequest, turns: list[Turn], skipped: Counter[str],
            kept: list[Pair], written: tuple[tuple[str, int], ...],
            val_episodes: tuple[int, ...]) -> Report:
    dialogue = [t for t in turns if t.kind == "dialogue"]
    return Report(
        character=request.character,
        files=tuple(str(p) for p in request.scripts),
        episodes=len(story_episodes(turns)),
        scenes=len({(t.file, t.scene) for t in turns}),
        dialogue_turns=len(dialogue),
        character_turns=sum(request.character.speaks(t.speaker) for t in dialogue),
        no_speaker=tuple(f"{t.file}:{t.line}" for t in turns if t.kind == "unattributed"),
        written=written,
        val_episodes=val_episodes,
        skipped=tuple(skipped.most_common()),
        interlocutors=tuple(Counter(p.prompt.speaker for p in kept).most_common(8)),
    )
