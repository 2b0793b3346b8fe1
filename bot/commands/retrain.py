"""``rolebot retrain``: one retrain cycle from the command line (the bot's own code path)."""

from __future__ import annotations

import argparse
import asyncio

from bot.commands import add_character, load_for
from bot.retrain import Retrainer
from bot.status import data_text
from bot.store import Store

DESCRIPTION = """\
Run one retrain cycle now, exactly as the bot's scheduler or an admin's /retrain does: replies
rated 👍 in the database become training samples (with the prompt the bot used), mixed with the
original pairs ([retrain] replay_ratio); the SFT core trains a new version from the active one
in a subprocess; the gate compares it with the active version on held-out data; a version that
passes becomes active. A bot already running is not told: it serves the version it loaded
until it restarts; for live hot-swapping use the bot's /retrain instead.

For cron: `rolebot retrain --if-due` does nothing unless [scheduler] min_new_ratings new rated
replies are waiting.
"""


def register(sub) -> None:
    parser = sub.add_parser("retrain", help="run one retrain cycle from the rated logs",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_character(parser, "retrain")
    parser.add_argument("--if-due", action="store_true", help="only when enough new ratings are waiting")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    config = load_for(args)
    if args.if_due and not args.character and len(config.members) > 1:
        # cron's `rolebot retrain --if-due` goes through the cast, one character at a time
        codes = []
        for member in config.members:
            args.character = member.name
            codes.append(await _run(args))
        args.character = None
        return max(codes)
    async with Store.open(config.database) as store:
        retrainer = Retrainer(config, store, echo=True)
        await retrainer.load_last_run()
        waiting = await retrainer.new_ratings()
        if args.if_due and waiting < config.scheduler.min_new_ratings:
            print(f"{config.character.name}: not due: {waiting} new rated replies, "
                  f"{config.scheduler.min_new_ratings} needed ([scheduler] min_new_ratings).")
            return 0
        run = await retrainer.request(trigger="cli", requested_by="cli")
        print(f"Retrain run {run.id} started.")
        finished = await retrainer.wait()
    print(f"Run {finished.id} {finished.status}: {finished.reason}")
    if data := data_text(finished.metrics):
        print(f"Trained on {data}.")
    return 0 if finished.status == "succeeded" else 1
