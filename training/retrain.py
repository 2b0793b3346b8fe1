"""One retrain cycle's training side: rated logs → dataset, SFT (same core), gate.

It runs as a subprocess of the bot (``python -m training.retrain JOB.json``): its own CUDA
context, killable on timeout, and a crash there never takes the bot down. The bot reads the
result file and decides promotion; this module never activates anything.
"""

from __future__ import annotations

import argparse
import random
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.atomic import write_json_atomic
from training.canon import canon_path, for_training, training_index
from training.character import IDENTITY_PROBES
from training.dataset import load_samples
from training.errors import UserError
from training.hygiene import Hygiene, script_language
from training.logs import PreferencePair, RatedReply, open_snapshot
from training.prompts import PromptStyle, Sample
from training.registry import Registry, Version
from training.retrain_job import RetrainJob, RetrainResult, read_job, write_result
from training.settings import ModelSettings


@dataclass(frozen=True)
class RetrainData:
    """What a cycle trains on and what its gate judges with."""

    train_file: Path
    liked: int
    disliked: int
    replayed: int
    heldout_up: tuple[Sample, ...]
    heldout_down: tuple[Sample, ...]
    disliked_samples: tuple[Sample, ...]  # kept for a preference (KTO) stage
    pairs: tuple[PreferencePair, ...] = ()  # (chosen, rejected) alternatives for a DPO stage

    def report(self) -> dict:
        """The counts a run reports (meta.json, the run's metrics, /status)."""
        return {"liked": self.liked, "disliked": self.disliked, "replayed": self.replayed,
                "pairs": len(self.pairs)}


def as_sample(reply: RatedReply) -> Sample:
    return Sample(instruction=reply.user_text, output=reply.text, prompt=reply.prompt)


def build_data(db: Path, original: Path, out: Path, *, replay_ratio: float, seed: int, holdout: float = 0.2,
               character: str | None = None, first: bool = True) -> RetrainData:
    """Net-👍 replies become samples with the prompt the bot used, mixed with ``replay_ratio``
    original pairs per reply so the character does not drift; the latest ``holdout`` share of
    rated replies is kept back for the gate (time-ordered, never trained on), and so are the
    preference pairs with a reply in it. With ``character``, only that cast member's replies
    (``first``: with the conversations from before the cast)."""
    with open_snapshot(db, character, first) as snapshot:
        rated = snapshot.rated_replies()
        pairs = snapshot.preference_pairs()
    rated = [r for r in rated if r.score != 0]
    kept_back = max(0, int(len(rated) * holdout)) if len(rated) >= 5 else 0
    train_part, held = rated[: len(rated) - kept_back], rated[len(rated) - kept_back:]
    held_ids = {r.message_id for r in held}
    pairs = [p for p in pairs if not {p.chosen_id, p.rejected_id} & held_ids]
    liked = [as_sample(r) for r in train_part if r.score > 0]
    disliked = [as_sample(r) for r in train_part if r.score < 0]
    originals = load_samples(original)
    count = min(len(originals), round(replay_ratio * len(liked)))
    replay = random.Random(seed).sample(originals, count)
    records = [{"instruction": s.instruction, "input": s.input, "output": s.output, "source": "script"} for s in replay]
    records += [{"instruction": s.instruction or "…", "input": "", "output": s.output, "prompt": s.prompt,
                 "source": "rated"} for s in liked]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, records)
    return RetrainData(
        train_file=out, liked=len(liked), disliked=len(disliked), replayed=len(replay),
        heldout_up=tuple(as_sample(r) for r in held if r.score > 0),
        heldout_down=tuple(as_sample(r) for r in held if r.score < 0),
        disliked_samples=tuple(disliked), pairs=tuple(pairs),
    )


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    metrics: dict = field(default_factory=dict)


def gate(model_settings: ModelSettings, style: PromptStyle, active: Path | None, candidate: Path,
         val: list[Sample], up: tuple[Sample, ...], down: tuple[Sample, ...], tolerance: float,
         canon: Path | None = None, hygiene: Hygiene | None = None, probes: int = 0,
         hygiene_tolerance: float = 0.0) -> Verdict:
    """The candidate must not lose more than ``tolerance`` (relative) held-out NLL, must rank
    held-out 👍 replies above 👎 ones at least as often as the active adapter does, and (with
    ``probes``) must not be worse than it on what a user hears: greedy replies to ``probes``
    prompts (half held-out lines, half identity probes), cleaned by ``hygiene``, in the script's language,
    showing scaffolding, cut short by the filter (each within ``hygiene_tolerance``). The
    held-out prompts hold canon as the candidate's training prompts did."""
    from training.evaluate import token_nlls
    from training.modeling import attach_adapter, load_base

    model, tokenizer = load_base(model_settings)
    val = for_training(training_index(canon, style), style, tokenizer, val, [])[0]
    model = attach_adapter(model, str(candidate), name="candidate")
    if active is not None:
        model.load_adapter(str(active), adapter_name="active")
    max_len = model_settings.max_seq_length

    def measure(name: str) -> tuple[float, float | None]:
        if name == "active" and active is None:
            with model.disable_adapter():
                return measure_current()
        model.set_adapter(name)
        return measure_current()

    def measure_current() -> tuple[float, float | None]:
        sums = token_nlls(model, tokenizer, val, style, max_len)
        nll = sum(s for s, _ in sums) / max(1, sum(n for _, n in sums))
        if not up or not down:
            return nll, None
        per_up = [s / max(1, n) for s, n in token_nlls(model, tokenizer, list(up), style, max_len)]
        per_down = [s / max(1, n) for s, n in token_nlls(model, tokenizer, list(down), style, max_len)]
        wins = sum(u < d for u in per_up for d in per_down)
        return nll, wins / (len(per_up) * len(per_down))

    def heard(name: str) -> dict[str, float] | None:
        if not probes or hygiene is None:
            return None
        from training.evaluate import heard_replies, hygiene_of

        asked = val[:probes - probes // 2] + [Sample(q) for q in IDENTITY_PROBES[:probes // 2]]
        language = script_language([s.output for s in val])
        if name == "active" and active is None:
            with model.disable_adapter():
                replies = heard_replies(model, tokenizer, asked, style, hygiene, HYGIENE_TOKENS)
        else:
            model.set_adapter(name)
            replies = heard_replies(model, tokenizer, asked, style, hygiene, HYGIENE_TOKENS)
        return {k: round(v, 4) for k, v in hygiene_of(replies, language, hygiene.speakers).items()}

    old_nll, old_pref = measure("active")
    new_nll, new_pref = measure("candidate")
    old_heard, new_heard = heard("active"), heard("candidate")
    metrics = {"val_nll_active": round(old_nll, 4), "val_nll_candidate": round(new_nll, 4),
               "preference_active": old_pref, "preference_candidate": new_pref,
               "heldout_up": len(up), "heldout_down": len(down),
               "hygiene_active": old_heard, "hygiene_candidate": new_heard}
    limit = old_nll * (1 + tolerance)
    if new_nll > limit:
        return Verdict(False, f"held-out NLL {new_nll:.4f} is worse than the active {old_nll:.4f} "
                              f"by more than {tolerance:.0%}", metrics)
    if new_pref is not None and new_pref < old_pref:
        return Verdict(False, f"ranks 👍 above 👎 replies in {new_pref:.0%} of held-out pairs, "
                              f"the active adapter in {old_pref:.0%}", metrics)
    if old_heard is not None and new_heard is not None:
        worse = hygiene_worse(old_heard, new_heard, hygiene_tolerance)
        if worse:
            return Verdict(False, f"worse than the active adapter on what a user hears: {worse}", metrics)
    why = "no held-out 👍/👎 pairs to compare" if new_pref is None else f"👍>👎 in {new_pref:.0%} vs {old_pref:.0%}"
    if new_heard is not None:
        why += f"; replies in the script's language {new_heard['language']:.0%} vs {old_heard['language']:.0%}"
    return Verdict(True, f"held-out NLL {old_nll:.4f} → {new_nll:.4f}; {why}", metrics)


# New tokens of the gate's greedy replies: enough to see a reply run on past its turn.
HYGIENE_TOKENS = 48


def hygiene_worse(active: dict[str, float], candidate: dict[str, float], tolerance: float) -> str:
    """What the candidate does worse than the active adapter on what a user hears ("" if nothing):
    fewer replies in the script's language, more showing scaffolding, more cut short."""
    worse = []
    if candidate["language"] < active["language"] - tolerance:
        worse.append(f"replies in the script's language {candidate['language']:.0%} against {active['language']:.0%}")
    if candidate["scaffolding"] > active["scaffolding"] + tolerance:
        worse.append(f"replies showing scaffolding {candidate['scaffolding']:.0%} against {active['scaffolding']:.0%}")
    if candidate["cut"] > active["cut"] + tolerance:
        worse.append(f"replies the filter cut short {candidate['cut']:.0%} against {active['cut']:.0%}")
    return "; ".join(worse)


def run_job(job: RetrainJob) -> RetrainResult:
    """Everything the subprocess does, from the job file the bot wrote."""
    from training.sft import TrainJob, train

    registry = Registry(job.adapters, job.character)
    parent = registry.get(job.parent) if job.parent else None
    data = build_data(job.db, job.original, job.data_file, replay_ratio=job.replay_ratio, seed=job.train.seed,
                      character=job.character, first=job.first)
    if data.liked == 0:
        raise UserError("no 👍-rated replies to learn from yet (outside the held-out share)")
    result = train(TrainJob(
        data=data.train_file, model=job.model, lora=job.lora, train=job.train, style=job.style,
        registry=registry, val=job.val, parent=parent, trigger=job.trigger, canon=canon_path(job.original),
        notes={"retrain": {"run_id": job.run_id, **data.report()}},
    ), activate=False)
    candidate, skipped = preference_stage(job, registry, result.version, data)
    val = load_samples(job.val) if job.val else load_samples(job.original)[:64]
    verdict = gate(job.model, job.style, parent.path if parent else None, candidate.path, val,
                   data.heldout_up, data.heldout_down, job.tolerance, canon=canon_path(job.original),
                   hygiene=job.hygiene, probes=job.hygiene_probes, hygiene_tolerance=job.hygiene_tolerance)
    meta = {**candidate.meta, "gate": asdict(verdict)}
    write_json_atomic(candidate.path / "meta.json", meta)
    return RetrainResult(
        version=candidate.name, passed=verdict.passed,
        reason=verdict.reason + (f"; {skipped}" if skipped else ""),
        metrics={**verdict.metrics, **data.report(), "final_loss": result.final_loss,
                 "runtime_s": round(result.runtime_s, 1)})


def preference_stage(job: RetrainJob, registry: Registry, candidate: Version,
                     data: RetrainData) -> tuple[Version, str | None]:
    """[retrain] preference after SFT: the stage's version, or the SFT candidate and why the
    stage was skipped (nothing to learn a preference from yet)."""
    if job.preference == "kto":
        if not data.disliked_samples:
            return candidate, "KTO stage skipped: no 👎-rated replies to learn from yet"
        from training.kto import kto_stage

        liked = [s for s in load_samples(data.train_file) if s.prompt]
        return kto_stage(job.model, job.lora, job.train, job.style, registry,
                         candidate, liked, list(data.disliked_samples), job.train.max_steps), None
    if job.preference == "dpo":
        if not data.pairs:
            return candidate, ("DPO stage skipped: no preference pairs yet (a regenerated reply "
                               "the user kept or rated 👍 against one swiped away or rated 👎)")
        from training.dpo import dpo_stage

        print(f"retrain: DPO on {len(data.pairs)} preference pairs", file=sys.stderr)
        return dpo_stage(job.model, job.lora, job.train, registry, candidate, list(data.pairs),
                         job.train.max_steps), None
    return candidate, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.retrain", description="one retrain cycle (run by the bot)")
    parser.add_argument("job", type=Path, help="the job file the bot wrote")
    args = parser.parse_args(argv)
    job = read_job(args.job)
    try:
        result = run_job(job)
    except UserError as exc:
        write_result(RetrainResult(error=str(exc)), job.result)
        print(f"retrain: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        write_result(RetrainResult(error=f"{type(exc).__name__}: {exc}".strip()), job.result)
        traceback.print_exc()
        return 1
    write_result(result, job.result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
