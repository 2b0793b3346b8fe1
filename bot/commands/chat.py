"""``rolebot chat``: a streaming terminal chat with the character, through the bot's engine."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bot.config import Config, load_config
from bot.engine import Engine, active_version, make_engine
from training.errors import UserError
from training.prompts import Exchange, Sample
from training.registry import Registry


def register(sub) -> None:
    parser = sub.add_parser(
        "chat",
        help="chat with the character in the terminal",
        description="Chat with the configured character in the terminal. Uses the base model "
        "plus the active adapter version (if one exists), through the same engine as "
        "`rolebot serve` ([engine] backend). Replies stream token by token. "
        "Type /reset to clear the history, /quit or Ctrl-D to leave.",
    )
    parser.add_argument("--once", metavar="TEXT", help="print one reply to TEXT and exit")
    parser.add_argument("--version", dest="adapter", metavar="V", help="use adapter version V instead of the active one")
    parser.add_argument("--no-adapter", action="store_true", help="chat with the base model alone")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    version = None
    if not args.no_adapter:
        registry = Registry(config.adapter_root, config.character.name)
        version = registry.get(args.adapter) if args.adapter else active_version(config)
    label = f"{config.character.name} ({version.name if version else 'base model, no adapter'})"
    return asyncio.run(session(config, make_engine(config, version), label, args.once))


async def session(config: Config, engine: Engine, label: str, once: str | None) -> int:
    await engine.start()
    try:
        if once is not None:
            print(f"({label})", file=sys.stderr)
            await reply(config, engine, once, ())
            return 0
        print(f"Chatting with {label}. /reset clears the history, /quit leaves.", file=sys.stderr)
        history: tuple[Exchange, ...] = ()
        while True:
            try:
                text = (await asyncio.to_thread(input, "你：")).strip()
            except EOFError:
                print()
                return 0
            if text in ("/quit", "/exit"):
                return 0
            if text == "/reset":
                history = ()
                print("(history cleared)", file=sys.stderr)
                continue
            if not text:
                continue
            answer = await reply(config, engine, text, history)
            keep = config.generation.history_turns
            history = (history + (Exchange("用户", text), Exchange(config.character.name, answer)))[-keep:] if keep else ()
    finally:
        await engine.close()


async def reply(config: Config, engine: Engine, text: str, history: tuple[Exchange, ...]) -> str:
    stream = engine.generate(engine.render(Sample(instruction=text, history=history)))
    print(f"{config.character.name}：", end="", flush=True)
    parts = []
    async for piece in stream:
        parts.append(piece)
        print(piece, end="", flush=True)
    print()
    if stream.stats and stream.stats.finish_reason == "error":
        raise UserError(f"no reply: {stream.error or 'the model failed'} — try /reset or a shorter message")
    return "".join(parts).strip()
