"""``rolebot chat``: the console front-end alone, through the same service as ``rolebot serve``.

Messages, replies and ratings (``+``/``-``) go to the database like any platform's; the prompt
is built within the token budget from the stored conversation. No web, Discord, Telegram or
retrain scheduler runs in this process, so it can run beside a bot.
"""

from __future__ import annotations

import argparse
import asyncio

from bot.app import ACTIVE, run_app
from bot.commands import add_character, load_for
from bot.platforms import Options
from bot.platforms.console import Console
from bot.service import Service


def register(sub) -> None:
    parser = sub.add_parser(
        "chat",
        help="chat with the character in the terminal",
        description="Chat with the configured character in the terminal: the console front-end "
        "of `rolebot serve` alone. Uses the base model plus the active adapter version (if one "
        "exists), through the same engine ([engine] backend) and service; replies stream token "
        "by token and are logged with their ratings in [store] path. + or - rates the last "
        "reply; r (or /retry) writes another reply to your last message; /stop typed while a reply "
        "prints stops it; /reset starts a new conversation, /help lists the commands, /quit or "
        "Ctrl-D leaves (Ctrl-C stops the bot).",
    )
    add_character(parser, "chat with")
    parser.add_argument("--once", metavar="TEXT", help="print one reply to TEXT and exit")
    parser.add_argument("--version", dest="adapter", metavar="V", help="use adapter version V instead of the active one")
    parser.add_argument("--no-adapter", action="store_true", help="chat with the base model alone")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_for(args)
    adapter = None if args.no_adapter else args.adapter or ACTIVE

    def console(service: Service, options: Options) -> list[Console]:
        return [Console(service, on_quit=options.on_quit, once=args.once)]

    asyncio.run(run_app(config, train=False, retraining=False, recover=False, adapter=adapter,
                        frontends=console))
    return 0
