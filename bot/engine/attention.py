"""Paged attention for transformers' continuous batching on PyTorch's own flash kernel.

Without the flash-attn package transformers' continuous batching runs ``paged|sdpa``: every step
it gathers the keys and values of all rows into one sequence, repeats them for each query head,
and calls SDPA with a block-diagonal mask over the whole padded batch (with CUDA graphs the key
length is padded to 16,384). At 64 rows of ~200 tokens each query scores ~80 times the keys it
needs, in a kernel that runs 32 blocks on a 132-SM GPU, and the host builds the mask row by row.

``paged|rolebot`` keeps transformers' paged cache and scheduler and replaces only that call:
the same gathered keys and values go to ``aten._flash_attention_forward`` (the flash kernel
PyTorch ships for SDPA) in its variable-length form, with the cumulative lengths that the batch
already carries, so each query reads only its own row, grouped-query heads need no copies and
no mask is built. Causal masking is aligned to the end of each row, as the flash kernel and
transformers' own ``paged|flash_attention_*`` do (a prefill chunk sees the cached past).
"""

from __future__ import annotations

import torch

NAME = "paged|rolebot"


def available(device: torch.device | str = "cuda") -> bool:
    """PyTorch's flash kernel runs here (CUDA, sm80 or newer) and transformers takes custom attention."""
    if not torch.cuda.is_available() or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8


def paged_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``query`` [1, heads, q tokens, dim]; ``key``/``value`` [1, kv heads, q tokens, dim] (this
    step's); returns [q tokens, heads, dim]. The cache holds every row's past; ``cu_seq_lens_*``
    delimit the rows in the flat batch (padding rows have length 0)."""
    cache = kwargs["cache"]
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                              read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
    max_q, max_k = kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]
    if isinstance(cu_k, dict):  # one entry per layer type; Llama-like models have full attention only
        cu_k, max_k = cu_k["full_attention"], max_k["full_attention"]
    out = torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2).squeeze(0).contiguous(), key.contiguous(), value.contiguous(),
        cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), 0.0, True, False,
        scale=scaling if scaling is not None else module.scaling)[0]
    return out, None


def install() -> str:
    """Register ``paged|rolebot`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_flash_attention)
    return NAME
