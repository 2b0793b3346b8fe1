"""The serving copy of the model: plain transformers + bitsandbytes + PEFT, without Unsloth.

transformers' continuous batching runs its own paged attention; Unsloth's inference patches
replace the attention with their own KV buffers, which never see that cache. So serving loads
the same files the way plain transformers does, and training keeps Unsloth in its subprocess.

On CUDA the base is quantised to 4-bit nf4 as in training (``[model] load_in_4bit``). With
``[engine] weights = "bf16"`` (or "auto", the default, where the copy takes at most a third of
the free GPU memory) those 4-bit weights are then dequantised once into ordinary bf16 layers:
the same values the 4-bit kernels compute with, at about 3x the memory, and a decode step that
is a plain bf16 matmul instead of a dequantise + matmul per layer (on the H200, 8B shape: first
token p95 0.10 s instead of 1.35 s at 8 chats/s). The LoRA adapter
stays unmerged either way, so a new version is a copy into its tensors.
"""

from __future__ import annotations

import logging
import os

from bot.config import Config
from training.builtin import is_builtin, resolve
from training.errors import UserError

log = logging.getLogger(__name__)


def load_serving_model(config: Config, adapter_dir: str | None):
    """Return ``(model, tokenizer)``: the base (and the adapter, named "default") for inference."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    settings = config.model
    cuda = torch.cuda.is_available()
    path = resolve(settings.base, settings.cache_dir)
    local_only = is_builtin(settings.base) or os.path.isdir(path)
    if settings.dtype != "auto":
        dtype = getattr(torch, settings.dtype)
    else:
        dtype = torch.bfloat16 if cuda else torch.float32
    try:
        base_config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        kwargs: dict = {"dtype": dtype, "attn_implementation": "sdpa", "local_files_only": local_only}
        quantised = getattr(base_config, "quantization_config", None) is not None
        if cuda:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
            if settings.load_in_4bit and not quantised:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"[model] base: cannot load {settings.base!r} for serving: {first} — give a local "
                        "checkpoint path, a hub name this machine can reach, or builtin:auto") from None
    if cuda and wants_dequantized(config.engine.weights, model):
        replaced = dequantize_4bit_layers(model, dtype)
        log.info("engine: %d 4-bit layers dequantised to %s for serving", replaced, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter_dir:
        from training.modeling import attach_adapter

        model = attach_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer


def wants_dequantized(setting: str, model) -> bool:
    """"bf16" always; "auto" when the dequantised copy takes at most a third of the GPU memory
    still free, leaving the rest to the KV cache and to a retrain on the same GPU."""
    if setting != "auto":
        return setting == "bf16"
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    extra = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    free, _ = torch.cuda.mem_get_info()
    return 0 < extra <= free / 3


def dequantize_4bit_layers(model, dtype) -> int:
    """Replace every bitsandbytes ``Linear4bit`` with an ``nn.Linear`` holding its dequantised
    weight (bit for bit what the 4-bit layer multiplies with). Returns how many were replaced."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
            layer = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=weight.device, dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if child.bias is not None:
                    layer.bias.copy_(child.bias.to(dtype))
            layer.requires_grad_(False)
            setattr(parent, name, layer)
            replaced += 1
    if replaced:
        # The model is no longer a quantised one: PEFT and generation must treat it as plain.
        model.is_loaded_in_4bit = False
        model.is_quantized = False
        model.hf_quantizer = None
        model.config.quantization_config = None
        torch.cuda.empty_cache()
    return replaced
