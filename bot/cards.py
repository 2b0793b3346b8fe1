"""Character Card V2: the JSON format most role-play front-ends (SillyTavern, …) share, as a
``.json`` file or base64 JSON in a PNG's ``chara`` tEXt chunk.

Spec: ``{"spec": "chara_card_v2", "spec_version": "2.0", "data": {...}}`` with the V1 fields
(name, description, personality, scenario, first_mes, mes_example) and V2's creator_notes,
system_prompt, post_history_instructions, alternate_greetings, tags, creator,
character_version and extensions. A V1 card is the same fields flat, without ``spec``.

The PNG side uses only the standard library: a card's picture passes through byte for byte,
only its ``chara`` chunk is replaced.
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
        value = json.loads(text.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CardError(f"{where}: not UTF-8 text (byte {exc.start}); a card is a UTF-8 JSON file") from None
    except json.JSONDecodeError as exc:
        raise CardError(f"{where}: not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    return parse_card(value, where)


def parse_card(value: Any, where: str) -> Card:
    """A card from its decoded JSON: V2 (``spec`` = chara_card_v2, fields under ``data``) or V1 (flat)."""
    if not isinstance(value, dict):
        raise CardError(f"{where}: a card is a JSON object, got {_kind(value)}")
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
    if prefix:
        for name in V2_TEXT_FIELDS:
            fields[name] = _text(data.get(name, ""), where, prefix + name)
        for name in V2_LIST_FIELDS:
            items = data.get(name, [])
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise CardError(f"{where}: field {prefix}{name} must be a list of strings, got {_short(items)}")
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
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "true/false"}.get(type(value), "a number")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."

