"""Adapter hot-swap: read and check a new version beside generation, then apply it between steps.

``plan_swap`` does the slow, fallible part (reading the files, comparing shapes, staging the
tensors on the model's device) without touching the model, so a bad version changes nothing.
``apply_swap`` is the fast part, run when no step is in flight: a version of the loaded
adapter's shape is copied into the loaded LoRA tensors (same addresses, so captured CUDA graphs
read the new values); another shape loads as a new PEFT adapter and the old one is dropped.
Serving the base model copies zeros into the adapter's B matrices: the LoRA term is then
exactly zero, and the forward (and any graph captured of it) stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.errors import UserError
from training.registry import Version


@dataclass(frozen=True)
class CopyWeights:
    """Same shapes as the loaded adapter: copy each staged tensor into its loaded parameter."""

    pairs: tuple  # ((loaded parameter, staged tensor on the same device), ...)


@dataclass(frozen=True)
class LoadAdapter:
    """Another shape (rank, targets): load it as a new PEFT adapter beside the old, then drop the old."""

    path: str


SwapPlan = CopyWeights | LoadAdapter

_SHAPE_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "modules_to_save")


def plan_swap(model, adapter_name: str | None, version: Version | None) -> SwapPlan:
    """What it takes to serve ``version`` on ``model`` (whose loaded adapter is ``adapter_name``)."""
    import torch
    from peft import PeftConfig, PeftModel
    from peft.utils import load_peft_weights

    if version is None:
        zeros = [(p, torch.zeros_like(p)) for name, p in model.named_parameters() if "lora_B" in name]
        return CopyWeights(tuple(zeros))

    try:
        new_config = PeftConfig.from_pretrained(str(version.path))
        weights = load_peft_weights(str(version.path), device="cpu")
    except (OSError, ValueError) as exc:
        raise UserError(f"{version.path}: cannot read adapter version {version.name}: {exc}") from None
    if isinstance(model, PeftModel) and adapter_name:
        old = model.peft_config[adapter_name]
        same = all(getattr(old, k, None) == getattr(new_config, k, None) for k in _SHAPE_KEYS)
        same = same and set(old.target_modules or ()) == set(new_config.target_modules or ())
        # Saved keys are the parameter names without the adapter's name.
        tag = f".{adapter_name}."
        loaded = {name.replace(tag, "."): p for name, p in model.named_parameters() if "lora_" in name and tag in name}
        same = same and loaded.keys() == weights.keys() and all(loaded[k].shape == weights[k].shape for k in weights)
        if same:
            # Staged on the model's device now, so that the swap itself is a device copy.
            return CopyWeights(tuple((loaded[k], t.to(loaded[k].device, loaded[k].dtype)) for k, t in weights.items()))
    return LoadAdapter(str(version.path))


def apply_swap(model, adapter_name: str | None, plan: SwapPlan, new_name: str):
    """Apply ``plan``; returns ``(model, adapter name)`` (a first adapter wraps the model)."""
    import torch
    from peft import PeftModel

    with torch.no_grad():
        if isinstance(plan, CopyWeights):
            for param, value in plan.pairs:
                param.copy_(value)
            return model, adapter_name
        from training.modeling import attach_adapter

        model = attach_adapter(model, plan.path, name=new_name)
        if adapter_name is not None and isinstance(model, PeftModel):
            model.set_adapter(new_name)
            model.delete_adapter(adapter_name)
        model.eval()
        return model, new_name
