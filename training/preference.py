"""What the two preference stages of a retrain (``training.kto``, ``training.dpo``) share: the
model they start from, the trainer arguments, and how their result becomes a version."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from typing import Any

from training.registry import Registry, Version
from training.settings import LoraSettings, ModelSettings, TrainSettings


def load_parent(model_settings: ModelSettings, lora: LoraSettings, settings: TrainSettings, parent: Version):
    """The base with ``parent``'s adapter loaded for training (Unsloth, as SFT loads it)."""
    from training.modeling import load_base, unsloth
    from training.sft import add_lora

    FastLanguageModel = unsloth()
    model, tokenizer = load_base(model_settings, offload_embedding=settings.offload_embedding)
    return add_lora(FastLanguageModel, model, lora, parent), tokenizer


def trainer_args(stage: str, model_settings: ModelSettings, settings: TrainSettings, max_steps: int, *,
                 batch_size: int | None = None) -> dict[str, Any]:
    """TRL config arguments both stages use: the SFT recipe's batch, schedule and optimizer, a
    quarter of its learning rate (a preference stage moves less than SFT), no checkpoints."""
    from training.sft import precision_and_optimizer

    return dict(
        output_dir=tempfile.mkdtemp(prefix=f"rolebot-{stage}-"),
        per_device_train_batch_size=batch_size or settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_steps=max_steps,
        learning_rate=settings.learning_rate / 4,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=0,
        logging_steps=1,
        seed=settings.seed,
        **precision_and_optimizer(settings),
        max_length=model_settings.max_seq_length,
        save_strategy="no",
        report_to="none",
    )


def quiet(build):
    """Build a TRL trainer with its set-up chatter on stderr (stdout is the bot's)."""
    with contextlib.redirect_stdout(sys.stderr):
        return build()


def train_and_save(trainer, model, tokenizer, registry: Registry, parent: Version, stage: str,
                   details: dict[str, Any], before_save=None) -> Version:
    """Train, then write the result as ``parent``'s child with the stage's ``details`` in meta."""
    from training import yielding
    from training.sft import save

    started = time.perf_counter()
    with yielding.while_training(model) as paused:  # a retrain beside the bot: chats first
        stats = trainer.train()
    if before_save is not None:
        before_save()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    meta = {**{k: v for k, v in parent.meta.items() if k not in ("version", "gate", "eval")},
            "parent_version": parent.name, "stage": stage, "steps": stats.global_step,
            "final_loss": losses[-1][1] if losses else None, "losses": losses, stage: details,
            "runtime_s": round(time.perf_counter() - started, 2), "created_at": time.time(), **paused}
    return save(registry, model, tokenizer, meta, losses)
