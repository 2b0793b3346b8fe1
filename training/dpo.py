"""The preference stage of a retrain on pairs: TRL's DPO on (chosen, rejected) replies to the
same prompt, starting from the SFT candidate. The pairs come from regenerated alternatives (the
one the user went on from or rated 👍 against the ones swiped away or rated 👎; see
``training.logs.PreferencePair``), each on the exact prompt the bot used."""

from __future__ import annotations

from training.logs import PreferencePair
from training.preference import load_parent, quiet, train_and_save, trainer_args
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

    model, tokenizer = load_parent(model_settings, lora, settings, parent)
    # The prompts are the bot's own rendered text, so this is TRL's standard (not conversational)
    # format; TRL appends EOS to each completion.
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    args = DPOConfig(**trainer_args("dpo", model_settings, settings, max_steps), beta=BETA)
    trainer = quiet(lambda: DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                                       processing_class=tokenizer))
    # TRL falls back to the base model (adapters disabled) where PEFT cannot hold two adapters.
    reference = "parent" if "ref" in model.peft_config else "base"

    def drop_reference() -> None:  # the frozen copy of the parent is not part of the result
        if reference == "parent":
            model.delete_adapter("ref")

    return train_and_save(trainer, model, tokenizer, registry, parent, "dpo",
                          {"pairs": len(pairs), "beta": BETA, "reference": reference,
                           "kept": sum(p.reason == "kept" for p in pairs),
                           "rated": sum(p.reason == "rated" for p in pairs)},
                          before_save=drop_reference)
