"""One subcommand per module; each exposes ``register(subparsers)`` and is wired in ``bot.cli``."""

import argparse


def count(text: str) -> int:
    """An argparse type: a whole number ≥ 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 0")
    return int(text)


def add_character(parser: argparse.ArgumentParser, what: str) -> None:
    """``--character NAME``: which member of a [[cast]] the command is for."""
    parser.add_argument("--character", metavar="NAME",
                        help=f"the cast member to {what}, by name or alias (a [[cast]] in config.toml; "
                             "default: the first)")


def load_for(args: argparse.Namespace):
    """config.toml as ``--character`` sees it (``Config.for_character``)."""
    from bot.config import load_config

    return load_config(args.config).for_character(getattr(args, "character", None))
