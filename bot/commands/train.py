"""``rolebot train``: fine-tune a new adapter version with the SFT core."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.commands import add_character, load_for
from bot.datasets import dataset_files
from training.canon import canon_path
from training.registry import Registry

DESCRIPTION = """\
Train a new LoRA adapter version for the configured character with the tutorial's recipe
(Unsloth FastLanguageModel, get_peft_model, TRL SFTTrainer; 4-bit on a CUDA GPU, Unsloth's
CPU fallback elsewhere). Every hyperparameter is a key of [model], [lora] and [training] in
the config. Short samples are packed into rows with a block-diagonal mask (no sample sees
another); the loss is on the character's replies only.

The run shows a progress bar and the loss per step, ends with the tutorial's memory and time
report, and writes adapters/<character>/<version>/ (weights, tokenizer, meta.json, loss.png),
which becomes the active version.

Without --data: [training] data, else the character's script (or the project's sample
script) prepared into data/<character>.json with its last episode held out for --val.

With [canon] train = true (off by default), each sample's prompt holds the [canon] k
exchanges of the screenplay most like it, never from its own scene, from the canon index
beside the pairs (FILE.canon.jsonl, written by `rolebot prepare`; pairs without one train
without canon); meta.json records it and the bot serves the version in the same format.
"""


def register(sub) -> None:
    parser = sub.add_parser("train", help="train a new adapter version", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_character(parser, "train")
    parser.add_argument("--data", type=Path, metavar="FILE", help="training pairs (Alpaca JSON or JSON lines)")
    parser.add_argument("--val", type=Path, metavar="FILE", help="held-out pairs: their NLL is reported and stored")
    parser.add_argument("--from", dest="parent", metavar="VERSION", help="continue from this adapter version ('active' for the active one)")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (overrides [training] max_steps)")
    steps.add_argument("--epochs", type=float, metavar="N", help="train for N epochs instead of a step count")
    parser.add_argument("--no-activate", action="store_true", help="write the version but keep the current one active")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_for(args)
    files = dataset_files(config)
    data = args.data or files.train
    val = args.val or (files.val if not args.data else None)
    if args.max_steps is not None:
        config.training.max_steps = max(1, args.max_steps)
    if args.epochs is not None:
        config.training.max_steps, config.training.epochs = 0, args.epochs
    registry = Registry(config.adapter_root, config.character.name)
    parent = None
    if args.parent:
        parent = registry.active() if args.parent == "active" else registry.get(args.parent)
    from training.sft import TrainJob, train

    result = train(TrainJob(
        data=data, val=val, model=config.model, lora=config.lora, train=config.training,
        style=config.prompt_style(training=True), registry=registry, parent=parent,
        canon=canon_path(data),
    ), activate=not args.no_activate)
    state = "active" if not args.no_activate else "not activated"
    print(f"Saved {result.version.path} ({state}); loss curve: {result.version.path / 'loss.png'}")
    return 0
