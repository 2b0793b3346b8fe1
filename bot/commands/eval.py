"""``rolebot eval``: the base model and an adapter version side by side on held-out pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.config import load_config
from bot.datasets import dataset_files
from training.errors import UserError
from training.atomic import write_json_atomic
from training.registry import Registry

DESCRIPTION = """\
Score the base model and an adapter version on held-out pairs, side by side:
  NLL       mean per-token negative log-likelihood of the reference replies (lower is better)
  chrF      character n-gram F-score of greedy replies against the references (0-100)
  ROUGE-L   character-level longest-common-subsequence F1 (0-100)
  identity  share of identity probes ("你是谁？" …) answered in character
  breaks    share of replies that break character (claim to be an AI, an assistant …)
The adapter's numbers are stored in its meta.json under "eval".
"""


def register(sub) -> None:
    parser = sub.add_parser("eval", help="compare the base model and an adapter on held-out pairs",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", metavar="V", help="adapter version (default: the active one)")
    parser.add_argument("--val", type=Path, metavar="FILE", help="held-out pairs (default: the version's validation file)")
    parser.add_argument("--limit", type=int, default=50, metavar="N", help="pairs to generate greedy replies for (NLL uses all; default 50)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    registry = Registry(config.adapter_root, config.character.name)
    version = registry.get(args.version) if args.version else registry.active()
    if version is None:
        raise UserError(f"no adapter version of {config.character.name} yet — run `rolebot train` first")
    val = args.val or _val_file(version.meta) or dataset_files(config, quiet=True).val
    if val is None:
        raise UserError("no held-out pairs: pass --val FILE (e.g. from `rolebot prepare --val-episodes 1`)")
    from training.dataset import load_samples
    from training.evaluate import compare
    from training.modeling import attach_adapter, load_base, unsloth

    samples = load_samples(val)
    FastLanguageModel = unsloth()
    model, tokenizer = load_base(config.model)
    model = attach_adapter(model, str(version.path))
    FastLanguageModel.for_inference(model)
    names = (config.character.name, *config.character.aliases)
    base, tuned = compare(model, tokenizer, samples, config.prompt_style(), names, max_len=config.model.max_seq_length,
                          max_new_tokens=config.generation.max_new_tokens, limit=max(1, args.limit))
    print(f"Held-out pairs: {val} ({len(samples)} pairs; replies generated for {min(len(samples), args.limit)})")
    print(table(base.as_dict(), tuned.as_dict(), version.name))
    meta = {**version.meta, "eval": {"val_file": str(val), "base": base.as_dict(), "adapter": tuned.as_dict()}}
    write_json_atomic(version.path / "meta.json", meta)
    return 0


def _val_file(meta: dict) -> Path | None:
    name = meta.get("dataset", {}).get("val_file")
    return Path(name) if name and Path(name).exists() else None


ROWS = [("nll", "NLL ↓", "{:.4f}"), ("chrf", "chrF ↑", "{:.2f}"), ("rouge_l", "ROUGE-L ↑", "{:.2f}"),
        ("identity", "in character on identity probes ↑", "{:.0%}"), ("breaks", "replies breaking character ↓", "{:.0%}")]


def table(base: dict, tuned: dict, name: str) -> str:
    lines = [f"{'metric':<36}{'base':>10}{name:>10}"]
    for key, label, fmt in ROWS:
        lines.append(f"{label:<36}{fmt.format(base[key]):>10}{fmt.format(tuned[key]):>10}")
    return "\n".join(lines)
