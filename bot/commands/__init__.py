"""One subcommand per module; each exposes ``register(subparsers)`` and is wired in ``bot.cli``."""

import argparse


def count(text: str) -> int:
    """An argparse type: a whole number ≥ 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ≥ 0")
    return int(text)
