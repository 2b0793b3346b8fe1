"""``rolebot eval``: the base model and an adapter version side by side on held-out pairs."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bot.commands import add_character, load_for
from bot.datasets import dataset_files
from training.errors import UserError
from training.atomic import write_json_atomic
from training.registry import Registry

DESCRIPTION = """\
Score the base model and an adapter version on held-out pairs, side by side, each without and
with canon (the [canon] k exchanges of the screenplay most like each line, from the canon
index beside the training pairs) in the prompt:
  NLL        mean per-token negative log-likelihood of the real replies (lower is better)
  chrF       character n-gram F-score of greedy replies against the real ones (0-100)
  ROUGE-L    character-level longest-common-subsequence F1 (0-100)
  identity   share of identity probes ("你是谁？" …) answered in character
  breaks     share of replies that break character (claim to be an AI, an assistant …)
  confusion  share of replies that play another character of the script ("皇后：…",
             "我是华妃") or speak of the character in the third person ("甄嬛她…")
  language   share of replies in the script's language (for a Chinese script: at least 80%
             of the letters are CJK)
  scaffolding  share of replies that still show prompt structure ("### ", "Instruction:",
             special tokens, another speaker's "名字：" line) after the engine's filter
  cut        share of raw replies the engine's filter had to end early (the model ran on
             into scaffolding, another turn or its persona): what the filter hides
  length     mean reply length in characters, against the script's real replies
Replies are scored as a user hears them: cleaned by the same filter as the engine's stream
(training/hygiene.py). NLL per character is comparable across base models with different
tokenizers; NLL per token is not.
Held-out pairs are whole episodes that neither the adapter nor the canon index saw:
`rolebot prepare --val-episodes K` writes them to the .val file. The table is stored in the
version's meta.json under "eval"; `rolebot adapters list` shows it.
"""


def register(sub) -> None:
    parser = sub.add_parser("eval", help="compare the base model and an adapter on held-out pairs",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_character(parser, "evaluate")
    parser.add_argument("--version", metavar="V", help="adapter version (default: the active one)")
    parser.add_argument("--val", type=Path, metavar="FILE", help="held-out pairs (default: the version's validation file)")
    parser.add_argument("--limit", type=int, default=50, metavar="N", help="pairs to generate greedy replies for (NLL uses all; default 50)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_for(args)
    registry = Registry(config.adapter_root, config.character.name)
    version = registry.get(args.version) if args.version else registry.active()
    if version is None:
        raise UserError(f"no adapter version of {config.character.name} yet — run `rolebot train` first")
    val = args.val or _val_file(version.meta) or dataset_files(config, quiet=True).val
    if val is None:
        raise UserError("no held-out pairs: pass --val FILE (e.g. from `rolebot prepare --val-episodes 1`)")
    from training.canon import CanonIndex, served_canon
    from training.dataset import load_samples
    from training.evaluate import compare
    from training.modeling import attach_adapter, load_base, unsloth

    samples = load_samples(val)
    k, max_tokens = served_canon(version.meta, config.canon.k, config.canon.max_tokens)
    if k == 0 and config.canon.k:  # trained without canon: still show what canon would do
        k, max_tokens = config.canon.k, config.canon.max_tokens
    index = CanonIndex.load(_canon_file(version.meta, config)) if k else None
    style = dataclasses.replace(config.prompt_style(), canon_k=k, canon_max_tokens=max_tokens)
    FastLanguageModel = unsloth()
    model, tokenizer = load_base(config.model)
    model = attach_adapter(model, str(version.path))
    FastLanguageModel.for_inference(model)
    names = (config.character.name, *config.character.aliases)
    rows = compare(model, tokenizer, samples, style, names, max_len=config.model.max_seq_length,
                   max_new_tokens=config.generation.max_new_tokens, limit=max(1, args.limit), canon=index,
                   stops=tuple(config.generation.stop),
                   cast=tuple(n for m in config.members if m.name != config.character.name for n in m.names))
    order = ("base", "base+canon", "adapter", "adapter+canon")
    scores = {name: rows[name].as_dict() for name in order if name in rows}
    canon_note = f"; canon: {k} exchanges from {index.path}" if index else "; canon off ([canon] k = 0)"
    print(f"Held-out pairs: {val} ({len(samples)} pairs; replies generated for {min(len(samples), args.limit)}){canon_note}")
    print(table(scores, version.name))
    meta = {**version.meta, "eval": {"val_file": str(val), "canon_index": str(index.path) if index else None,
                                     "canon_k": k, **scores}}
    write_json_atomic(version.path / "meta.json", meta)
    return 0


def _val_file(meta: dict) -> Path | None:
    name = meta.get("dataset", {}).get("val_file")
    return Path(name) if name and Path(name).exists() else None


def _canon_file(meta: dict, config) -> Path:
    """The index the version trained with, else the one beside its pairs, else the config's."""
    from training.canon import canon_path

    if (meta.get("canon") or {}).get("index"):
        return Path(meta["canon"]["index"])
    if meta.get("dataset", {}).get("file"):
        return canon_path(Path(meta["dataset"]["file"]))
    return dataset_files(config, quiet=True).canon


ROWS = [("nll", "NLL per token ↓", "{:.4f}"), ("nll_char", "NLL per character ↓", "{:.4f}"),
        ("chrf", "chrF ↑", "{:.2f}"), ("rouge_l", "ROUGE-L ↑", "{:.2f}"),
        ("identity", "in character on identity probes ↑", "{:.0%}"), ("breaks", "replies breaking character ↓", "{:.0%}"),
        ("confusion", "replies in another's role ↓", "{:.0%}"), ("language", "replies in the script's language ↑", "{:.0%}"),
        ("scaffolding", "replies showing scaffolding ↓", "{:.0%}"), ("cut", "raw replies cut short by the filter", "{:.0%}"),
        ("length", "mean reply length (characters)", "{:.1f}"), ("script_length", "mean length in the script", "{:.1f}")]


def table(scores: dict[str, dict], name: str) -> str:
    """One column per row of ``scores`` (base, adapter, each ±canon); the adapter's by its name."""
    heads = {key: key.replace("adapter", name) for key in scores}
    width = max(12, *(len(h) + 2 for h in heads.values()))
    lines = [f"{'metric':<36}" + "".join(f"{heads[key]:>{width}}" for key in scores)]
    for key, label, fmt in ROWS:
        cells = "".join(f"{fmt.format(s[key]) if key in s else '-':>{width}}" for s in scores.values())
        lines.append(f"{label:<36}{cells}")
    return "\n".join(lines)
