"""The SFT core end to end on the CPU: train the sample character, evaluate, continue, manage
versions, and fail clearly on bad input. Training runs a few steps on the builtin model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.cli import main
from training.registry import Registry

# Tiny but real: one packed row per step, a learning rate that moves a 135M model in 4 steps.
TINY = """
[training]
max_steps = 4
batch_size = 1
grad_accum = 1
warmup_steps = 0
learning_rate = 1e-3
pack_length = 512

[generation]
max_new_tokens = 8
temperature = 0.0

[canon]
train = true
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, builtin_path):
    """A project folder whose character was trained once with `rolebot train`."""
    root = tmp_path_factory.mktemp("project")
    (root / "config.toml").write_text(TINY, encoding="utf-8")
    assert main(["--config", str(root / "config.toml"), "train"]) == 0
    return root


def registry(root: Path) -> Registry:
    return Registry(root / "adapters", "甄嬛")


def test_training_writes_an_active_version_with_meta_and_plot(trained):
    versions = registry(trained).versions()
    assert [v.name for v in versions] == ["v0001"]
    assert registry(trained).active().name == "v0001"
    folder = versions[0].path
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "meta.json", "loss.png"):
        assert (folder / name).exists(), name
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["base_model"] == "builtin:smollm2-135m"
    assert meta["steps"] == 4 and len(meta["losses"]) == 4
    assert meta["dataset"]["sha256"] and meta["dataset"]["file"].endswith("甄嬛.json")
    assert meta["config"]["lora"]["r"] == 16 and meta["config"]["train"]["learning_rate"] == 1e-3
    assert meta["parent_version"] is None and meta["val_nll"] > 0
    assert {"torch", "transformers", "trl", "peft", "unsloth"} <= set(meta["libraries"])


def test_eval_shows_the_adapter_beats_the_base_on_held_out_nll(trained, capsys):
    assert main(["--config", str(trained / "config.toml"), "eval", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "NLL" in out and "chrF" in out and "ROUGE-L" in out and "identity" in out and "v0001" in out
    assert "another's role" in out and "base+canon" in out and "v0001+canon" in out
    meta = json.loads((trained / "adapters/甄嬛/v0001/meta.json").read_text(encoding="utf-8"))
    scores = meta["eval"]
    assert scores["adapter"]["nll"] < scores["base"]["nll"], scores
    # Trained with canon ([canon] train = true): its prompts held the exchanges, as meta.json records.
    assert meta["config"]["prompt"]["canon_k"] == 3 and meta["canon"]["samples_with_canon"] > 0
    assert scores["canon_k"] == 3 and scores["canon_index"].endswith("甄嬛.canon.jsonl")
    for row in ("base", "base+canon", "adapter", "adapter+canon"):
        assert 0 <= scores[row]["confusion"] <= 1 and scores[row]["pairs"] == scores["base"]["pairs"], row
        # what a user hears: measured on the replies as the engine's filter leaves them
        assert 0 <= scores[row]["language"] <= 1 and 0 <= scores[row]["cut"] <= 1, row
        assert scores[row]["scaffolding"] == 0, row
        assert scores[row]["length"] > 0 and scores[row]["script_length"] > 5 and scores[row]["nll_char"] > 0, row
    for label in ("replies in the script's language", "replies showing scaffolding", "cut short by the filter",
                  "mean reply length", "NLL per character"):
        assert label in out, label
    # The adapter learned to answer with canon at hand: that is where it does best.
    assert scores["adapter+canon"]["nll"] < scores["adapter"]["nll"], scores


def test_chat_once_uses_the_active_adapter(trained, capsys):
    assert main(["--config", str(trained / "config.toml"), "chat", "--once", "皇上吉祥！"]) == 0
    captured = capsys.readouterr()
    assert "v0001" in captured.err and captured.out.startswith("甄嬛：")


def test_from_continues_a_version_and_rollback_returns(trained, capsys):
    config = str(trained / "config.toml")
    assert main(["--config", config, "train", "--from", "v0001", "--max-steps", "1"]) == 0
    reg = registry(trained)
    second = reg.get("v0002")
    first = reg.get("v0001")
    assert second.parent == "v0001" and reg.active().name == "v0002"
    # Continuing starts from the trained weights: its first loss is below the fresh run's first.
    assert second.meta["losses"][0][1] < first.meta["losses"][0][1]
    assert main(["--config", config, "adapters", "list"]) == 0
    listing = capsys.readouterr().out
    assert "v0001" in listing and "* v0002" in listing
    assert "NLL " in listing.split("v0001", 1)[1].splitlines()[0]  # the fidelity its eval measured
    assert main(["--config", config, "adapters", "rollback"]) == 0
    assert reg.active().name == "v0001"
    assert main(["--config", config, "adapters", "activate", "v0002"]) == 0
    assert reg.active().name == "v0002"
    assert main(["--config", config, "adapters", "activate", "v0009"]) == 2
    assert "adapter version 'v0009' of 甄嬛 not found; versions: v0001, v0002" in capsys.readouterr().err


def test_a_crash_while_saving_leaves_no_version(trained, monkeypatch, tmp_path, capsys):
    from training import report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report, "plot_losses", broken)
    project = tmp_path / "p"
    project.mkdir()
    (project / "config.toml").write_text(TINY.replace("max_steps = 4", "max_steps = 1"), encoding="utf-8")
    with pytest.raises(OSError):
        main(["--config", str(project / "config.toml"), "train"])
    assert registry(project).versions() == [] and registry(project).active() is None
    assert not list((project / "adapters/甄嬛").glob(".draft-*"))


def test_a_killed_run_leaves_no_listed_version(tmp_path):
    (tmp_path / "config.toml").write_text(TINY.replace("max_steps = 4", "max_steps = 50"), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(tmp_path / "config.toml"), "train"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ})
    seen = ""
    deadline = time.monotonic() + 240
    while "1/50" not in seen and time.monotonic() < deadline:  # killed mid-training
        seen += proc.stdout.read(1) or ""
        if proc.poll() is not None:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "1/50" in seen, seen[-2000:]
    assert registry(tmp_path).versions() == [] and registry(tmp_path).active() is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "dataset file not found"),
        ("", "the dataset is empty"),
        ("[{\"instruction\": \"a\",", "not valid JSON"),
        ('[{"question": "a", "answer": "b"}]', "record 1: missing or empty instruction, output"),
        ('[{"instruction": "a", "output": "b", "extra": 1}]', "record 1: unknown keys extra"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "line 2: missing or empty output"),
    ],
)
def test_bad_datasets_are_one_clear_line(tmp_path, capsys, content, message):
    data = tmp_path / "pairs.json"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    (tmp_path / "config.toml").write_text(TINY, encoding="utf-8")
    assert main(["--config", str(tmp_path / "config.toml"), "train", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(data) in err and "Traceback" not in err
    assert registry(tmp_path).versions() == []


def test_overlong_samples_are_truncated_and_counted(tmp_path, capsys):
    data = tmp_path / "pairs.json"
    pairs = [{"instruction": "皇上吉祥", "input": "", "output": "臣妾给皇上请安。"},
             {"instruction": "说说你的故事", "input": "", "output": "很久以前，" * 200}]
    data.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "config.toml").write_text(TINY.replace("max_steps = 4", "max_steps = 1") + "\n[model]\nmax_seq_length = 256\n",
                                         encoding="utf-8")
    assert main(["--config", str(tmp_path / "config.toml"), "train", "--data", str(data)]) == 0
    out, err = capsys.readouterr()
    assert "Samples truncated to max_seq_length: 1." in out
    meta = registry(tmp_path).get("v0001").meta
    assert meta["dataset"]["dropped"] == {"truncated to max_seq_length": 1}
    # Hand-written pairs have no canon index: trained, and recorded, without canon ([canon] train is on).
    assert "no canon index beside the pairs — training without canon" in err
    assert meta["config"]["prompt"]["canon_k"] == 0 and meta["canon"] is None
