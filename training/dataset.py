"""Reading a pairs file (the tutorial's Alpaca JSON) into samples, with errors that say where."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from training.errors import UserError
from training.prompts import Sample

REQUIRED = ("instruction", "output")
KNOWN = {"instruction", "input", "output", "source", "prompt"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_samples(path: Path) -> list[Sample]:
    """Alpaca records from a JSON array or a JSON-lines file.

    Every record needs a non-empty ``instruction`` and ``output``; ``input`` is optional.
    """
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
    return [_sample(record, path, where) for where, record in records]


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


def _sample(record, path: Path, where: str) -> Sample:
    if not isinstance(record, dict):
        raise UserError(f"{path}: {where}: expected an object with instruction/input/output, got {type(record).__name__}")
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
