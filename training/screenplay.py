"""Screenplays in the 「角色（动作）：台词」 form, decoded and read into typed turns.

A script is a sequence of lines: episode headers (``第七十一集``), scene headers
(``第1104幕（续）``), stage directions (``（退朝，百官散去）``), narration (``（旁白：…）``) and
dialogue (``角色：台词``, ``角色（动作）：台词``), in full- or half-width punctuation. Real
scripts also have typos a regex trips over, so the parser is a little forgiving where the
intent is unambiguous (see ``_dialogue_line``) and reports, as ``unattributed`` turns, the
lines it cannot attribute rather than guessing a speaker.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from training.errors import UserError

SAMPLE_SCRIPT = Path(__file__).parent / "samples" / "sample_script.txt"

Kind = Literal["dialogue", "direction", "narration", "unattributed"]


@dataclass(frozen=True)
class Turn:
    """One thing that happens in a script, in reading order.

    ``text`` is what is said, with stage directions removed (it can be empty when a
    dialogue line is only an action); for a direction or narration, its words.
    ``scene`` counts scene headers within the file, so ``第63幕（续）`` after a cut-away
    is a new scene: its first line does not answer the line before the cut-away.
    ``scene_label`` is the header as written.
    """

    file: str
    line: int
    episode: int
    scene: int
    scene_label: str
    kind: Kind
    speaker: str = ""
    action: str = ""
    text: str = ""


# --- decoding -------------------------------------------------------------------------

# UTF-32 is left out on purpose: its BOM starts with UTF-16's and no script editor writes it.
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
         (codecs.BOM_UTF16_BE, "utf-16-be"))


def read_script_text(path: Path) -> str:
    """The file's text: UTF-8 (with or without BOM), GBK/GB18030 or UTF-16."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file — check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a script — name the script files") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}) — check the permissions") from None
    return decode_script(data, str(path))


def decode_script(data: bytes, name: str) -> str:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return _decode(data[len(bom):], codec, name)
    if b"\x00" in data:
        # Chinese text never contains NUL bytes except as the high half of UTF-16 ASCII.
        return _decode(data, _utf16_byte_order(data), name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf8_error = exc
    if _mostly_utf8(data):
        # GB18030 would read it without complaint, as nonsense: better to say where.
        raise _undecodable(data, utf8_error, "utf-8", name)
    try:
        return data.decode("gb18030")
    except UnicodeDecodeError as gb_error:
        # Neither fits; the one that read further is what the file was meant to be.
        exc, codec = max((utf8_error, "utf-8"), (gb_error, "gb18030"), key=lambda e: e[0].start)
        raise _undecodable(data, exc, codec, name) from None


def _utf16_byte_order(data: bytes) -> str:
    # ASCII characters (newlines at least) put their zero byte second in little-endian.
    odd_zeros = data[1::2].count(0)
    return "utf-16-le" if odd_zeros >= data[0::2].count(0) else "utf-16-be"


def _mostly_utf8(data: bytes) -> bool:
    """UTF-8 with a few broken bytes, not GBK (which UTF-8 reads as mostly broken)."""
    text = data.decode("utf-8", errors="replace")
    broken = text.count("\ufffd")
    return sum(ord(char) > 0x7F for char in text) - broken > 4 * broken


def _decode(data: bytes, codec: str, name: str) -> str:
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise _undecodable(data, exc, codec, name) from None


_CODEC_NAMES = {"utf-8": "UTF-8", "gb18030": "UTF-8 or GBK/GB18030",
                "utf-16-le": "UTF-16", "utf-16-be": "UTF-16"}


def _undecodable(data: bytes, exc: UnicodeDecodeError, codec: str, name: str) -> UserError:
    line = data[: exc.start].decode(codec, errors="replace").count("\n") + 1
    bad = " ".join(f"0x{b:02x}" for b in data[exc.start : min(exc.end, exc.start + 4)])
    return UserError(f"{name}:{line}: bytes {bad} are not valid {_CODEC_NAMES[codec]} — "
                     "fix that line or re-save the script as UTF-8")


# --- line shapes ----------------------------------------------------------------------

_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5,
              "六": 6, "七": 7, "八": 8, "九": 9}
_CN_UNITS = {"十": 10, "百": 100, "千": 1000}
_NUMBER = r"([0-9０-９]+|[零〇一二两三四五六七八九十百千]+)"
_EPISODE = re.compile(rf"第\s*{_NUMBER}\s*集(?:[\s:：].*)?")
_SCENE = re.compile(rf"第\s*{_NUMBER}\s*[幕场](?:\s*[（(]\s*续\s*[）)])?\s*(?:[\s:：].*)?")
_PAREN = r"[（(][^（()）]*[）)]"
_PARENS = re.compile(_PAREN)
_INNER_PAREN = re.compile(r"[（(]([^（()）]*)[）)]")
# A speaker, any number of actions, then the first colon; later colons belong to the text.
_DIALOGUE = re.compile(rf"(?P<speaker>[^（()）：:]+?)\s*(?P<action>(?:{_PAREN}\s*)*)"
                       r"[：:](?P<text>.*)")
_SEMICOLON_DIALOGUE = re.compile(rf"(?P<speaker>[^（()）；;]+?)\s*(?P<action>(?:{_PAREN}\s*)*)"
                                 r"[；;](?P<text>.*)")
# What an aside or a parenthesised line says: ``甄嬛：妹妹`` in ``（甄嬛：妹妹）``.
_SPEECH = re.compile(r"\s*([^：:]+?)\s*[：:](.*)", re.S)
_NOT_IN_NAMES = set("，。！？、；;,.!?“”‘’\"'「」『』《》…—～~")
_MAX_NAME = 12
NARRATOR = "旁白"


def chinese_number(digits: str) -> int:
    """``七十一`` → 71, ``一百零五`` → 105, ``12`` → 12."""
    if digits.isdigit():
        return int(digits)
    total, digit = 0, 0
    for char in digits:
        if char in _CN_UNITS:
            total += (digit or 1) * _CN_UNITS[char]
            digit = 0
        else:
            digit = _CN_DIGITS[char]
    return total + digit


def is_speaker_name(name: str) -> bool:
    """Short and free of sentence punctuation: ``甄嬛`` is a name, ``朕今日过来，是有…`` is not."""
    return 0 < len(name) <= _MAX_NAME and not _NOT_IN_NAMES.intersection(name)


def is_script_line(line: str) -> bool:
    """A ``角色：台词`` line (or ``角色（动作）：台词``), as a screenplay writes one."""
    if _EPISODE.fullmatch(line) or _SCENE.fullmatch(line):
        return False
    match = _DIALOGUE.fullmatch(line)
    return bool(match) and is_speaker_name(match["speaker"].strip())


def strip_directions(text: str) -> str:
    """Text without ``（…）`` stage directions, with whitespace collapsed."""
    return " ".join(_PARENS.sub("", text).split())


def _dialogue_line(line: str, known: frozenset[str]) -> re.Match[str] | None:
    match = _DIALOGUE.fullmatch(line)
    if match and is_speaker_name(match["speaker"].strip()):
        return match
    # ``甄嬛；我过去看看。`` is a typo for the colon; only trusted for names seen with one.
    match = _SEMICOLON_DIALOGUE.fullmatch(line)
    if match and match["speaker"].strip() in known:
        return match
    return None


# --- parsing --------------------------------------------------------------------------

def parse_scripts(paths: list[Path]) -> list[Turn]:
    """All turns of the scripts, in the order given (the order is the story's time)."""
    return [turn for path in paths for turn in parse_script(path)]


def parse_script(path: Path) -> list[Turn]:
    return parse_text(read_script_text(path), str(path))


def parse_text(text: str, file: str) -> list[Turn]:
    lines = [line.replace("\ufeff", "").strip() for line in re.split(r"\r\n|\r|\n", text)]
    known = _known_speakers(lines)
    turns: list[Turn] = []
    episode, scene, label = 0, 0, ""
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        if header := _EPISODE.fullmatch(line):
            # A new episode also ends the scene, even before its first scene header.
            episode, scene, label = chinese_number(header[1]), scene + 1, ""
        elif _SCENE.fullmatch(line):
            scene, label = scene + 1, line.rstrip("：: ")
        else:
            place = _Place(file, number, episode, scene, label)
            turns.extend(_line_turns(line, known, place))
    return turns


@dataclass(frozen=True)
class _Place:
    """Where a line stands; makes the turns read from it."""

    file: str
    line: int
    episode: int
    scene: int
    scene_label: str

    def turn(self, kind: Kind, speaker: str = "", action: str = "", text: str = "") -> Turn:
        return Turn(self.file, self.line, self.episode, self.scene, self.scene_label,
                    kind, speaker, action, text)


def _known_speakers(lines: list[str]) -> frozenset[str]:
    names = set()
    for line in lines:
        if _EPISODE.fullmatch(line) or _SCENE.fullmatch(line):
            continue  # ``第9幕：`` has a colon but no speaker
        match = _DIALOGUE.fullmatch(line)
        if match and is_speaker_name(name := match["speaker"].strip()):
            names.add(name)
    return frozenset(names - {NARRATOR})


def _line_turns(line: str, known: frozenset[str], place: _Place) -> Iterator[Turn]:
    if whole := _INNER_PAREN.fullmatch(line):
        yield _parenthetical(whole[1], known, place)
        return
    # ``（笑）甄嬛：…``: a direction before the speaker is still only a direction.
    if lead := re.match(rf"(?:{_PAREN}\s*)+", line):
        line = line[lead.end():]
    match = _dialogue_line(line, known)
    if match is None:
        text = strip_directions(line)
        yield place.turn("unattributed", text=text) if text else place.turn("direction")
        return
    speaker = match["speaker"].strip()
    if speaker == NARRATOR:
        yield place.turn("narration", NARRATOR, text=strip_directions(match["text"]))
        return
    action = "；".join(a.strip() for a in _INNER_PAREN.findall(match["action"]))
    yield from _spoken(speaker, action, match["text"], known, place)


def _parenthetical(inner: str, known: frozenset[str], place: _Place) -> Turn:
    speech = _SPEECH.fullmatch(inner)
    name = speech[1].strip() if speech else ""
    if name == NARRATOR:
        return place.turn("narration", NARRATOR, text=speech[2].strip())
    if name in known:
        return place.turn("dialogue", name, text=strip_directions(speech[2]))
    return place.turn("direction", text=inner.strip())


def _spoken(speaker: str, action: str, text: str, known: frozenset[str],
            place: _Place) -> Iterator[Turn]:
    """The line's turns: ``陵容：姐姐！（甄嬛：妹妹）冰凉的手。`` is three of them."""
    pieces = _interjections(text, known)
    if len(pieces) == 1:
        yield place.turn("dialogue", speaker, action, strip_directions(text))
        return
    for who, raw in pieces:
        said = strip_directions(raw)
        if who:
            yield place.turn("dialogue", who, text=said)
        elif said:
            yield place.turn("dialogue", speaker, action, said)


def _interjections(text: str, known: frozenset[str]) -> list[tuple[str, str]]:
    """The text cut at ``（角色：台词）`` asides of known speakers; "" marks the line's own."""
    pieces, start = [], 0
    for paren in _INNER_PAREN.finditer(text):
        speech = _SPEECH.fullmatch(paren[1])
        if speech and speech[1].strip() in known:
            pieces += [("", text[start:paren.start()]), (speech[1].strip(), speech[2])]
            start = paren.end()
    return pieces + [("", text[start:])]
