"""Character Card V2: the JSON format most role-play front-ends (SillyTavern, …) share, as a
``.json`` file or base64 JSON in a PNG's ``chara`` tEXt chunk.

Spec: ``{"spec": "chara_card_v2", "spec_version": "2.0", "data": {...}}`` with the V1 fields
(name, description, personality, scenario, first_mes, mes_example) and V2's creator_notes,
system_prompt, post_history_instructions, alternate_greetings, tags, creator,
character_version and extensions. A V1 card is the same fields flat, without ``spec``.

The PNG side uses only the standard library: a card's picture passes through byte for byte,
only its ``chara`` chunk is replaced.

A card is a file from anywhere, and what it holds goes into ``config.toml`` and names the adapter
folder. So its JSON may be at most ``MAX_DEPTH`` deep (measured before it is parsed: Python's
reader recurses and a 100,000-deep array raised ``RecursionError``), every string must be text
(no lone UTF-16 surrogate, which cannot be written), the name must be a folder name of at most
64 characters (``training.registry.name_problem``), and each text field at most
``MAX_TEXT_CHARS``. Each refusal is one line naming the card and the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import write_json_atomic
from training.errors import UserError
from training.registry import name_problem

SPEC = "chara_card_v2"
SPEC_VERSION = "2.0"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK_KEYWORD = b"chara"

# Both specs require these; every exporter writes them.
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
# V2 requires these too, but cards from older exporters lack some: they default to empty.
V2_TEXT_FIELDS = ("creator_notes", "system_prompt", "post_history_instructions", "creator",
                  "character_version")
V2_LIST_FIELDS = ("alternate_greetings", "tags")
# Objects and arrays inside each other: real cards (a lorebook under extensions) nest a handful.
MAX_DEPTH = 64
# A text field's most characters: a persona this long is already far beyond any model's prompt.
MAX_TEXT_CHARS = 100_000
FIELD_PARTS_SHOWN = 8  # of a deeply nested field's path, in messages


class CardError(UserError):
    """A file that is not a usable character card; the message names the file and the field."""


@dataclass(frozen=True)
class Card:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)

    def as_v2(self) -> dict:
        """The card as V2 JSON (a dict ready for ``json.dumps``)."""
        data = {name: getattr(self, name) for name in (*V1_FIELDS, *V2_TEXT_FIELDS)}
        data.update({name: list(getattr(self, name)) for name in V2_LIST_FIELDS})
        data["extensions"] = self.extensions
        return {"spec": SPEC, "spec_version": SPEC_VERSION, "data": data}

    @property
    def cjk(self) -> bool:
        """Whether the card is written in Chinese (or Japanese, Korean): the persona's labels follow."""
        text = self.description + self.personality + self.scenario + self.first_mes
        return re.search(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]", text) is not None

    def persona(self, user_word: str) -> str:
        """The persona (the system part of every prompt) built from the card's description,
        personality, scenario and example dialogue, with {{char}} and {{user}} filled in."""
        labels = ("性格：", "场景：", "对话示例：") if self.cjk else ("Personality: ", "Scenario: ", "Example dialogue:\n")
        system = self.system_prompt.replace("{{original}}", "").strip()
        # <START> separates a card's example chats; here a blank line does.
        examples = "\n\n".join(e.strip() for e in re.split(r"<START>", self.mes_example, flags=re.IGNORECASE)
                               if e.strip())
        parts = [system, self.description.strip(),
                 labels[0] + self.personality.strip() if self.personality.strip() else "",
                 labels[1] + self.scenario.strip() if self.scenario.strip() else "",
                 labels[2] + examples if examples else ""]
        return self.fill("\n\n".join(p for p in parts if p), user_word)

    def fill(self, text: str, user_word: str) -> str:
        """Replace the card macros: {{char}} / <BOT> with the name, {{user}} / <USER> with ``user_word``."""
        text = re.sub(r"\{\{char\}\}|<BOT>", lambda _: self.name, text, flags=re.IGNORECASE)
        return re.sub(r"\{\{user\}\}|<USER>", lambda _: user_word, text, flags=re.IGNORECASE)


def read_card(path: Path) -> Card:
    """A card from a ``.json`` file or a PNG with a ``chara`` chunk; ``CardError`` otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CardError(f"{path}: no such card file") from None
    except OSError as exc:
        raise CardError(f"{path}: cannot read the card: {exc.strerror or exc}") from None
    if raw.startswith(PNG_SIGNATURE):
        text = _chara_text(raw, path)
        where = f"{path} (PNG chunk 'chara')"
    else:
        if path.suffix.lower() == ".png":
            raise CardError(f"{path}: not a PNG file (it lacks the PNG signature); give a card's .png or .json")
        text = raw
        where = str(path)
    try:
        decoded = text.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"{where}: not UTF-8 text (byte {exc.start}); a card is a UTF-8 JSON file") from None
    if (path_too_deep := _too_deep(decoded, MAX_DEPTH)) is not None:
        raise CardError(_deep_message(where, path_too_deep))
    try:
        value = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise CardError(f"{where}: not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4,300 digits
        raise CardError(f"{where}: not JSON: {str(exc).splitlines()[0][:120]}") from None
    return parse_card(value, where)


def parse_card(value: Any, where: str) -> Card:
    """A card from its decoded JSON: V2 (``spec`` = chara_card_v2, fields under ``data``) or V1 (flat)."""
    if not isinstance(value, dict):
        raise CardError(f"{where}: a card is a JSON object, got {_kind(value)}")
    _check_values(value, where)
    if "spec" in value:
        if value["spec"] != SPEC:
            raise CardError(f"{where}: field spec is {value['spec']!r}; rolebot reads "
                            f"{SPEC!r} cards (and V1 cards without spec): export the card as V2")
        version = value.get("spec_version")
        if not isinstance(version, str) or not version.startswith("2."):
            raise CardError(f"{where}: field spec_version must be a \"2.x\" string, got {version!r}")
        data, prefix = value.get("data"), "data."
        if not isinstance(data, dict):
            raise CardError(f"{where}: field data must be an object with the card's fields, got {_kind(data)}")
    else:
        data, prefix = value, ""
    fields: dict[str, Any] = {}
    for name in V1_FIELDS:
        if name not in data:
            raise CardError(f"{where}: field {prefix}{name} is missing; a card needs "
                            f"{', '.join(V1_FIELDS)} (strings, may be empty)")
        fields[name] = _text(data[name], where, prefix + name)
    if not fields["name"].strip():
        raise CardError(f"{where}: field {prefix}name is empty; the card must name its character")
    if problem := name_problem(fields["name"]):
        raise CardError(f"{where}: field {prefix}name {problem}; rename the character in the card")
    if prefix:
        for name in V2_TEXT_FIELDS:
            fields[name] = _text(data.get(name, ""), where, prefix + name)
        for name in V2_LIST_FIELDS:
            items = data.get(name, [])
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise CardError(f"{where}: field {prefix}{name} must be a list of strings, got {_short(items)}")
            for i, item in enumerate(items):
                _text(item, where, f"{prefix}{name}[{i}]")
            fields[name] = tuple(items)
        extensions = data.get("extensions", {})
        if not isinstance(extensions, dict):
            raise CardError(f"{where}: field {prefix}extensions must be an object, got {_kind(extensions)}")
        fields["extensions"] = extensions
    return Card(**fields)


def write_json_card(card: Card, path: Path) -> None:
    write_json_atomic(path, card.as_v2())


def embed_card(card: Card, image: bytes, image_path: Path) -> bytes:
    """``image`` with the card in its ``chara`` tEXt chunk (an existing one is replaced), before IEND."""
    chunks = _chunks(image, image_path)
    payload = base64.b64encode(json.dumps(card.as_v2(), ensure_ascii=False).encode("utf-8"))
    out = [PNG_SIGNATURE]
    for kind, data, raw in chunks:
        if kind == b"tEXt" and data.split(b"\0", 1)[0] == CHUNK_KEYWORD:
            continue
        if kind == b"IEND":
            out.append(_chunk(b"tEXt", CHUNK_KEYWORD + b"\0" + payload))
        out.append(raw)
    return b"".join(out)


def _chara_text(png: bytes, path: Path) -> bytes:
    for kind, data, _ in _chunks(png, path):
        keyword, _, text = data.partition(b"\0")
        if kind == b"tEXt" and keyword == CHUNK_KEYWORD:
            try:
                return base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise CardError(f"{path}: the PNG's 'chara' chunk is not base64 text; "
                                "re-export the card from its front-end") from None
    raise CardError(f"{path}: this PNG carries no character card (no 'chara' tEXt chunk); "
                    "export the character as a card PNG, or give its .json")


def _chunks(png: bytes, path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(type, data, the whole chunk's bytes) of each chunk, checked up to IEND."""
    if not png.startswith(PNG_SIGNATURE):
        raise CardError(f"{path}: not a PNG file (it lacks the PNG signature)")
    chunks, pos = [], len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(png):
            raise CardError(f"{path}: broken PNG: it ends at byte {pos} before its IEND chunk")
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        end = pos + 12 + length
        if end > len(png):
            raise CardError(f"{path}: broken PNG: chunk {kind!r} at byte {pos} runs past the end of the file")
        data = png[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", png[end - 4:end])
        if zlib.crc32(kind + data) != crc:
            raise CardError(f"{path}: broken PNG: chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC check")
        chunks.append((kind, data, png[pos:end]))
        pos = end
        if kind == b"IEND":
            return chunks


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise CardError(f"{where}: field {name} must be a string, got {_short(value)}")
    if len(value) > MAX_TEXT_CHARS and name.rpartition(".")[2] != "name":  # a name has its own limit
        raise CardError(f"{where}: field {name} is {len(value):,} characters; a card's text fields are at most "
                        f"{MAX_TEXT_CHARS:,}: shorten it in the card's editor")
    return value


def _too_deep(text: str, limit: int) -> list | None:
    """The path (keys and indexes) to the first object or array of ``text`` nested deeper than
    ``limit``, or None; without recursion, so that any depth can be measured. Text that is not
    JSON is left to the JSON reader to name."""
    path: list = []  # for each open object or array: the key or index of the child being read
    opened: list[str] = []
    at, expecting_key = 0, False
    while True:
        at = _next_token(text, at)
        if at < 0:
            return None
        char = text[at]
        if char == '"':
            end = _string_end(text, at)
            if end < 0:
                return None
            if expecting_key and opened and opened[-1] == "{":
                try:
                    path[-1] = json.loads(text[at:end])
                except ValueError:
                    path[-1] = text[at + 1:end - 1]
                expecting_key = False
            at = end
            continue
        if char in "{[":
            if len(opened) >= limit:
                return path
            opened.append(char)
            path.append(0 if char == "[" else "")
            expecting_key = char == "{"
        elif char in "}]":
            if opened:
                opened.pop()
                path.pop()
            expecting_key = False
        elif char == "," and opened:
            if opened[-1] == "[":
                path[-1] += 1
            else:
                expecting_key = True
        at += 1


_STRUCTURE = re.compile(r'["{}\[\],]')


def _next_token(text: str, at: int) -> int:
    found = _STRUCTURE.search(text, at)
    return found.start() if found else -1


def _string_end(text: str, start: int) -> int:
    """The index after the closing quote of the string opening at ``start``, or -1."""
    at = start + 1
    while True:
        quote = text.find('"', at)
        if quote < 0:
            return -1
        backslashes = 0
        while text[quote - 1 - backslashes] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return quote + 1
        at = quote + 1


def _check_values(value: Any, where: str) -> None:
    """Every string of the card (keys too) is text, and nothing is nested more than MAX_DEPTH
    deep; iteratively, for cards given as values rather than read from a file."""
    stack: list[tuple[Any, list]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise CardError(_deep_message(where, path[:-1]))
        if isinstance(item, str):
            _no_surrogate(item, where, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _no_surrogate(key, where, path + [key])
                stack.append((child, path + [key]))
        elif isinstance(item, list):
            stack.extend((child, path + [i]) for i, child in enumerate(item))


def _no_surrogate(text: str, where: str, path: list) -> None:
    """JSON can escape half of a UTF-16 pair alone (\\ud800); Python reads that as a lone
    surrogate, which no file can be written with."""
    found = re.search("[\ud800-\udfff]", text)
    if found:
        raise CardError(f"{where}: field {_field(path)} holds a lone UTF-16 surrogate "
                        f"(\\u{ord(found.group()):04x} at character {found.start() + 1}), which is not text: "
                        "fix the field in the card's editor")


def _field(path: list) -> str:
    shown = "".join(f"[{p}]" if isinstance(p, int) else f".{str(p)[:40]}" for p in path[:FIELD_PARTS_SHOWN])
    return shown.lstrip(".") + ("…" if len(path) > FIELD_PARTS_SHOWN else "")


def _deep_message(where: str, path: list) -> str:
    subject = f"field {_field(path)}" if path and isinstance(path[0], str) else "the card's JSON"
    return (f"{where}: {subject} is nested more than {MAX_DEPTH} deep (objects or arrays inside each other); "
            "no card needs that: re-export it from its front-end")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "true/false"}.get(type(value), "a number")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."

