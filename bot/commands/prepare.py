"""``rolebot prepare``: screenplays become the tutorial's training data for one character."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.commands import count
from training.pairs import FORMATS, Character, PrepareRequest, prepare

DESCRIPTION = """\
Read screenplays in the 「角色（动作）：台词」 form and write training pairs for one
character: each line of the character that answers someone else's line in the same scene
becomes {"instruction": their line, "input": "", "output": the character's line}, the
tutorial's Alpaca data. Stage directions are removed; lines with an action
(甄嬛（笑）：…), a colon inside the text, full- or half-width punctuation, CRLF, and
UTF-8 (with or without BOM), GBK or UTF-16 files are all read.

Beside the pairs it writes the canon index FILE.canon.jsonl (e.g. huanhuan.canon.jsonl): the
training episodes' exchanges (the line said, the character's answer, episode, scene,
speaker), which training and the bot search for the scenes most like the line at hand
([canon] in config.toml). Held-out episodes stay out of it.

Examples:
  rolebot prepare 甄嬛传剧本01-10.txt --character 甄嬛 --alias 嬛嬛 --alias 莞贵人 \\
      --output data/huanhuan.json
  rolebot prepare ep*.txt --character 甄嬛 --output data/huanhuan.jsonl --format jsonl \\
      --history 4 --val-episodes 1
"""

HELP = "turn screenplays into training pairs for one character"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scripts", nargs="+", type=Path, metavar="SCRIPT",
                        help="screenplay files, in story order (their order decides which "
                             "episodes are the last ones)")
    parser.add_argument("--character", required=True, metavar="NAME",
                        help="the character to learn, as the script names its speaker")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME",
                        help="another speaker name of the same character (repeatable), "
                             "e.g. --alias 嬛嬛 --alias 莞贵人")
    parser.add_argument("--output", required=True, type=Path, metavar="FILE",
                        help="the dataset file to write (its folder is created)")
    parser.add_argument("--format", choices=FORMATS, default=PrepareRequest.format,
                        help="alpaca: JSON array of instruction/input/output (the tutorial's); "
                             "sharegpt: JSON array of conversations; jsonl: one "
                             '{"messages": [...]} a line (default: %(default)s)')
    parser.add_argument("--history", type=count, default=PrepareRequest.history, metavar="N",
                        help="add up to N earlier lines of the scene: as earlier turns "
                             "(sharegpt, jsonl) or as 「角色：台词」 lines in input (alpaca) "
                             "(default: %(default)s)")
    parser.add_argument("--val-episodes", type=count, default=PrepareRequest.val_episodes,
                        metavar="K",
                        help="write the last K episodes' pairs to FILE's .val twin "
                             "(e.g. huanhuan.val.json) for evaluation (default: %(default)s)")
    parser.add_argument("--min-chars", type=count, default=PrepareRequest.min_chars,
                        metavar="N", help="drop replies shorter than N characters "
                                          "(default: %(default)s)")
    parser.add_argument("--max-chars", type=count, default=PrepareRequest.max_chars,
                        metavar="N", help="drop replies longer than N characters; 0: no "
                                          "limit (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset, then print what was read, written and skipped."""
    request = PrepareRequest(
        scripts=tuple(args.scripts),
        character=Character(args.character.strip(), tuple(a.strip() for a in args.alias)),
        output=args.output,
        format=args.format,
        history=args.history,
        val_episodes=args.val_episodes,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
    )
    print(prepare(request).render(args.format))
    return 0
