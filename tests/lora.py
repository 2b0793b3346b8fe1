"""Saved adapter versions with random non-zero weights on the builtin model, for engine tests."""

from __future__ import annotations

from training.registry import Registry, Version


def random_version(registry: Registry, base_path, seed: int, rank: int = 8) -> Version:
    """A new version in ``registry``: LoRA of ``rank`` on q, v and down projections, weights
    drawn from ``seed`` (different seeds, different replies)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    with registry.writing() as draft:
        model.save_pretrained(draft.path)
        return draft.commit({"base_model": "builtin:smollm2-135m"})
