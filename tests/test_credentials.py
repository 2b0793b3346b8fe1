"""Issue 27 item 8: API keys are kept as SHA-256 hashes (in the key file and in memory) and
managed with ``rolebot keys``; page sessions expire unless used and can be revoked
(``rolebot sessions``). No server and no model: the HTTP side is in test_web_hardening.py."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from bot.cli import main
from bot.platforms.web_auth import Authenticator, Unauthorized, load_keys, parse_keys
from training.errors import UserError

ALICE, BOB, ACME, BETA = ("sk-alice-0123456789abcdef", "sk-bob-0123456789abcdefgh",
                          "sk-acme-0123456789abcdefgh", "sk-beta-0123456789abcdefgh")
KEYS_ENV = "ROLEBOT_TEST_CREDENTIALS_KEYS"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authenticator(keys) -> Authenticator:
    return Authenticator(secret=b"s" * 64, keys=keys, admin_token=None, admins=[], open_api=False)


# API keys


def test_a_key_file_may_hold_sha256_hashes_and_memory_holds_only_hashes(tmp_path: Path, monkeypatch):
    path = tmp_path / "keys.txt"
    path.write_text(f"# hashed and plain entries side by side\nsha256:{sha256(ALICE)} alice\n{BOB} bob\n", encoding="utf-8")
    monkeypatch.setenv(KEYS_ENV, f"sha256:{sha256(BETA).upper()}=beta/*,{ACME}=acme/*")
    keys = load_keys(path, KEYS_ENV)
    auth = authenticator(keys)
    assert auth.identify(f"Bearer {ALICE}", None, None).user == "alice"
    assert auth.identify(f"Bearer {BOB}", None, None).user == "bob"
    assert auth.identify(f"Bearer {BETA}", None, "carol").user == "beta/carol"
    assert auth.identify(f"Bearer {ACME}", None, "carol").user == "acme/carol"
    # The hash is not the key: whoever reads the key file cannot sign in with what it holds.
    for token in (f"sha256:{sha256(ALICE)}", sha256(ALICE), sha256(BOB)):
        with pytest.raises(Unauthorized, match="unknown API key"):
            auth.identify(f"Bearer {token}", None, None)
    # Plain entries are hashed as they are read: no key is left in memory.
    held = repr(keys) + repr(vars(auth))
    for key in (ALICE, BOB, ACME, BETA):
        assert key not in held
    assert {entry.identity: entry.hashed for entry in keys.values()} == {
        "alice": True, "bob": False, "beta/*": True, "acme/*": False}


def test_hashed_entries_are_checked_line_by_line():
    bad = {
        "sha256:abc alice": "line 1: a hashed key is 'sha256:' and the 64 hex digits",
        f"sha256:{'g' * 64} alice": "line 1: a hashed key is 'sha256:' and the 64 hex digits",
        f"sha256:{sha256(ALICE)} admin": "may not be 'admin'",
        # The same key listed plain and hashed is the same key twice.
        f"{ALICE} alice\nsha256:{sha256(ALICE)} bob": "line 2: this key is already listed (keys.txt line 1)",
        f"sha256:{sha256(ALICE)} alice\nsha256:{sha256(ALICE).upper()} bob": "line 2: this key is already listed",
    }
    for text, message in bad.items():
        with pytest.raises(UserError, match=re.escape(message)):
            parse_keys(text, "keys.txt")


# rolebot keys


def config_file(tmp_path: Path, web: str = 'api_keys_file = "keys.txt"') -> str:
    path = tmp_path / "config.toml"
    path.write_text(f"[web]\n{web}\n", encoding="utf-8")
    return str(path)


def added_key(out: str) -> str:
    [key] = re.findall(r"sk-[A-Za-z0-9_-]{40,}", out)
    return key


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(tmp_path: Path, capsys):
    config = config_file(tmp_path)
    assert main(["--config", config, "keys", "add", "alice"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()  # alone on stdout: KEY=$(rolebot keys add alice)
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", key), out
    assert key not in err and "only time" in err and "restart" in err  # a running bot reads the file when it starts
    path = tmp_path / "keys.txt"
    text = path.read_text(encoding="utf-8")
    assert key not in text and f"sha256:{sha256(key)} alice  # added " in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert authenticator(load_keys(path, "")).identify(f"Bearer {key}", None, None).user == "alice"

    # A second key appends to the file (one without a final newline too) and keeps what is there.
    path.write_text(text + f"# the old way\n{BOB} bob", encoding="utf-8")
    assert main(["--config", config, "keys", "add", "acme/*"]) == 0
    acme = added_key(capsys.readouterr().out)
    keys = load_keys(path, "")
    assert sorted(entry.identity for entry in keys.values()) == ["acme/*", "alice", "bob"]
    assert authenticator(keys).identify(f"Bearer {acme}", None, "carol").user == "acme/carol"

    assert main(["--config", config, "keys", "list"]) == 0
    listing = capsys.readouterr().out
    for identity, key_ in (("alice", key), ("acme/*", acme), ("bob", BOB)):
        assert identity in listing and sha256(key_)[:12] in listing and key_ not in listing
    assert "plain" in listing  # bob's entry is not hashed yet

    # Rotation: a second key for alice, then the first one removed by its hash's start.
    assert main(["--config", config, "keys", "add", "alice"]) == 0
    newer = added_key(capsys.readouterr().out)
    assert main(["--config", config, "keys", "remove", "alice", "--hash", sha256(key)[:12]]) == 0
    capsys.readouterr()
    auth = authenticator(load_keys(path, ""))
    assert auth.identify(f"Bearer {newer}", None, None).user == "alice"
    with pytest.raises(Unauthorized):
        auth.identify(f"Bearer {key}", None, None)

    assert main(["--config", config, "keys", "remove", "alice"]) == 0
    assert "restart" in capsys.readouterr().out
    after = path.read_text(encoding="utf-8")
    assert "alice" not in after and "# the old way" in after and f"{BOB} bob" in after
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(entry.identity for entry in load_keys(path, "").values()) == ["acme/*", "bob"]


def test_keys_commands_fail_in_one_line(tmp_path: Path, capsys):
    config = config_file(tmp_path)
    failures = [
        (["keys", "remove", "nobody"], "no key for 'nobody'"),
        (["keys", "add", "admin"], "may not be 'admin'"),
        (["keys", "add", "web-x"], "start with 'web-'"),
    ]
    (tmp_path / "keys.txt").write_text(f"{BOB} bob\n", encoding="utf-8")
    for argv, message in failures:
        assert main(["--config", config, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert (tmp_path / "keys.txt").read_text(encoding="utf-8") == f"{BOB} bob\n"
    # A broken key file is named, line and all, and left as it was.
    (tmp_path / "keys.txt").write_text("short bob\n", encoding="utf-8")
    assert main(["--config", config, "keys", "add", "carol"]) == 2
    assert "keys.txt line 1: the key is 5 characters" in capsys.readouterr().err
    assert (tmp_path / "keys.txt").read_text(encoding="utf-8") == "short bob\n"
    # With no [web] api_keys_file and no --file there is nowhere to keep the key.
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["--config", config_file(bare, ""), "keys", "add", "carol"]) == 2
    err = capsys.readouterr().err
    assert "[web] api_keys_file" in err and "--file" in err and err.count("\n") == 1
    assert main(["--config", config_file(bare, ""), "keys", "add", "carol", "--file", str(bare / "k.txt")]) == 0
    carol = added_key(capsys.readouterr().out)
    assert authenticator(load_keys(bare / "k.txt", "")).identify(f"Bearer {carol}", None, None).user == "carol"
    assert stat.S_IMODE((bare / "k.txt").stat().st_mode) == 0o600
    assert not os.path.exists(bare / "keys.txt")
