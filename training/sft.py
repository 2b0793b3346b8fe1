"""The SFT core: one function that makes the first adapter and every retrain.

Read top to bottom: data, model, LoRA, batches, trainer, report, save. The libraries are the
tutorial's (Unsloth ``FastLanguageModel``, PEFT through ``get_peft_model``, TRL ``SFTTrainer``);
what rolebot adds is response-only loss, packing with a block-diagonal mask, and a versioned
adapter store.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from training import report, yielding
from training.builtin import concrete
from training.canon import for_training, training_index
from training.dataset import load_samples, sha256
from training.errors import UserError
from training.modeling import device, expandable_cuda_segments, load_base, unsloth
from training.packing import Collator, encode, pack, to_records
from training.prompts import PromptStyle
from training.registry import Registry, Version
from training.settings import LoraSettings, ModelSettings, TrainSettings


@dataclass(frozen=True)
class TrainJob:
    data: Path
    model: ModelSettings
    lora: LoraSettings
    train: TrainSettings
    style: PromptStyle
    registry: Registry
    val: Path | None = None
    parent: Version | None = None
    trigger: str = "cli"
    notes: dict = field(default_factory=dict)  # recorded in meta.json as they are
    canon: Path | None = None  # the canon index; used when style.canon_k > 0


@dataclass(frozen=True)
class TrainResult:
    version: Version
    final_loss: float
    val_nll: float | None
    runtime_s: float
    samples_per_s: float


def train(job: TrainJob, *, activate: bool = True) -> TrainResult:
    samples = load_samples(job.data, job.style.character)
    val = load_samples(job.val, job.style.character) if job.val else []
    index = training_index(job.canon, job.style)
    # Without an index the version learns (and is served) without canon; meta.json says so.
    style = job.style if index is not None else replace(job.style, canon_k=0)
    expandable_cuda_segments()
    FastLanguageModel = unsloth()
    model, tokenizer = load_base(job.model, offload_embedding=job.train.offload_embedding)
    model = add_lora(FastLanguageModel, model, job.lora, job.parent)
    samples, val, canon = for_training(index, style, tokenizer, samples, val)
    encoded, dropped = encode(samples, tokenizer, style, job.model.max_seq_length, job.train.overlong)
    if not encoded:
        raise UserError(f"{job.data}: every sample is longer than [model] max_seq_length "
                        f"{job.model.max_seq_length}; raise it or shorten the samples")
    packed = job.train.batching in ("auto", "packed")
    capacity = max(job.train.pack_length, max(len(e.input_ids) for e in encoded))
    rows = pack(encoded, capacity, job.train.seed) if packed else [[e] for e in encoded]
    trainer = build_trainer(model, tokenizer, to_records(rows), job.train, packed)
    memory = report.Memory.start()
    started = time.perf_counter()
    try:
        with yielding.while_training(model) as paused:  # a retrain beside the bot: chats first
            stats = trainer.train()
    except _oom() as exc:
        raise UserError(f"out of memory while training ({str(exc).splitlines()[0]}) — lower [training] "
                        "batch_size or pack_length, or [model] max_seq_length") from None
    runtime = time.perf_counter() - started
    seen = stats.global_step * job.train.batch_size * job.train.grad_accum * len(encoded) / len(rows)
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    val_nll = None
    if val:
        from training.evaluate import mean_nll

        val_nll = mean_nll(model, tokenizer, val, style, job.model.max_seq_length)
    print(report.render(memory.finish(), stats.metrics, len(encoded), len(rows), dropped, seen / runtime, val_nll))
    meta = {
        "base_model": concrete(job.model.base),
        "dataset": {"file": str(job.data), "sha256": sha256(job.data), "samples": len(samples),
                    "val_file": str(job.val) if job.val else None,
                    "dropped": dict(dropped)},
        "config": {"model": _plain(job.model), "lora": _plain(job.lora), "train": _plain(job.train),
                   "prompt": _plain(style)},
        "canon": canon,
        "parent_version": job.parent.name if job.parent else None,
        "trigger": job.trigger,
        "steps": stats.global_step,
        "final_loss": losses[-1][1] if losses else None,
        "losses": losses,
        "val_nll": val_nll,
        "runtime_s": round(runtime, 2),
        **paused,
        "samples_per_s": round(seen / runtime, 3),
        "device": _plain(device()),
        "peak_memory_gb": memory.peak_gb,
        "created_at": time.time(),
        "libraries": report.library_versions(),
        **job.notes,
    }
    version = save(job.registry, model, tokenizer, meta, losses)
    if activate:
        job.registry.activate(version.name)
    return TrainResult(version, meta["final_loss"], val_nll, runtime, meta["samples_per_s"])


def add_lora(FastLanguageModel, model, lora: LoraSettings, parent: Version | None):
    """The tutorial's ``get_peft_model``; with a parent, its weights are loaded into it so a
    continued run trains through exactly the same code path as a fresh one."""
    checkpointing = {"unsloth": "unsloth", "true": True, "false": False}[lora.gradient_checkpointing]
    loftq = None
    if lora.loftq:
        from peft import LoftQConfig

        loftq = LoftQConfig(loftq_bits=4)
    with contextlib.redirect_stdout(sys.stderr):
        model = FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            target_modules=list(lora.target_modules),
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias=lora.bias,
            use_gradient_checkpointing=checkpointing,
            random_state=lora.random_state,
            use_rslora=lora.use_rslora,
            loftq_config=loftq,
        )
    if parent is not None:
        load_parent_weights(model, parent)
    return model


def load_parent_weights(model, parent: Version) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = parent.path / "adapter_model.safetensors"
    if not weights.exists():
        raise UserError(f"{parent.path}: no adapter_model.safetensors — cannot continue from {parent.name}")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if result.unexpected_keys:
        raise UserError(f"--from {parent.name}: its LoRA shape differs from [lora] in the config "
                        f"({len(result.unexpected_keys)} tensors do not fit) — use the same r and target_modules")


def build_trainer(model, tokenizer, records: list[dict], settings: TrainSettings, packed: bool):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        warmup_steps=settings.warmup_steps,
        max_steps=settings.max_steps or -1,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        logging_steps=settings.logging_steps,
        **precision_and_optimizer(settings),
        weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.lr_scheduler,
        seed=settings.seed,
        output_dir=str(Path(tempfile_dir()) / "trainer"),
        save_strategy="no",
        report_to="none",
        # The rows are already tokenised, labelled and packed; TRL must not redo it.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        packing=False,
        padding_free=False,
        train_sampling_strategy="random" if packed else "group_by_length",
        dataloader_num_workers=0,
    )
    class Trainer(SFTTrainer):
        """TRL's ``num_tokens`` log sums the attention mask. A packed row's (batch, 1, L, L) block
        mask has one entry per visible pair, not per token: each step would log ~L²/2 tokens
        (66,000 for a 512-token row). Every position sees itself; padding sees nothing else and
        nothing sees it, while each token of a sample (two tokens at least) sees or is seen by
        another, so those are the ones counted."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            before = getattr(self, "_total_train_tokens", None)
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            mask = inputs.get("attention_mask")
            if before is not None and mask is not None and mask.dim() == 4 and mask.dtype == torch.bool \
                    and self._total_train_tokens != before:
                alone = (mask.sum(dim=-1) == 1) & (mask.sum(dim=-2) == 1)
                real = (mask.diagonal(dim1=-2, dim2=-1) & ~alone).sum()
                self._total_train_tokens = before + int(self.accelerator.gather_for_metrics(real).sum().item())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    with contextlib.redirect_stdout(sys.stderr):
        return Trainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(records),
            args=args,
            data_collator=Collator(tokenizer.pad_token_id, flatten=packed and drops_training_masks(model)),
            callbacks=[time_limit(settings.max_minutes)] if settings.max_minutes else None,
        )


def time_limit(minutes: float):
    """A trainer callback that ends training after the optimizer step that passes ``minutes``
    (``[training] max_minutes``, the first run's ``first_run_minutes``): a budget in time, where
    a budget in steps takes 2.5 minutes on one machine and 10 on another."""
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.started >= minutes * 60:
                control.should_training_stop = True

    return TimeLimit()


def precision_and_optimizer(settings: TrainSettings) -> dict:
    """The tutorial's choices, as trainer arguments: bf16 where the GPU has it, else fp16 on a
    GPU, fp32 on CPU; 8-bit AdamW on CUDA unless ``[training] optim`` names another."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    optim = settings.optim if settings.optim != "auto" else ("adamw_8bit" if cuda else "adamw_torch")
    return {"bf16": bf16, "fp16": cuda and not bf16, "optim": optim}


def drops_training_masks(model) -> bool:
    """Whether the backbone runs Unsloth's own fast forward (its CUDA path), which drops any
    attention mask while training: packed rows must then carry ``packed_seq_lengths`` instead
    of a block mask, or their samples would attend to each other. Elsewhere (the CPU fallback,
    plain transformers) the 4D mask is honoured."""
    for module in model.modules():
        if hasattr(module, "embed_tokens"):
            return type(module).forward.__module__.startswith("unsloth.")
    return False


def save(registry: Registry, model, tokenizer, meta: dict, losses) -> Version:
    """Write the version into a draft folder; it becomes listable only when complete."""
    with registry.writing() as draft:
        model.save_pretrained(draft.path)
        tokenizer.save_pretrained(draft.path)
        report.plot_losses(losses, draft.path / "loss.png", title=f"training loss, {len(losses)} logged steps")
        return draft.commit(meta)


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rolebot-train-")


def _oom():
    import torch

    return (torch.OutOfMemoryError,)


def _plain(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)
