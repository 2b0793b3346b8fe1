"""The adapter store: ``<root>/<character>/<version>/`` with weights, tokenizer and ``meta.json``.

A version is written into a hidden temporary folder and renamed into place only once complete,
so a crash or Ctrl-C never leaves a version that can be listed or activated. ``active.json``
records the active version and the activation history that rollback walks back through: the
one record of both. In the bot, ``bot.adapters`` is its only caller for activation and rollback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from training.atomic import write_json_atomic
from training.errors import UserError

VERSION = re.compile(r"^v(\d{4,})$")
ACTIVE_FILE = "active.json"
MAX_NAME_CHARS = 64


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a character's name, or None. The name is the adapter folder
    ``<root>/<name>/``: a path separator or a leading dot would put it elsewhere (``../..``), a
    control character or a lone surrogate cannot be written, and a very long name is more than a
    file system takes (every command then failed)."""
    if not name.strip():
        return "is empty; name the character"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name):,} characters; a character's name is at most {MAX_NAME_CHARS} (it names its adapter folder)"
    shown = repr(name if len(name) <= 40 else name[:37] + "...")
    bad = next((c for c in name if c in "/\\" or unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"{shown} cannot name the character's adapter folder: it holds {bad!r}"
    if name.startswith("."):
        return f"{shown} cannot name the character's adapter folder: it begins with '.'"
    if name != name.strip():
        return f"{shown} cannot name the character's adapter folder: it begins or ends with a space"
    return None


@dataclass(frozen=True)
class Version:
    character: str
    name: str
    path: Path
    meta: dict

    @property
    def parent(self) -> str | None:
        return self.meta.get("parent_version")


class Registry:
    def __init__(self, root: Path, character: str):
        if problem := name_problem(character):
            raise UserError(f"[character] name: {problem}")
        self.root = Path(root)
        self.character = character
        self.dir = self.root / character

    def versions(self) -> list[Version]:
        """Complete versions, oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for child in self.dir.iterdir():
            if VERSION.match(child.name) and (child / "meta.json").is_file():
                found.append(self._read(child))
        return sorted(found, key=lambda v: int(VERSION.match(v.name).group(1)))

    def get(self, name: str) -> Version:
        path = self.dir / name
        if not VERSION.match(name) or not (path / "meta.json").is_file():
            known = ", ".join(v.name for v in self.versions()) or "none yet (run `rolebot train`)"
            raise UserError(f"adapter version {name!r} of {self.character} not found; versions: {known}")
        return self._read(path)

    def _read(self, path: Path) -> Version:
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path / 'meta.json'}: unreadable ({exc}); delete or restore that version") from None
        return Version(self.character, path.name, path, meta)

    def _state(self) -> dict:
        try:
            return json.loads((self.dir / ACTIVE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": None, "history": []}
        except ValueError:
            raise UserError(f"{self.dir / ACTIVE_FILE}: not valid JSON; run `rolebot adapters activate VERSION`") from None

    def active(self) -> Version | None:
        name = self._state().get("active")
        return self.get(name) if name else None

    def activate(self, name: str) -> Version:
        version = self.get(name)
        state = self._state()
        if state.get("active") != name:
            state["history"] = [*state.get("history", []), name]
            state["active"] = name
            write_json_atomic(self.dir / ACTIVE_FILE, state)
        return version

    def rollback(self) -> Version:
        """Return to the version active before the current one."""
        state = self._state()
        history = [n for n in state.get("history", []) if (self.dir / n / "meta.json").is_file()]
        if len(history) < 2:
            raise UserError(f"{self.character}: no earlier active version to roll back to")
        history.pop()
        state.update(active=history[-1], history=history)
        write_json_atomic(self.dir / ACTIVE_FILE, state)
        return self.get(history[-1])

    def next_name(self) -> str:
        numbers = [int(VERSION.match(c.name).group(1)) for c in self.dir.iterdir() if VERSION.match(c.name)] if self.dir.is_dir() else []
        return f"v{max(numbers, default=0) + 1:04d}"

    @contextmanager
    def writing(self):
        """Yield a temporary folder to write a version into; on success it becomes the next
        version (call ``.commit(meta)`` on the yielded object), on error it disappears."""
        self.dir.mkdir(parents=True, exist_ok=True)
        draft = _Draft(self, Path(tempfile.mkdtemp(prefix=".draft-", dir=self.dir)))
        try:
            yield draft
        finally:
            shutil.rmtree(draft.path, ignore_errors=True)


class _Draft:
    def __init__(self, registry: Registry, path: Path):
        self.registry = registry
        self.path = path
        self.version: Version | None = None

    def commit(self, meta: dict) -> Version:
        name = self.registry.next_name()
        meta = {**meta, "version": name, "character": self.registry.character}
        write_json_atomic(self.path / "meta.json", meta)
        final = self.registry.dir / name
        os.rename(self.path, final)  # fails rather than overwrite if a racing run took the name
        self.version = Version(self.registry.character, name, final, meta)
        return self.version
