"""Typed settings the training side needs: model, LoRA and trainer.

Defaults are the tutorial's values. ``bot.config`` composes these into the one config file;
the metadata (``min``, ``max``, ``choices``, ``help``) drives its validation messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def opt(default, help: str, **checks):
    """A config field: its default, a one-line help and the range or choices it accepts."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **checks})
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class ModelSettings:
    base: str = opt(
        "builtin:auto",
        "base model: builtin:auto (the Chinese builtin:qwen2.5-coder-0.5b where it is installed and "
        "the machine has the memory, else builtin:smollm2-135m; an adapter already trained keeps its "
        "base), a builtin name, a hub name (e.g. a *-bnb-4bit model) or a local path",
    )
    cache_dir: str = opt("", "where the builtin model is converted to (empty: the user cache dir)")
    max_seq_length: int = opt(2048, "longest sample / prompt in tokens", min=64, max=131072)
    dtype: str = opt("auto", "compute dtype", choices=["auto", "bfloat16", "float16", "float32"])
    load_in_4bit: bool = opt(True, "load the base in 4-bit (bitsandbytes) when a CUDA GPU is present")
    prompt_format: str = opt(
        "auto", "prompt template: the tutorial's Alpaca template, the model's chat template, or auto: the "
        "one the builtin model scores best with (bench/fidelity.py: chat for Qwen, alpaca for SmolLM2), "
        "alpaca for any other model",
        choices=["auto", "alpaca", "chat"],
    )
    history_first: bool = opt(
        True, "the chat's history stands before the message and the canon after the history, so that a "
        "chat's next prompt begins with this one and the engine reuses its cached blocks; false: the "
        "tutorial's order (instruction, then input). Each adapter is served in the order it was trained on",
    )


@dataclass
class LoraSettings:
    r: int = opt(16, "LoRA rank", min=1, max=1024)
    alpha: int = opt(16, "LoRA scaling factor alpha", min=1, max=4096)
    dropout: float = opt(0.0, "LoRA dropout", min=0.0, max=0.9)
    bias: str = opt("none", "LoRA bias", choices=["none", "all", "lora_only"])
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "modules that get LoRA weights",
    )
    gradient_checkpointing: str = opt(
        "unsloth", "gradient checkpointing", choices=["unsloth", "true", "false"]
    )
    random_state: int = opt(3407, "seed for the LoRA initialisation")
    use_rslora: bool = opt(False, "rank-stabilised LoRA")
    loftq: bool = opt(False, "LoftQ initialisation (needs an unquantised base)")


def recipe_for_device(settings: "TrainSettings", cpu_steps: int, cpu_minutes: float = 0.0,
                      cpu_learning_rate: float = 0.0) -> "TrainSettings":
    """``settings`` on a GPU (or when ``cpu_steps`` is 0); without one, ``cpu_steps`` steps of
    single 512-token rows, stopping early after ``cpu_minutes`` (0: no limit), at
    ``cpu_learning_rate`` (0: the settings' own): what a 2-core machine trains in minutes (about
    6 s a step on SmolLM2, 22 s on Qwen2.5-0.5B) where the full recipe takes hours."""
    from dataclasses import replace

    import torch

    if torch.cuda.is_available() or cpu_steps == 0:
        return settings
    return replace(settings, batch_size=1, grad_accum=1, warmup_steps=0, pack_length=512, max_steps=cpu_steps,
                   max_minutes=cpu_minutes or settings.max_minutes,
                   learning_rate=cpu_learning_rate or settings.learning_rate)


@dataclass
class TrainSettings:
    batch_size: int = opt(
        2, "per-device batch size: samples when padded, rows of pack_length tokens when packed", min=1, max=4096)
    grad_accum: int = opt(4, "gradient accumulation steps", min=1, max=1024)
    warmup_steps: int = opt(5, "learning-rate warm-up steps", min=0)
    max_steps: int = opt(60, "optimizer steps (0: use epochs)", min=0)
    epochs: float = opt(1.0, "epochs when max_steps is 0", min=0.01, max=1000.0)
    max_minutes: float = opt(
        0.0, "stop training after the optimizer step that passes this many minutes (0: no limit); "
        "the version records the steps it made", min=0.0)
    learning_rate: float = opt(2e-4, "peak learning rate", min=1e-8, max=1.0)
    weight_decay: float = opt(0.01, "AdamW weight decay", min=0.0, max=1.0)
    lr_scheduler: str = opt(
        "linear", "learning-rate schedule", choices=["linear", "cosine", "constant", "constant_with_warmup"]
    )
    optim: str = opt(
        "auto", "optimizer (auto: 8-bit AdamW on CUDA, AdamW elsewhere)",
        choices=["auto", "adamw_8bit", "adamw_torch", "paged_adamw_8bit"],
    )
    seed: int = opt(3407, "training seed")
    batching: str = opt(
        "auto",
        "how short samples are batched: packed (block-diagonal mask, no cross-sample attention), "
        "padded (length-grouped), or auto (packed)",
        choices=["auto", "packed", "padded"],
    )
    pack_length: int = opt(3072, "tokens per packed row", min=64, max=131072)
    offload_embedding: bool = opt(
        True,
        "on a GPU, keep the frozen input embedding in host RAM while training (Unsloth's "
        "offload_embedding): 1 GB less GPU memory for a Llama-3 8B at the same speed; LoRA never "
        "trains it; a model whose lm_head shares the embedding keeps it on the GPU",
    )
    logging_steps: int = opt(1, "log the loss every N steps", min=1)
    data: str = opt("", "training pairs (alpaca JSON); empty: prepare the sample script")
    val: str = opt("", "held-out pairs for evaluation (alpaca JSON)")
    first_run_steps: int = opt(
        24,
        "with no GPU, the automatic first training of rolebot serve runs this many steps of one "
        "512-token row (a few minutes on a laptop); 0: the full recipe above. `rolebot train` "
        "always uses the full recipe",
        min=0,
    )
    first_run_minutes: float = opt(
        4.0,
        "with no GPU, the automatic first training stops after this many minutes of training even "
        "if first_run_steps are not done (2 CPU cores: 24 steps of SmolLM2 take about 2.5 minutes, "
        "Qwen2.5-0.5B makes about 11); 0: no limit",
        min=0.0,
    )
    first_run_learning_rate: float = opt(
        1e-3,
        "with no GPU, the automatic first training's peak learning rate: its dozen steps at 1e-3 "
        "answer identity probes in character where the tutorial's 2e-4 has barely begun "
        "(bench/fidelity.py, README); 0: learning_rate",
        min=0.0,
    )
    overlong: str = opt(
        "truncate", "samples longer than max_seq_length", choices=["truncate", "skip"]
    )
