"""The canon index: the character's exchanges in the screenplay, searched for the ones most
like the line at hand, so that the prompt holds the original scenes (ChatHaruhi's remedy for a
fine-tuned character that forgets who it plays).

``rolebot prepare`` writes the index next to the pairs (``huanhuan.json`` →
``huanhuan.canon.jsonl``): one JSON object a line with the previous line (``speaker``, ``said``),
the character's line (``replier`` as the script names them, ``reply``), and where it stands
(``file``, ``episode``, ``scene``, ``scene_label``). Only training episodes go in: held-out
episodes stay unseen by the adapter and the index alike.

Training and serving retrieve the same way (BM25 over the exchange, ``training.bm25``); a
training sample never gets an exchange of its own scene, so the model learns to use canon
rather than copy its answer from it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from training.bm25 import BM25
from training.errors import UserError
from training.prompts import Canon, PromptStyle, Sample, canon_text

SUFFIX = ".canon.jsonl"
FIX = ("run `rolebot prepare` again (it writes the index next to the pairs), or turn canon off: "
       "[canon] k = 0 (or [canon] train = false for training only)")


@dataclass(frozen=True)
class Record:
    """One exchange of the screenplay: someone's line and the character's answer to it."""

    file: str
    episode: int
    scene: int
    scene_label: str
    speaker: str
    said: str
    replier: str
    reply: str

    @property
    def canon(self) -> Canon:
        return Canon(self.speaker, self.said, self.reply)


def canon_path(pairs: Path) -> Path:
    """``data/huanhuan.json`` → ``data/huanhuan.canon.jsonl``."""
    return Path(pairs).with_name(Path(pairs).stem + SUFFIX)


def index_text(records: list[Record]) -> str:
    return "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in records)


class CanonIndex:
    """The exchanges of an index file and their BM25 index."""

    def __init__(self, records: list[Record], path: Path | None = None):
        self.records = records
        self.path = path
        self.bm25 = BM25([f"{r.said}\n{r.reply}" for r in records])
        scenes = {key: n for n, key in enumerate(dict.fromkeys((r.file, r.scene) for r in records))}
        self._scene = np.array([scenes[(r.file, r.scene)] for r in records], dtype=np.int64)
        self._scenes_of: dict[tuple[str, str], set[int]] = {}
        for r, scene in zip(records, self._scene):
            self._scenes_of.setdefault((r.said, r.reply), set()).add(int(scene))

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def load(cls, path: Path) -> CanonIndex:
        """The index at ``path``; a missing or unreadable file is a UserError that says what to do."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"{path}: canon index not found — {FIX}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read the canon index ({exc}) — {FIX}") from None
        records = [_record(line, path, number) for number, line in enumerate(lines, 1) if line.strip()]
        if not records:
            raise UserError(f"{path}: the canon index holds no exchanges — {FIX}")
        return cls(records, path.resolve())

    def search(self, query: str, k: int, *, exclude_scenes: set[int] | frozenset[int] = frozenset()) -> list[Record]:
        """The ``k`` exchanges most like ``query``, best first, none from ``exclude_scenes``."""
        excluded = np.isin(self._scene, list(exclude_scenes)) if exclude_scenes else None
        return [self.records[i] for i in self.bm25.top(query, k, excluded)]

    def scenes_of(self, sample: Sample) -> set[int]:
        """The scenes a training sample comes from: where its exact exchange stands (none for a
        line that is not from the script, such as a rated reply)."""
        return self._scenes_of.get((sample.instruction, sample.output), set())

    def speakers(self, character_names: tuple[str, ...]) -> tuple[str, ...]:
        """Who else speaks to the character, most lines first: for the role-confusion check."""
        counts = Counter(r.speaker for r in self.records if r.speaker not in character_names)
        return tuple(name for name, _ in counts.most_common())


def _record(line: str, path: Path, number: int) -> Record:
    try:
        raw = json.loads(line)
        record = Record(**raw)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}:{number}: not a canon exchange ({exc}) — {FIX}") from None
    if not isinstance(record.said, str) or not isinstance(record.reply, str) or not isinstance(record.scene, int):
        raise UserError(f"{path}:{number}: not a canon exchange (said, reply and scene have the wrong types) — {FIX}")
    return record


def query_of(sample: Sample) -> str:
    """What retrieval looks for: the line said to the character, with the scene so far."""
    return "\n".join(part for part in (sample.input, sample.instruction) if part)


def fit(records: list[Record], character: str, max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[Canon, ...]:
    """The exchanges, best first, that fit ``max_tokens`` (0: no limit) as the prompt renders them."""
    kept: list[Canon] = []
    for record in records:
        trial = (*kept, record.canon)
        if max_tokens and count_tokens(canon_text(trial, character)) > max_tokens:
            continue
        kept.append(record.canon)
    return tuple(kept)


def with_canon(samples: list[Sample], index: CanonIndex, style: PromptStyle,
               count_tokens: Callable[[str], int], *, exclude_own_scene: bool = True) -> list[Sample]:
    """Each sample with the ``style.canon_k`` exchanges retrieved for it, never from its own
    scene. A sample whose exact prompt is known (a logged reply) keeps it as it is."""
    if not style.canon_k:
        return samples
    out = []
    for sample in samples:
        if sample.prompt:
            out.append(sample)
            continue
        exclude = index.scenes_of(sample) if exclude_own_scene else set()
        found = index.search(query_of(sample), style.canon_k, exclude_scenes=exclude)
        out.append(replace(sample, canon=fit(found, style.character, style.canon_max_tokens, count_tokens)))
    return out


def training_index(path: Path | None, style: PromptStyle) -> CanonIndex | None:
    """The index a training run retrieves from, loaded before the model so that a broken one
    fails at once. None when the style holds no canon, or when the pairs have no index beside
    them (hand-written pairs, or pairs prepared before there were indexes): then the run trains
    without canon and says so in one line, and the caller records ``canon_k = 0`` so that the
    version is served as it was trained."""
    if not style.canon_k:
        return None
    if path is None or not Path(path).exists():
        where = f"{path}: no canon index beside the pairs" if path else "these pairs have no canon index"
        print(f"note: {where} — training without canon, and this version will be served without it; "
              "`rolebot prepare` writes the index next to the pairs", file=sys.stderr, flush=True)
        return None
    return CanonIndex.load(path)


def for_training(index: CanonIndex | None, style: PromptStyle, tokenizer, samples: list[Sample],
                 val: list[Sample]) -> tuple[list[Sample], list[Sample], dict | None]:
    """Training and held-out samples with their canon, and what meta.json records of it;
    unchanged (and no record) without an index."""
    if index is None:
        return samples, val, None

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    samples, val = with_canon(samples, index, style, count), with_canon(val, index, style, count)
    record = {"index": str(index.path), "exchanges": len(index), "k": style.canon_k,
              "max_tokens": style.canon_max_tokens, "samples_with_canon": sum(bool(s.canon) for s in samples)}
    return samples, val, record


def served_canon(meta: dict | None, k: int, max_tokens: int) -> tuple[int, int]:
    """(k, max_tokens) for serving an adapter: what it was trained with, when its meta.json
    records it, so the bot asks in the format the model learned; else the config's. ``k = 0``
    in the config turns canon off whatever the adapter learned."""
    if k == 0:
        return 0, max_tokens
    prompt = (meta or {}).get("config", {}).get("prompt", {})
    if "canon_k" in prompt:
        return int(prompt["canon_k"]), int(prompt.get("canon_max_tokens") or max_tokens)
    return k, max_tokens
