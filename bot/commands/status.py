"""``rolebot status``: each character's active version and the ratings waiting for its retrain."""

from __future__ import annotations

import argparse
import asyncio

from bot.commands import add_character
from bot.config import load_config
from bot.retrain import Retrainer
from bot.store import Store
from training.registry import Registry

DESCRIPTION = """\
Show, for every character of the cast (or --character's), the adapter version it serves, its
versions, the rated replies waiting for its next retrain ([scheduler] min_new_ratings are
needed for a scheduled one) and its last training run, from the adapter store and the bot's
database. It reads what a running bot writes; it needs no model. A running bot's own view, with
the engine's, is /status (admins) and GET /api/admin/status.
"""


def register(sub) -> None:
    parser = sub.add_parser("status", help="each character's active version and pending ratings",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_character(parser, "show")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    members = [config.member(args.character)] if args.character else config.members
    needed = config.scheduler.min_new_ratings
    async with Store.open(config.database) as store:
        for member in members:
            view = config.for_character(member.name)
            registry = Registry(config.adapter_root, member.name)
            active = registry.active()
            versions = registry.versions()
            retrainer = Retrainer(view, store)
            await retrainer.load_last_run()
            waiting = await retrainer.new_ratings()
            last = retrainer.last_run
            print(f"{member.name}: serving {active.name if active else 'the base model (no adapter)'}; "
                  f"{len(versions)} version{'s' if len(versions) != 1 else ''}"
                  + (f" ({', '.join(v.name for v in versions[-5:])}{', …' if len(versions) > 5 else ''})" if versions else ""))
            print(f"  ratings waiting for the next retrain: {waiting} ({needed} start a scheduled one)")
            print("  last run: " + (f"{last.id} {last.status}" + (f" ({last.reason})" if last.reason else "")
                                    if last else "none"))
    return 0
