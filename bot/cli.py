"""The ``rolebot`` command line: one subcommand per module in ``bot.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bot import __version__
from bot.logs import redact_handlers
from training.errors import UserError

# Each name is a module in bot/commands with ``register(subparsers)``.
COMMANDS = ["prepare", "train", "eval", "adapters", "chat", "serve", "retrain", "status", "augment", "card", "keys", "sessions"]

DESCRIPTION = """\
rolebot turns a screenplay into a LoRA fine-tune of a small or 4-bit base model and serves
that character on Discord, Telegram and a local web chat, logging every exchange and rating
to SQLite and retraining from the rated logs.

Typical flow:
  rolebot prepare script.txt --character 甄嬛 --output data/huanhuan.json
  rolebot train --data data/huanhuan.json
  rolebot chat
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rolebot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rolebot {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="config file (default: $ROLEBOT_CONFIG, else ./config.toml if present, "
        "else the built-in defaults)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"bot.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries log chatter at INFO; rolebot's own loggers say what the user needs.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("bot", "training"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    redact_handlers()  # no token, key or cookie in any line rolebot writes
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"rolebot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rolebot: interrupted", file=sys.stderr)
        return 130
