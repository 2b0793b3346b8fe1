"""Chats first: a retrain that shares the device with the bot steps aside while chats wait.

The bot and its retrain child share one GPU (or CPU). The GPU time-slices between the two
processes, so while training runs, a chat's prefill takes about twice as long; on the CPU the
child's lower priority (``[retrain] nice``) helps only as far as the kernel scheduler does. With
``[retrain] yield_to_chats`` the two share one byte, a flag file both map into memory (the bot
names it to the child in ``$ROLEBOT_CHATS_WAITING``):

- the bot sets it while its engine holds requests that have not begun (a queue, or a
  prefill), and clears it when they have (``ChatsWaiting``, polled every few milliseconds);
- the child reads it before each decoder layer's forward (that is, also in the backward's
  recomputation under gradient checkpointing): while it is set, the child lets its queued
  kernels finish and sleeps until it clears (``install``).

Off by default: on the H200 (``bench/retrain.py --yield-to-chats``, 8 clients with ~1,500-token
prompts, 2026-12-02) the training paused 16 times for 7.5 s of its 51 s, and the first token
p95 during the retrain was 0.81 s against 0.81-0.88 s without it; the rest of a cycle (loading
and quantising the model, the gate) shares the GPU unpaused.

A pause lasts at most ``max_pause_s``; after one that long, training runs ``min_run_s`` before it
may pause again, so a bot that is never idle slows a retrain down but never stops it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ENV = "ROLEBOT_CHATS_WAITING"
MAX_PAUSE_S = 0.5
MIN_RUN_S = 0.5
POLL_S = 0.002


class ChatsWaiting:
    """The bot's side: the flag file, set and cleared from the engine's state."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.write_bytes(b"\0")
        self._file = open(self.path, "r+b")  # noqa: SIM115 (closed in close())
        self._map = mmap.mmap(self._file.fileno(), 1)
        self.raised = 0  # how often the flag went up: the bot's status can tell how often training paused

    def set(self, waiting: bool) -> None:
        value = 1 if waiting else 0
        if self._map[0] != value:
            self._map[0] = value
            self.raised += value

    def close(self) -> None:
        self._map.close()
        self._file.close()
        self.path.unlink(missing_ok=True)


class _Pauser:
    """The child's side: a forward pre-hook that sleeps while the flag is set."""

    def __init__(self, path: Path, max_pause_s: float, min_run_s: float):
        self._file = open(path, "rb")  # noqa: SIM115 (lives as long as the training)
        self._map = mmap.mmap(self._file.fileno(), 1, access=mmap.ACCESS_READ)
        self.max_pause_s, self.min_run_s = max_pause_s, min_run_s
        self._run_until = 0.0  # no pause before this (after a pause that hit max_pause_s)
        self.pauses = 0
        self.paused_s = 0.0

    def __call__(self, module, args) -> None:
        if not self._map[0]:
            return
        now = time.monotonic()
        if now < self._run_until:
            return
        _synchronize()
        deadline = now + self.max_pause_s
        while self._map[0] and time.monotonic() < deadline:
            time.sleep(POLL_S)
        ended = time.monotonic()
        if ended >= deadline:
            self._run_until = ended + self.min_run_s
        self.pauses += 1
        self.paused_s += ended - now

    def close(self) -> None:
        self._map.close()
        self._file.close()


def _synchronize() -> None:
    """Let the kernels already queued finish, so that the pause frees the GPU at once."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def install(model, flag: Path | str | None = None, *, max_pause_s: float = MAX_PAUSE_S,
            min_run_s: float = MIN_RUN_S) -> Callable[[], dict]:
    """Pause ``model``'s training before each decoder layer while ``flag`` (default: the file
    ``$ROLEBOT_CHATS_WAITING`` names) is set; returns a function that removes the hooks and
    reports the pauses. No flag (``rolebot train``, or the setting off): nothing is installed."""
    flag = flag or os.environ.get(ENV)
    if not flag or not os.path.exists(flag):
        return lambda: {}
    pauser = _Pauser(Path(flag), max_pause_s, min_run_s)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    handles = [layer.register_forward_pre_hook(pauser) for layer in layers]

    def remove() -> dict:
        for handle in handles:
            handle.remove()
        pauser.close()
        return {"pauses": pauser.pauses, "paused_s": round(pauser.paused_s, 1)}

    return remove


@contextlib.contextmanager
def while_training(model) -> Iterator[dict]:
    """``install`` for the span of a ``trainer.train()``: yields the meta.json entries it adds,
    ``{"paused_for_chats": {...}}`` once training ends (nothing when no flag was installed)."""
    remove = install(model)
    entries: dict = {}
    try:
        yield entries
    finally:
        paused = remove()
        if paused:
            entries["paused_for_chats"] = paused
