"""A per-request repetition penalty for transformers' continuous batching.

transformers drops ``RepetitionPenaltyLogitsProcessor`` from continuous batching (it reads the
whole batch's ``input_ids``, which there is one flat row of every request's new tokens). This
processor plugs into the same per-request mechanism as CB's temperature and top-p: each row's
penalty travels in the batch's argument tensor, and the tokens each request has seen (prompt
and reply, as ``generate`` penalises them) sit in a fixed device buffer that the host refills
before each step, so a captured CUDA graph reads the new ids at the same address.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor


class RepetitionPenalty(ContinuousBatchingLogitsProcessor):
    supported_kwargs: dict[str, type] = {"repetition_penalty": float}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, rows: int, window: int, device, default: float = 1.0):
        self.default = default
        self.window = window
        self.seen = torch.zeros((rows, window), dtype=torch.long, device=device)
        self._host = np.zeros((rows, window), dtype=np.int64)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        default = torch.empty_like(int32_tensor, dtype=torch.float32)
        default.fill_(self.default)
        int32_tensor.copy_(default.view(dtype=torch.int32))

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        penalties = []
        rows = min(len(requests_with_new_token), self._host.shape[0])
        for i, request in enumerate(requests_with_new_token[:rows]):
            state = request.state
            penalties.append(state.logit_processor_kwargs.get("repetition_penalty", self.default))
            tokens = (state.initial_tokens + state.generated_tokens)[-self.window:]
            # Unused places repeat a seen id: penalising it twice writes the same value twice.
            self._host[i, :] = tokens[0]
            self._host[i, :len(tokens)] = tokens
        if rows:
            self.seen[:rows].copy_(torch.from_numpy(self._host[:rows]), non_blocking=False)
        return torch.tensor(penalties, dtype=torch.float32).view(dtype=torch.int32)

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        rows = scores.size(0)
        penalty = tensor_arg[:rows].view(dtype=torch.float32).unsqueeze(-1)  # [B, 1]
        ids = self.seen[:rows]
        picked = scores.gather(1, ids)
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        return scores.scatter(1, ids, picked)


def install(manager, rows: int, window: int, device) -> RepetitionPenalty:
    """Put the penalty first in the manager's logits processors (where ``generate`` has it),
    before the batch processor sizes its argument tensors at start."""
    processors = manager.logit_processor
    penalty = RepetitionPenalty(rows, window, device)
    processors.logits_processor.insert(0, penalty)
    processors.tensors_required += 1
    processors.supported_keys.update(penalty.supported_kwargs)
    processors.do_processing = True
    return penalty
