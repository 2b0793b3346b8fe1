"""The optional preference stage of a retrain: TRL's KTO on 👍 (desirable) and 👎 (undesirable)
replies, starting from the SFT candidate. KTO needs no pairs of answers to the same prompt,
which rated chat logs rarely have."""

from __future__ import annotations

from training.preference import load_parent, quiet, train_and_save, trainer_args
from training.prompts import PromptStyle, Sample
from training.registry import Registry, Version
from training.settings import LoraSettings, ModelSettings, TrainSettings


def kto_stage(model_settings: ModelSettings, lora: LoraSettings, settings: TrainSettings, style: PromptStyle,
              registry: Registry, parent: Version, liked: list[Sample], disliked: list[Sample], max_steps: int) -> Version:
    """Train KTO on top of ``parent`` and write the result as a new version (its child)."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    model, tokenizer = load_parent(model_settings, lora, settings, parent)
    rows = [{"prompt": style.prompt(s, tokenizer), "completion": s.output + tokenizer.eos_token, "label": good}
            for samples, good in ((liked, True), (disliked, False)) for s in samples]
    args = KTOConfig(
        # KTO estimates its KL baseline from mismatched pairs within a batch: at least two rows.
        **trainer_args("kto", model_settings, settings, max_steps, batch_size=max(2, settings.batch_size)),
        # Balance the two kinds so a few 👎 weigh as much as many 👍 (KTO paper, section 4).
        desirable_weight=1.0,
        undesirable_weight=max(1.0, len(liked) / max(1, len(disliked))),
        remove_unused_columns=False,
    )
    trainer = quiet(lambda: KTOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                                       processing_class=tokenizer))
    return train_and_save(trainer, model, tokenizer, registry, parent, "kto",
                          {"desirable": len(liked), "undesirable": len(disliked)})
