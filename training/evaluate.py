"""Is an adapter better? Held-out NLL, chrF and ROUGE-L of greedy replies, identity probes,
character breaks and role confusion, and what a user hears (replies in the script's language,
scaffolding, length against the script's), for the base model and the adapter side by side,
each with and without canon in the prompt. The retrain gate reuses its NLL and hygiene.

Replies are scored as the engine's stream would show them: through ``training.hygiene``'s
filter. ``cut`` counts the raw replies the filter had to end early (the model ran into
scaffolding or another turn); ``scaffolding`` what a user would still see of it."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace

from training.canon import CanonIndex, with_canon
from training.character import IDENTITY_PROBES, answers_in_character, breaks_character, role_confusion
from training.hygiene import Hygiene, clean, has_scaffolding, in_language, script_language
from training.packing import Collator, encode
from training.prompts import USER_SPEAKER, PromptStyle, Sample


@dataclass(frozen=True)
class Scores:
    nll: float  # mean per-token NLL of the reference replies
    chrf: float  # 0..100
    rouge_l: float  # 0..100, character level
    identity: float  # share of identity probes answered in character, 0..1
    breaks: float  # share of replies (val + probes) that break character, 0..1
    pairs: int
    # share of replies (val + probes) that play another character of the script, 0..1
    confusion: float = 0.0
    # what a user hears (val + probes): in the script's language, scaffolding still shown,
    # raw replies the hygiene filter had to cut short, mean length in characters
    language: float = 0.0
    scaffolding: float = 0.0
    cut: float = 0.0
    length: float = 0.0
    script_length: float = 0.0  # mean length of the real replies, for comparison
    nll_char: float = 0.0  # summed NLL over the real replies' characters: comparable across tokenizers

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def token_nlls(model, tokenizer, samples: list[Sample], style: PromptStyle, max_len: int, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL, reply tokens) per sample, teacher-forced, loss on the reply only."""
    import torch

    os.environ["UNSLOTH_RETURN_LOGITS"] = "1"  # Unsloth otherwise skips logits to save memory
    encoded, _ = encode(samples, tokenizer, style, max_len, "truncate")
    collate = Collator(tokenizer.pad_token_id)
    # Batches of like lengths: a prompt with canon is twice one without, and padding costs as
    # much as tokens. Results come back in the samples' order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [encoded[i] for i in rows]
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels, "seq_lengths": [len(e.input_ids)]} for e in chunk])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
        ) * (labels >= 0)
        for row, i in enumerate(rows):
            results[i] = (losses[row].sum().item(), int((labels[row] >= 0).sum().item()))
    return results


def mean_nll(model, tokenizer, samples, style: PromptStyle, max_len: int) -> float:
    pairs = token_nlls(model, tokenizer, samples, style, max_len)
    return sum(n for n, _ in pairs) / max(1, sum(t for _, t in pairs))


@dataclass(frozen=True)
class Heard:
    """Greedy replies as raw text and as the engine's stream shows them."""

    raw: list[str]
    shown: list[str]
    cuts: list[str | None]


def heard_replies(model, tokenizer, samples: list[Sample], style: PromptStyle, hygiene: Hygiene,
                  max_new_tokens: int) -> Heard:
    """Greedy replies to ``samples``' prompts, and what a user would hear of each."""
    prompts = [style.prompt(s, tokenizer) for s in samples]
    raw = greedy_replies(model, tokenizer, prompts, max_new_tokens, add_special=style.fmt != "chat")
    cleaned = [clean(r, hygiene) for r in raw]
    return Heard(raw, [c[0] for c in cleaned], [c[1] for c in cleaned])


def hygiene_of(heard: Heard, language: str, speakers: tuple[str, ...] = ()) -> dict[str, float]:
    """Shares of replies in ``language``, with scaffolding shown, and cut short; mean length."""
    n = max(1, len(heard.shown))
    return {
        "language": sum(in_language(r, language) for r in heard.shown) / n,
        "scaffolding": sum(has_scaffolding(r, speakers) for r in heard.shown) / n,
        "cut": sum(c is not None and c != "stop" for c in heard.cuts) / n,
        "length": sum(len(r) for r in heard.shown) / n,
    }


def greedy_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8, add_special: bool = True) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    replies = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=add_special).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    return replies


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """Character n-gram F-score (Popović 2015), whitespace ignored; 0..100."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not h or not r:
            continue
        overlap = sum((h & r).values())
        precisions.append(overlap / sum(h.values()))
        recalls.append(overlap / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 0.0 if p + r == 0 else 100 * (1 + beta**2) * p * r / (beta**2 * p + r)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 over characters (Chinese has no spaces to split words on); 0..100."""
    a, b = list("".join(hypothesis.split())), list("".join(reference.split()))
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 100 * 2 * p * r / (p + r)


def score(model, tokenizer, samples: list[Sample], probes: list[Sample], style: PromptStyle, names: tuple[str, ...], *,
          max_len: int, max_new_tokens: int, limit: int, others: tuple[str, ...] = (),
          hygiene: Hygiene | None = None) -> Scores:
    """Every metric for whatever adapter is currently enabled on ``model``, the prompts as the
    samples and identity probes hold them (with their canon, if any). ``others``: the
    script's other speakers, for role confusion; ``hygiene``: what replies are cleaned of (by
    default the stop ``###``, the names, ``others`` and the style's persona)."""
    hygiene = hygiene or Hygiene(stops=("###",), names=names, speakers=others, persona=style.persona)
    pairs = token_nlls(model, tokenizer, samples, style, max_len)
    nll = sum(n for n, _ in pairs) / max(1, sum(t for _, t in pairs))
    chars = sum(len(s.output) for s in samples)
    shown = samples[:limit]
    replies = heard_replies(model, tokenizer, shown, style, hygiene, max_new_tokens)
    answers = heard_replies(model, tokenizer, probes, style, hygiene, max_new_tokens)
    everything = Heard(replies.raw + answers.raw, replies.shown + answers.shown, replies.cuts + answers.cuts)
    heard = everything.shown
    language = script_language([s.output for s in samples])
    return Scores(
        nll=nll if math.isfinite(nll) else float("inf"),
        chrf=sum(chrf(h, s.output) for h, s in zip(replies.shown, shown)) / max(1, len(shown)),
        rouge_l=sum(rouge_l(h, s.output) for h, s in zip(replies.shown, shown)) / max(1, len(shown)),
        identity=sum(answers_in_character(p, names) for p in answers.shown) / max(1, len(answers.shown)),
        breaks=sum(breaks_character(r) for r in heard) / max(1, len(heard)),
        pairs=len(samples),
        confusion=sum(role_confusion(r, names, others) for r in heard) / max(1, len(heard)),
        **hygiene_of(everything, language, others),
        script_length=chars / max(1, len(samples)),
        nll_char=sum(n for n, _ in pairs) / max(1, chars) if math.isfinite(nll) else float("inf"),
    )


def compare(model, tokenizer, samples, style: PromptStyle, names, *, max_len: int, max_new_tokens: int, limit: int,
            canon: CanonIndex | None = None, stops: tuple[str, ...] = ("###",),
            cast: tuple[str, ...] = ()) -> dict[str, Scores]:
    """Scores from one loaded PeftModel (the base is the adapter disabled): rows ``base`` and
    ``adapter``, and with a canon index and ``style.canon_k`` > 0 also ``base+canon`` and
    ``adapter+canon``, whose prompts hold the k exchanges retrieved for each sample. ``cast``:
    the names and aliases of the other characters the bot plays; a reply that speaks as one of
    them is role confusion, as one that speaks as another speaker of the script."""
    kwargs = dict(max_len=max_len, max_new_tokens=max_new_tokens, limit=limit)
    probes = [Sample(q) for q in IDENTITY_PROBES]
    plain = replace(style, canon_k=0)
    variants = {"": (plain, samples, probes)}
    others: tuple[str, ...] = tuple(n for n in cast if n not in names)
    if canon is not None:
        others = tuple(dict.fromkeys(others + canon.speakers(tuple(names))))
        if style.canon_k:
            def count(text: str) -> int:
                return len(tokenizer(text, add_special_tokens=False)["input_ids"])

            variants["+canon"] = (style, with_canon(samples, canon, style, count), with_canon(probes, canon, style, count))
    hygiene = Hygiene(stops=tuple(stops), names=tuple(names), speakers=(USER_SPEAKER, *others), persona=style.persona)
    rows: dict[str, Scores] = {}
    for suffix, (variant, held, asked) in variants.items():
        with model.disable_adapter():
            rows["base" + suffix] = score(model, tokenizer, held, asked, variant, names, others=others,
                                          hygiene=hygiene, **kwargs)
        rows["adapter" + suffix] = score(model, tokenizer, held, asked, variant, names, others=others,
                                         hygiene=hygiene, **kwargs)
    return rows
