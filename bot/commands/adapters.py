"""``rolebot adapters``: list, inspect, activate and roll back adapter versions."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from bot.adapters import Adapters
from bot.commands import add_character, load_for
from training.registry import Registry

# This process cannot reach a bot that is running: say so, rather than let the user think the
# bot changed. A bot's own /rollback would then step back once more from what is active here.
RUNNING_BOT = ("A bot that is already running is not told: it keeps serving the version it "
               "loaded until it restarts. To change a running bot, use its /rollback "
               "(or POST /api/admin/rollback) instead.")


def register(sub) -> None:
    parser = sub.add_parser(
        "adapters",
        help="list, show, activate or roll back adapter versions",
        description="Manage the adapter store adapters/<character>/<version>/. The active version "
        "is what `rolebot chat` and `rolebot serve` load when they start; a bot already running "
        "is not told and keeps its version until it restarts: change a running bot through its "
        "admin commands (/rollback) instead.",
    )
    add_character(parser, "manage the adapters of (before ACTION)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="every version, oldest first, with its losses and metrics").set_defaults(run=list_versions)
    show = actions.add_parser("show", help="print a version's meta.json")
    show.add_argument("version", nargs="?", help="version name, e.g. v0003 (default: the active one)")
    show.set_defaults(run=show_version)
    activate = actions.add_parser("activate", help="make a version the active one")
    activate.add_argument("version", help="version name, e.g. v0003")
    activate.set_defaults(run=activate_version)
    actions.add_parser("rollback", help="return to the version that was active before").set_defaults(run=rollback)


def _registry(args) -> Registry:
    config = load_for(args)
    return Registry(config.adapter_root, config.character.name)


def list_versions(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = registry.versions()
    if not versions:
        print(f"No adapter versions of {registry.character} in {registry.root} yet; run `rolebot train`.")
        return 0
    active = registry.active()
    print(f"{'':2}{'version':<8} {'created':<16} {'parent':<7} {'steps':>5} {'loss':>7} {'val NLL':>8} {'samples/s':>9} "
          f"{'canon':>5}  {'fidelity (last rolebot eval, held-out)':<70}  data")
    for v in versions:
        meta = v.meta
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("created_at", 0)))
        mark = "* " if active and active.name == v.name else "  "
        trained_k = meta.get("config", {}).get("prompt", {}).get("canon_k", 0)
        print(f"{mark}{v.name:<8} {created:<16} {meta.get('parent_version') or '-':<7} {meta.get('steps', 0):>5} "
              f"{_num(meta.get('final_loss'))} {_num(meta.get('val_nll'), 8)} {_num(meta.get('samples_per_s'), 9)} "
              f"{trained_k:>5}  {fidelity(meta.get('eval') or {}):<70}  {meta.get('dataset', {}).get('file', '')}")
    print("* = active; canon: exchanges each training prompt held ([canon] k when [canon] train is on)")
    return 0


def fidelity(scores: dict) -> str:
    """The adapter's held-out numbers from its last `rolebot eval`, or '-' before one."""
    plain, canon = scores.get("adapter"), scores.get("adapter+canon")
    if not plain:
        return "-"
    with_canon = f"{canon['nll']:.4f}" if canon else "-"
    heard = f", in language {plain['language']:.0%}" if "language" in plain else ""
    return (f"NLL {plain['nll']:.4f}, +canon {with_canon}, chrF {plain['chrf']:.1f}, "
            f"confusion {plain.get('confusion', 0):.0%}{heard}")


def _num(value, width: int = 7) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def show_version(args: argparse.Namespace) -> int:
    registry = _registry(args)
    version = registry.get(args.version) if args.version else registry.active()
    if version is None:
        print(f"No active version of {registry.character}; run `rolebot train`.")
        return 1
    meta = {k: v for k, v in version.meta.items() if k != "losses"}
    print(f"{version.path}")
    print(json.dumps(meta, ensure_ascii=False, indent=2))
    return 0


def activate_version(args: argparse.Namespace) -> int:
    version = asyncio.run(Adapters(_registry(args)).activate(args.version))
    print(f"{version.name} is now active ({version.path}).")
    print(RUNNING_BOT)
    return 0


def rollback(args: argparse.Namespace) -> int:
    version = asyncio.run(Adapters(_registry(args)).rollback())
    print(f"Rolled back: {version.name} is active again.")
    print(RUNNING_BOT)
    return 0
