"""``rolebot serve``: the bot on every front-end config.toml enables, in one process."""

from __future__ import annotations

import argparse
import asyncio

from bot.app import run_app
from bot.config import load_config

DESCRIPTION = """\
Serve the configured character from one asyncio process: the local web chat (page, an
OpenAI-compatible /v1/chat/completions, ratings and an admin API) and, when run in a terminal,
the console; Discord and Telegram when their bot tokens are set. Every message, reply and
rating goes to the SQLite database in [store] path. /retrain, /rollback and the [scheduler]
job retrain and hot-swap the adapter in the running bot.

If the character has no adapter version yet, serve first prepares its script (or the
project's sample script) and trains one, showing the progress, then serves it.

Ctrl-C or SIGTERM stops the bot cleanly: replies in flight finish or are marked interrupted,
and the database is closed.
"""


def register(sub) -> None:
    parser = sub.add_parser("serve", help="run the bot (web chat, console, Discord, Telegram)",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", metavar="H", help="address of the web chat (overrides [web] host)")
    parser.add_argument("--port", metavar="P", type=port, help="port of the web chat (overrides [web] port; 0: any free port)")
    parser.add_argument("--no-train", action="store_true",
                        help="with no adapter version yet, serve the base model instead of training one first")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    asyncio.run(run_app(config, host=args.host, port=args.port, train=not args.no_train))
    return 0


def port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)
