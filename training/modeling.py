"""Loading the base model (and an adapter) through Unsloth, the one way training and serving do it.

On CUDA the base loads in 4-bit with bitsandbytes, as in the tutorial. Elsewhere Unsloth falls
back to the CPU by itself; there the base loads unquantised in float32, which the CPU trains
and decodes fastest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass

from training.builtin import resolve
from training.errors import UserError
from training.settings import ModelSettings

DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass(frozen=True)
class Device:
    """Where the model runs, as the reports and ``meta.json`` show it."""

    kind: str  # "cuda" or "cpu"
    name: str
    total_gb: float


def device() -> Device:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Device("cuda", props.name, round(props.total_memory / 2**30, 3))
    import psutil

    return Device("cpu", f"CPU ({os.cpu_count()} threads)", round(psutil.virtual_memory().total / 2**30, 3))


def unsloth():
    """Import Unsloth first: it patches transformers, PEFT and TRL when imported."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    # torch warns once per enum that torchao registers; it is noise for a user.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # Unsloth's banners go to stdout; keep stdout for what the user asked for (the reply).
    with contextlib.redirect_stdout(sys.stderr):
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel

    return FastLanguageModel


def expandable_cuda_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments instead of caching fixed-size blocks.

    Packed micro-batches differ in length from one step to the next, and with fixed blocks the
    cache keeps blocks sized for earlier lengths that the next one cannot reuse: peak *reserved*
    memory ends well above what is allocated. An explicit ``PYTORCH_CUDA_ALLOC_CONF`` wins."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # too late for the variable
        try:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        except Exception:  # an allocator that does not take it keeps its own
            pass


def load_base(settings: ModelSettings, *, offload_embedding: bool | None = None):
    """Return ``(model, tokenizer)`` for ``settings.base`` with no adapter attached.

    ``offload_embedding`` (training on CUDA, ``[training] offload_embedding``): True keeps the
    input embedding in host RAM, looked up there and copied over per batch; False keeps it on the
    GPU; None (inference) leaves the choice to Unsloth, which moves it only when memory is tight.
    Unsloth declines, with a message, where it cannot help (an lm_head tied to the embedding)."""
    FastLanguageModel = unsloth()
    import torch

    cuda = torch.cuda.is_available()
    if settings.dtype != "auto":
        dtype = getattr(torch, DTYPES[settings.dtype])
    else:
        dtype = None if cuda else torch.float32
    path = resolve(settings.base, settings.cache_dir)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=path,
                max_seq_length=settings.max_seq_length,
                dtype=dtype,
                load_in_4bit=settings.load_in_4bit and cuda,
                **({"offload_embedding": offload_embedding} if offload_embedding is not None and cuda else {}),
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"[model] base: cannot load {settings.base!r}: {first} — give a local checkpoint "
            "path, a hub name this machine can reach, or builtin:auto"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def attach_adapter(model, adapter_dir: str, *, trainable: bool = False, name: str = "default"):
    """Put a saved LoRA adapter on ``model`` (a PeftModel gets it as another named adapter)."""
    from peft import PeftModel

    if not os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        raise UserError(f"{adapter_dir}: no adapter_config.json — not a saved adapter version")
    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, adapter_dir, adapter_name=name, is_trainable=trainable)


def load_for_inference(settings: ModelSettings, adapter_dir: str | None = None):
    """Base plus (optionally) an adapter, switched to Unsloth's inference mode."""
    FastLanguageModel = unsloth()
    model, tokenizer = load_base(settings)
    if adapter_dir:
        model = attach_adapter(model, adapter_dir)
    FastLanguageModel.for_inference(model)
    tokenizer.padding_side = "left"
    return model, tokenizer
