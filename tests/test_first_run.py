"""The first training of `rolebot serve` runs in a child process: stopping the bot, however it
stops, must not leave that child training on as an orphan."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def record_and_wait(path: str) -> None:
    """In the child: say who it is, then 'train' for a minute."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent, killed, cannot reap it)
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_the_training_child_dies_with_a_killed_bot(tmp_path):
    marker = tmp_path / "child.pid"
    code = ("import sys; sys.path[:0] = [%r, %r]; from bot.app import in_child_process; "
            "from test_first_run import record_and_wait; in_child_process(record_and_wait, %r)"
            % (str(ROOT), str(ROOT / "tests"), str(marker)))
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(marker.read_text())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the training child outlived the bot"
    finally:
        parent.kill()
        if marker.exists() and alive(int(marker.read_text())):
            os.kill(int(marker.read_text()), signal.SIGKILL)


def test_the_first_run_without_a_gpu_is_short_and_at_its_own_learning_rate(monkeypatch):
    """No GPU: single 512-token rows, first_run_steps, first_run_minutes and
    first_run_learning_rate; a GPU (or first_run_steps = 0) keeps the full recipe."""
    import torch

    from bot.app import first_run_settings
    from bot.config import parse_config

    def load_config(text: str):
        return parse_config(text, Path("config.toml"))

    config = load_config("[training]\nfirst_run_steps = 7\nfirst_run_minutes = 2.5\n"
                         "first_run_learning_rate = 0.003\nlearning_rate = 0.0002\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quick = first_run_settings(config)
    assert (quick.max_steps, quick.max_minutes, quick.learning_rate) == (7, 2.5, 0.003)
    assert (quick.batch_size, quick.grad_accum, quick.pack_length, quick.warmup_steps) == (1, 1, 512, 0)
    # 0 keeps the recipe's own learning rate
    same = first_run_settings(load_config("[training]\nfirst_run_learning_rate = 0\nlearning_rate = 0.0004\n"))
    assert same.learning_rate == 0.0004
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert first_run_settings(config) is config.training
