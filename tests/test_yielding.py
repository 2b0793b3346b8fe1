"""A retrain beside the bot steps aside while chats wait (training/yielding.py): the flag the
bot raises pauses the training before its next decoder layer, for as long as it stays up and
never longer than the cap."""

from __future__ import annotations

import threading

import torch

from training import yielding


class ToyDecoderLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([ToyDecoderLayer(), ToyDecoderLayer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_raised_flag_holds_the_next_layer_until_it_is_lowered(tmp_path):
    chats = yielding.ChatsWaiting(tmp_path / "flag")
    model = Toy()
    remove = yielding.install(model, chats.path, max_pause_s=30.0)
    try:
        model(torch.ones(1, 4))  # flag down: no pause
        chats.set(True)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (model(torch.ones(1, 4)), done.set()))
        worker.start()
        assert not done.wait(0.3), "the forward ran while chats were waiting"
        chats.set(False)
        assert done.wait(10), "the forward did not go on once the flag was lowered"
        worker.join()
    finally:
        report = remove()
        chats.close()
    assert report["pauses"] == 1 and report["paused_s"] >= 0.3, report
    assert chats.raised == 1 and not chats.path.exists()


def test_a_flag_that_stays_up_slows_training_but_never_stops_it(tmp_path):
    chats = yielding.ChatsWaiting(tmp_path / "flag")
    model = Toy()
    remove = yielding.install(model, chats.path, max_pause_s=0.05, min_run_s=60.0)
    chats.set(True)
    try:
        for _ in range(3):
            model(torch.ones(1, 4))
    finally:
        report = remove()
        chats.close()
    # One capped pause, then training runs for min_run_s before it may pause again.
    assert report["pauses"] == 1, report


def test_without_a_flag_nothing_is_installed(tmp_path, monkeypatch):
    monkeypatch.delenv(yielding.ENV, raising=False)
    model = Toy()
    assert yielding.install(model)() == {}
    assert yielding.install(model, tmp_path / "missing")() == {}
    assert not any(layer._forward_pre_hooks for layer in model.layers)


def test_the_flag_file_the_environment_names_is_used(tmp_path, monkeypatch):
    chats = yielding.ChatsWaiting(tmp_path / "flag")
    monkeypatch.setenv(yielding.ENV, str(chats.path))
    model = Toy()
    remove = yielding.install(model)
    assert all(layer._forward_pre_hooks for layer in model.layers)
    model(torch.ones(1, 4))
    assert remove() == {"pauses": 0, "paused_s": 0.0}
    chats.close()
