"""Set keys of one section of a TOML file's text and leave every other line as it was.

``rolebot card import`` writes the character into the user's config.toml, which carries the
user's own comments and layout. Each key's assignment (one line, or several for a multi-line
string or array) is replaced in place; a key the section lacks goes after its last key, with a
comment line; a missing section goes at the end. The result is parsed again and must hold
exactly the new values beside everything else unchanged, so a bad edit never reaches the disk.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from training.errors import UserError

_HEADER = re.compile(r"\s*\[\s*([^\]\s]+)\s*\]")


def set_keys(text: str, section: str, values: Mapping[str, str | list[str]],
             comments: Mapping[str, str], path: Path) -> str:
    """``text`` with ``[section]``'s keys set to ``values`` (strings or lists of strings);
    ``comments`` gives the comment line of a key that has to be added."""
    lines = text.splitlines()
    for key, value in values.items():
        items = _layout(lines, path)
        headers = [i for i, item in enumerate(items) if item[0] == "header"]
        mine = next((i for i in headers if items[i][3] == section), None)
        new = [f"{key} = {render(value)}"]
        if mine is None:
            lines += ([""] if lines and lines[-1].strip() else []) + [f"[{section}]"]
            lines += [f"# {comments[key]}", *new]
            continue
        following = next((i for i in headers if i > mine), len(items))
        keys = [items[i] for i in range(mine + 1, following)]
        found = next((item for item in keys if item[3] == key), None)
        if found is not None:
            lines[found[1]:found[2]] = new
        else:
            at = keys[-1][2] if keys else items[mine][2]
            lines[at:at] = [f"# {comments[key]}", *new]
    result = "\n".join(lines) + "\n"
    _check(text, result, section, values, path)
    return result


def render(value: str | list[str]) -> str:
    """A TOML value: a basic string (JSON's escapes are TOML's), a multi-line string for text
    with line breaks, or an array of strings."""
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if "\n" not in value:
        # JSON leaves DEL (U+007F) as it is; a TOML string may not hold it unescaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    # Only backslashes, a run of three quotes and a quote right before the closing ones need escapes.
    body = value.replace("\\", "\\\\").replace('"""', '""\\"')
    if body.endswith('"'):
        body = body[:-1] + '\\"'
    body = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", body)
    return f'"""\n{body}"""'


def _layout(lines: list[str], path: Path) -> list[tuple[str, int, int, str]]:
    """The file's headers and assignments as (kind, first line, end line, name), in order.
    Lines inside a multi-line value belong to its assignment, never taken for a header."""
    items, number = [], 0
    while number < len(lines):
        line = lines[number].strip()
        header = _HEADER.match(line)
        if header:
            items.append(("header", number, number + 1, header.group(1)))
            number += 1
        elif line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip().strip('"')
            end = _value_end(lines, number, key, path)
            items.append(("key", number, end, key))
            number = end
        else:
            number += 1
    return items


def _value_end(lines: list[str], first: int, key: str, path: Path) -> int:
    # A value may span lines (a multi-line string or array): it ends at the first line where the
    # assignment alone parses.
    for last in range(first + 1, len(lines) + 1):
        try:
            if tomllib.loads("\n".join(lines[first:last])):
                return last
        except tomllib.TOMLDecodeError:
            continue
    raise UserError(f"{path}:{first + 1}: cannot tell where the value of {key} ends; fix the line or "
                    "set the key by hand")


def _check(before: str, after: str, section: str, values: Mapping[str, object], path: Path) -> None:
    old = tomllib.loads(before)
    try:
        new = tomllib.loads(after)
    except tomllib.TOMLDecodeError as exc:  # never written: the file stays as it was
        raise UserError(f"{path}: setting [{section}] {', '.join(values)} would not read back as TOML ({exc}); "
                        "set them by hand") from None
    expected = {**old, section: {**old.get(section, {}), **values}}
    if new != expected:
        raise UserError(f"{path}: could not set [{section}] {', '.join(values)} without changing other "
                        "settings; set them by hand")
