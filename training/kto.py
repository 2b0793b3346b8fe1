"""The optional preference stage of a retrain: TRL's KTO on 👍 (desirable) and 👎 (undesirable)
replies, starting from the SFT candidate. KTO needs no pairs of answers to the same prompt,
which rated chat logs rarely have."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time

from training.prompts import PromptStyle, Sample
from training.registry import Registry, Version
from training.settings import LoraSettings, ModelSettings, TrainSettings


def kto_stage(model_settings: ModelSettings, lora: LoraSettings, settings: TrainSettings, style: PromptStyle,
              registry: Registry, parent: Version, liked: list[Sample], disliked: list[Sample], max_steps: int) -> Version:
    """Train KTO on top of ``parent`` and write the result as a new version (its child)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from training.modeling import load_base, unsloth
    from training.sft import add_lora, precision_and_optimizer, save

    FastLanguageModel = unsloth()
    model, tokenizer = load_base(model_settings, offload_embedding=settings.offload_embedding)
    model = add_lora(FastLanguageModel, model, lora, parent)
    rows = [{"prompt": style.prompt(s, tokenizer), "completion": s.output + tokenizer.eos_token, "label": good}
            for samples, good in ((liked, True), (disliked, False)) for s in samples]
    args = KTOConfig(
        output_dir=tempfile.mkdtemp(prefix="rolebot-kto-"),
        # KTO estimates its KL baseline from mismatched pairs within a batch: at least two rows.
        per_device_train_batch_size=max(2, settings.batch_size),
        gradient_accumulation_steps=settings.grad_accum,
        max_steps=max_steps,
        learning_rate=settings.learning_rate / 4,  # a preference stage moves less than SFT
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=0,
        logging_steps=1,
        seed=settings.seed,
        **precision_and_optimizer(settings),
        max_length=model_settings.max_seq_length,
        # Balance the two kinds so a few 👎 weigh as much as many 👍 (KTO paper, section 4).
        desirable_weight=1.0,
        undesirable_weight=max(1.0, len(liked) / max(1, len(disliked))),
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
    )
    with contextlib.redirect_stdout(sys.stderr):
        trainer = KTOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    started = time.perf_counter()
    stats = trainer.train()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    meta = {**{k: v for k, v in parent.meta.items() if k not in ("version", "gate", "eval")},
            "parent_version": parent.name, "stage": "kto", "steps": stats.global_step,
            "final_loss": losses[-1][1] if losses else None, "losses": losses,
            "kto": {"desirable": len(liked), "undesirable": len(disliked)},
            "runtime_s": round(time.perf_counter() - started, 2), "created_at": time.time()}
    return save(registry, model, tokenizer, meta, losses)
