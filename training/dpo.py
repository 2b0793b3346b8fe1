"""The preference stage of a retrain on pairs: TRL's DPO on (chosen, rejected) replies to the
same prompt, starting from the SFT candidate. The pairs come from regenerated alternatives (the
one the user went on from or rated 👍 against the ones swiped away or rated 👎; see
``training.logs.PreferencePair``), each on the exact prompt the bot used."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time

from training.logs import PreferencePair
from training.registry import Registry, Version
from training.settings import LoraSettings, ModelSettings, TrainSettings

# DPO's β: how far the policy may move from the reference (TRL's default; the DPO paper's range
# is 0.1-0.5). Chat logs give few and noisy pairs, so the stage stays close to the SFT candidate.
BETA = 0.1


def dpo_stage(model_settings: ModelSettings, lora: LoraSettings, settings: TrainSettings,
              registry: Registry, parent: Version, pairs: list[PreferencePair], max_steps: int) -> Version:
    """Train DPO on top of ``parent`` and write the result as a new version (its child).

    The reference model is ``parent`` itself: given a PEFT model and no ``ref_model``, TRL
    copies the loaded adapter into a frozen "ref" adapter and scores the reference with it.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from training.modeling import load_base, unsloth
    from training.sft import add_lora, precision_and_optimizer, save

    FastLanguageModel = unsloth()
    model, tokenizer = load_base(model_settings, offload_embedding=settings.offload_embedding)
    model = add_lora(FastLanguageModel, model, lora, parent)
    # The prompts are the bot's own rendered text, so this is TRL's standard (not conversational)
    # format; TRL appends EOS to each completion.
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rolebot-dpo-"),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_steps=max_steps,
        learning_rate=settings.learning_rate / 4,  # a preference stage moves less than SFT
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=0,
        logging_steps=1,
        seed=settings.seed,
        **precision_and_optimizer(settings),
        max_length=model_settings.max_seq_length,
        beta=BETA,
        save_strategy="no",
        report_to="none",
    )
    with contextlib.redirect_stdout(sys.stderr):
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    # TRL falls back to the base model (adapters disabled) where PEFT cannot hold two adapters.
    reference = "parent" if "ref" in model.peft_config else "base"
    started = time.perf_counter()
    stats = trainer.train()
    if reference == "parent":  # the frozen copy of the parent is not part of the result
        model.delete_adapter("ref")
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    meta = {**{k: v for k, v in parent.meta.items() if k not in ("version", "gate", "eval")},
            "parent_version": parent.name, "stage": "dpo", "steps": stats.global_step,
            "final_loss": losses[-1][1] if losses else None, "losses": losses,
            "dpo": {"pairs": len(pairs), "beta": BETA, "reference": reference,
                    "kept": sum(p.reason == "kept" for p in pairs),
                    "rated": sum(p.reason == "rated" for p in pairs)},
            "runtime_s": round(time.perf_counter() - started, 2), "created_at": time.time()}
    return save(registry, model, tokenizer, meta, losses)
