"""``rolebot card``: import a Character Card V2 into [character], export the character as one."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tempfile
from pathlib import Path

from bot.cards import Card, CardError, embed_card, read_card, write_json_card
from bot.config import CharacterSettings, Config, find_config, load_config, parse_config
from training.prompts import USER_SPEAKER
from bot.toml_edit import set_keys
from training.errors import UserError

DESCRIPTION = """\
Character cards are the format most role-play front-ends (SillyTavern and others) share: a
Character Card V2 JSON file, or a PNG picture that carries the same JSON in its 'chara' chunk.
V1 cards (the same fields, flat) are read too.

import FILE   writes the card into the config file's [character] section, keeping the rest of
              the file and its comments: name; persona, built from the card's system prompt,
              description, personality, scenario and example dialogue ({{char}} becomes the
              name, {{user}} the user); greeting, the card's first message, which every new
              conversation starts with ({{user}} stays, for the user's name); aliases are
              emptied when the name changes (they named the previous character in its script);
              card, a copy of the card in cards/ beside the config, which export starts from.
export        writes the configured character back as a V2 card: the imported card with the
              name, persona and greeting as configured now (a persona edited since the import
              becomes the card's description). With --image PNG, a PNG card: that picture
              with the card in its 'chara' chunk.

Examples:
  rolebot card import Seraphina.png
  rolebot --config bot.toml card import seraphina.json
  rolebot card export --output 甄嬛.json
  rolebot card export --image portrait.png --output 甄嬛.png
"""


def register(sub) -> None:
    parser = sub.add_parser("card", help="import or export a character card (Character Card V2, JSON or PNG)",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    importing = actions.add_parser("import", help="write a card (.json or .png) into [character] of the config file",
                                   description="Write a Character Card V2 (or V1) from a .json file or a PNG's "
                                   "'chara' chunk into the config file's [character] section: name, persona (built "
                                   "from the card's system prompt, description, personality, scenario and example "
                                   "dialogue), greeting (its first message), card (a copy in cards/); the rest of "
                                   "the file stays as it is. `rolebot card --help` says more.")
    importing.add_argument("file", type=Path, metavar="FILE", help="the card: .json, or .png with a 'chara' chunk")
    importing.set_defaults(run=import_card)
    exporting = actions.add_parser("export", help="write the configured character as a V2 card (JSON, or PNG with --image)",
                                   description="Write the configured character as a Character Card V2: the "
                                   "imported card ([character] card) with the name, persona and greeting as "
                                   "configured now; JSON, or with --image a PNG card.")
    exporting.add_argument("--output", type=Path, required=True, metavar="FILE", help="the card file to write")
    exporting.add_argument("--image", type=Path, metavar="PNG",
                           help="the character's picture: write a PNG card (the picture with the card in its 'chara' chunk)")
    exporting.set_defaults(run=export_card)


def import_card(args: argparse.Namespace) -> int:
    card = read_card(args.file)
    path = find_config(args.config) or Path("config.toml")
    existing = path.exists()
    config = load_config(str(path)) if existing else Config(root=path.resolve().parent)
    text = path.read_text(encoding="utf-8-sig") if existing else ""
    copy = Path("cards") / f"{_file_name(args.file.stem)}.json"
    values = {"name": card.name, "persona": card.persona(_user_word(card)),
              "greeting": card.fill(card.first_mes, "{{user}}").strip(), "card": copy.as_posix()}
    if card.name != config.character.name:
        values["aliases"] = []
    comments = {f.name: f.metadata["help"] for f in dataclasses.fields(CharacterSettings)}
    new_text = set_keys(text, "character", values, comments, path)
    parse_config(new_text, path)  # what the bot will read must load
    write_json_card(card, config.path(copy.as_posix()))
    _write_atomic(path, new_text)
    print(f"{path}: [character] is now {card.name} from {args.file} "
          f"(persona {len(values['persona'])} characters, greeting {len(values['greeting'])}; "
          f"card kept as {config.path(copy.as_posix())})")
    unused = [name for name, value in (("alternate_greetings", card.alternate_greetings),
                                       ("post_history_instructions", card.post_history_instructions))
              if value]
    if unused:
        print(f"Kept in the card but not used by rolebot: {', '.join(unused)}.")
    if "aliases" in values:
        print("[character] aliases was emptied: add the names the character goes by in its script.")
    return 0


def export_card(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.image is None and args.output.suffix.lower() == ".png":
        raise UserError(f"{args.output}: a PNG card needs the character's picture: add --image PNG "
                        "(or write a .json card)")
    card = configured_card(config)
    if args.image is not None:
        try:
            image = args.image.read_bytes()
        except OSError as exc:
            raise CardError(f"{args.image}: cannot read the picture: {exc.strerror or exc}") from None
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(embed_card(card, image, args.image))
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_json_card(card, args.output)
    print(f"{args.output}: {card.name} as a Character Card V2" + (" (PNG)" if args.image else ""))
    return 0


def configured_card(config: Config) -> Card:
    """The character as configured, as a card: the imported card where the config still says
    what it said, the config's own values where they changed."""
    character = config.character
    base = Card(name=character.name, creator_notes="exported by rolebot")
    if character.card:
        source = config.path(character.card)
        if not source.exists():
            raise UserError(f"[character] card = {character.card!r}: {source} is missing; restore it, "
                            "or set card = \"\" to export from the config alone")
        base = read_card(source)
    card = dataclasses.replace(base, name=character.name)
    if card.persona(_user_word(card)) != character.persona:
        card = dataclasses.replace(card, description=character.persona, personality="", scenario="",
                                   mes_example="", system_prompt="")
    if card.fill(card.first_mes, "{{user}}").strip() != character.greeting:
        card = dataclasses.replace(card, first_mes=character.greeting)
    return card


def _user_word(card: Card) -> str:
    """What {{user}} becomes in the persona: the service's name for the user in a Chinese (or
    other CJK) card, "User" otherwise."""
    return USER_SPEAKER if card.cjk else "User"


def _file_name(stem: str) -> str:
    return re.sub(r"[^\w.-]+", "_", stem).strip("._") or "card"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    if path.exists():
        os.chmod(tmp, path.stat().st_mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
