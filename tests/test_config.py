"""Config: defaults, the shipped file, and one clear line for each kind of mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import Config, load_config, secret, settle
from training.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_complete_and_matches_the_defaults():
    config = load_config(str(ROOT / "config.toml"))
    defaults = settle(Config(root=config.root))
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        if section.name != "cast":
            assert getattr(config, section.name) == getattr(defaults, section.name), section.name
    # the shipped file plays a cast of two from the sample script: 甄嬛 (the defaults) and 皇帝
    assert [m.name for m in config.members] == ["甄嬛", "皇帝"] and config.cast[0] == defaults.character
    assert Config().model.base == "builtin:auto" and Config().model.prompt_format == "auto"
    # settled for this machine: the suite's $ROLEBOT_BUILTIN (conftest) picks SmolLM2
    assert (config.model.base, config.model.prompt_format) == ("builtin:smollm2-135m", "alpaca")
    text = (ROOT / "config.toml").read_text(encoding="utf-8")
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal") or section.name == "cast":  # [[cast]]: [character]'s keys
            continue
        for key in dataclasses.fields(getattr(defaults, section.name)):
            assert f"\n{key.name} = " in text, f"[{section.name}] {key.name} is missing from config.toml"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[lora]\nr = "x"\n', "bad.toml:2: [lora] r: expected an integer from 1 to 1024, got 'x'"),
        ("[lora]\nrank = 8\n", "bad.toml:2: [lora] rank: unknown key — known: r, alpha"),
        ("[lorra]\nr = 8\n", "bad.toml:1: unknown section [lorra] — did you mean 'lora'?"),
        ('[training]\nbatching = "foo"\n', "bad.toml:2: [training] batching: expected one of 'auto', 'packed', 'padded', got 'foo'"),
        ("[generation]\ntop_p = 2\n", "bad.toml:2: [generation] top_p: expected a number from 0.01 to 1.0, got 2.0"),
        ("[web]\nenabled = 1\n", "bad.toml:2: [web] enabled: expected true or false, got 1"),
        ("[web]\nport = 70000\n", "bad.toml:2: [web] port: expected an integer from 0 to 65535, got 70000"),
        ("[character]\naliases = [true]\n", "bad.toml:2: [character] aliases: expected a list of strings, got [True]"),
        ("model = 3\n", "bad.toml:1: model must be a [model] table"),
        ("[web\n", "bad.toml: not valid TOML"),
    ],
)
def test_each_mistake_is_one_clear_line(tmp_path, capsys, toml, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_config(str(bad))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    # Through the CLI: the same line, exit 2, no traceback.
    assert main(["--config", str(bad), "chat", "--once", "hi"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_file_names_it(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.toml"), "chat", "--once", "hi"]) == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err


def test_relative_paths_resolve_from_the_config_folder(tmp_path):
    path = tmp_path / "conf" / "rolebot.toml"
    path.parent.mkdir()
    path.write_text('[store]\npath = "db/bot.db"\n[adapters]\ndir = "store"\n', encoding="utf-8")
    config = load_config(str(path))
    assert config.database == (tmp_path / "conf" / "db" / "bot.db").resolve()
    assert config.adapter_root == (tmp_path / "conf" / "store").resolve()


def test_secrets_come_from_the_named_environment_variable(monkeypatch, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[discord]\ntoken_env = "MY_DISCORD"\n', encoding="utf-8")
    config = load_config(str(path))
    monkeypatch.setenv("MY_DISCORD", "s3cret-token")
    assert secret(config.discord.token_env) == "s3cret-token"
    assert "s3cret-token" not in repr(config)
    monkeypatch.setenv("MY_DISCORD", "  ")
    assert secret(config.discord.token_env) is None


def test_no_file_means_the_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROLEBOT_CONFIG", raising=False)
    assert load_config(None).model.base == "builtin:smollm2-135m"  # builtin:auto, settled by $ROLEBOT_BUILTIN


def test_the_docker_images_config_binds_everywhere_and_keeps_its_state_on_the_volume(tmp_path):
    """The Dockerfile's sed turns config.toml into docker.toml; run that very command."""
    import re
    import shlex
    import subprocess

    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    command = re.search(r"^RUN (sed .*?config\.toml) > docker\.toml$", text, re.S | re.M).group(1).replace("\\\n", " ")
    out = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (tmp_path / "docker.toml").write_text(out, encoding="utf-8")
    config = load_config(str(tmp_path / "docker.toml"))
    assert config.web.host == "0.0.0.0" and not config.console.enabled
    assert config.database == Path("/data/rolebot.db")
    assert config.path(config.web.session_secret) == Path("/data/web_session.key")
