"""Reading a pairs file (the tutorial's Alpaca JSON) into samples, with errors that say where."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from training.errors import UserError
from training.prompts import Exchange, Sample

REQUIRED = ("instruction", "output")
KNOWN = {"instruction", "input", "output", "source", "prompt", "chapter"}
# Conversation records (rolebot prepare --format sharegpt|jsonl): role names per format.
TURNS = {"messages": ("role", "content", "user", "assistant"), "conversations": ("from", "value", "human", "gpt")}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_samples(path: Path, character: str = "") -> list[Sample]:
    """Alpaca records from a JSON array or a JSON-lines file.

    Every record needs a non-empty ``instruction`` and ``output``; ``input`` is optional.
    Conversation records (``messages`` or ShareGPT ``conversations``) are read too: the last
    assistant turn is the output, the user turn before it the instruction, earlier turns the
    history (assistant turns spoken by ``character``).
    """
    return read_dataset(path, character)[1]


def read_dataset(path: Path, character: str = "") -> tuple[list, list[Sample]]:
    """The records exactly as the file holds them, and their samples (checked as in
    ``load_samples``): for a tool that writes the records on unchanged."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: dataset file not found — run `rolebot prepare` or check --data") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the dataset ({exc})") from None
    records = _parse(text, path)
    if not records:
        raise UserError(f"{path}: the dataset is empty — it needs at least one instruction/output pair")
    return [record for _, record in records], [_sample(record, path, where, character) for where, record in records]


def _parse(text: str, path: Path) -> list[tuple[str, object]]:
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return [(f"record {i + 1}", item) for i, item in enumerate(data)]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); expected a JSON array "
                                "or one JSON object per line") from None
    return records


def _sample(record, path: Path, where: str, character: str) -> Sample:
    if not isinstance(record, dict):
        raise UserError(f"{path}: {where}: expected an object with instruction/input/output, got {type(record).__name__}")
    for key in TURNS:
        if key in record:
            return _conversation(record[key], TURNS[key], path, where, character)
    unknown = set(record) - KNOWN
    missing = [key for key in REQUIRED if not isinstance(record.get(key), str) or not record[key].strip()]
    if missing or unknown:
        problem = f"missing or empty {', '.join(missing)}" if missing else f"unknown keys {', '.join(sorted(unknown))}"
        raise UserError(f"{path}: {where}: {problem} — each record needs instruction, output (and optional input)")
    context = record.get("input") or ""
    if not isinstance(context, str):
        raise UserError(f"{path}: {where}: input must be a string")
    prompt = record.get("prompt") or ""
    if not isinstance(prompt, str):
        raise UserError(f"{path}: {where}: prompt must be a string (the exact prompt text)")
    return Sample(instruction=record["instruction"].strip(), output=record["output"].strip(),
                  input=context.strip(), prompt=prompt)


def _conversation(turns, names: tuple[str, str, str, str], path: Path, where: str, character: str) -> Sample:
    role_key, text_key, user, assistant = names
    ok = isinstance(turns, list) and all(
        isinstance(t, dict) and t.get(role_key) in (user, assistant, "system") and isinstance(t.get(text_key), str) for t in turns)
    spoken = [t for t in turns if t[role_key] != "system"] if ok else []
    if len(spoken) < 2 or spoken[-1][role_key] != assistant or spoken[-2][role_key] != user:
        raise UserError(f"{path}: {where}: a conversation must end with a {user} turn and then an {assistant} "
                        f"turn, each with {role_key!r} and {text_key!r}")
    history = tuple(Exchange(character or "assistant" if t[role_key] == assistant else "用户", t[text_key])
                    for t in spoken[:-2])
    return Sample(instruction=spoken[-2][text_key].strip(), output=spoken[-1][text_key].strip(), history=history)
