"""``rolebot chat``: a streaming terminal chat with the character."""

from __future__ import annotations

import argparse
import sys

from bot.config import load_config
from bot.engine import active_version, load_model, stream_text
from training.prompts import Exchange, Sample, render_prompt


def register(sub) -> None:
    parser = sub.add_parser(
        "chat",
        help="chat with the character in the terminal",
        description="Chat with the configured character in the terminal. Uses the base model "
        "plus the active adapter version (if one exists). Replies stream token by token. "
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
        if args.adapter:
            from training.registry import Registry

            version = Registry(config.adapter_root, config.character.name).get(args.adapter)
        else:
            version = active_version(config)
    model, tokenizer = load_model(config, version)
    label = f"{config.character.name} ({version.name if version else 'base model, no adapter'})"
    if args.once is not None:
        print(f"({label})", file=sys.stderr)
        reply(config, model, tokenizer, args.once, ())
        return 0
    print(f"Chatting with {label}. /reset clears the history, /quit leaves.", file=sys.stderr)
    history: tuple[Exchange, ...] = ()
    while True:
        try:
            text = input("你：").strip()
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
        answer = reply(config, model, tokenizer, text, history)
        keep = config.generation.history_turns
        history = (history + (Exchange("用户", text), Exchange(config.character.name, answer)))[-keep:] if keep else ()


def reply(config, model, tokenizer, text: str, history: tuple[Exchange, ...]) -> str:
    prompt = render_prompt(
        Sample(instruction=text, history=history),
        tokenizer,
        fmt=config.model.prompt_format,
        persona=config.character.persona,
        character=config.character.name,
    )
    print(f"{config.character.name}：", end="", flush=True)
    parts = []
    for piece in stream_text(model, tokenizer, prompt, config.generation,
                             special_tokens=config.model.prompt_format != "chat"):
        parts.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(parts).strip()
