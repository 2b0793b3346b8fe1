"""Issue 27 item 8: API keys are kept as SHA-256 hashes (in the key file and in memory) and
managed with ``rolebot keys``; page sessions expire unless used and can be revoked
(``rolebot sessions``). No server and no model: the HTTP side is in test_web_hardening.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
import time
from pathlib import Path

import pytest

from bot.cli import main
from bot.platforms.web_auth import Authenticator, Revocations, Unauthorized, load_keys, parse_keys
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


# Page sessions


DAY = 86400.0
SECRET = b"s" * 64


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def sessions(root: Path, clock: Clock, days: int = 30) -> Authenticator:
    """What a bot with this data folder builds when it starts."""
    revocations = Revocations.open(root / "web_session.revoked", lifetime_s=days * DAY, clock=clock)
    return Authenticator(secret=SECRET, keys={}, admin_token=None, admins=[], open_api=False,
                         session_days=days, revocations=revocations, clock=clock)


def test_a_session_lasts_session_days_after_its_last_use(tmp_path: Path):
    clock = Clock()
    auth = sessions(tmp_path, clock)
    cookie = auth.new_session()
    user = auth.session_user(cookie)
    assert user and user.startswith("web-") and auth.max_age == 30 * 86400
    assert auth.refreshed(cookie) is None  # used within the day: not re-issued on every request
    clock.now += 29 * DAY
    assert auth.session_user(cookie) == user
    fresh = auth.refreshed(cookie)  # an active browser gets a new cookie for the same id
    assert fresh != cookie and auth.session_user(fresh) == user
    clock.now += 2 * DAY
    assert auth.session_user(cookie) is None  # 31 days since it was issued
    with pytest.raises(Unauthorized, match="expired"):
        auth.identify(None, cookie, None)
    assert auth.session_user(fresh) == user and auth.identify(None, fresh, None).user == user
    # A cookie stamped in the future is made up (only a leaked secret could sign one).
    ahead = Authenticator(secret=SECRET, keys={}, admin_token=None, admins=[], open_api=False,
                          clock=lambda: clock.now + 2 * DAY).new_session()
    assert auth.session_user(ahead) is None


def test_revoked_sessions_are_refused_by_a_running_bot_and_after_a_restart(tmp_path: Path, capsys):
    config = config_file(tmp_path, "")
    clock = Clock(time.time())
    running = sessions(tmp_path, clock)
    alice, bob = running.new_session(), running.new_session()
    alice_id, bob_id = running.session_user(alice), running.session_user(bob)
    clock.now += 1

    assert main(["--config", config, "sessions", "revoke", alice_id]) == 0
    assert alice_id in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "web_session.revoked").stat().st_mode) == 0o600
    assert running.session_user(alice) is None and running.session_user(bob) == bob_id  # no restart needed
    with pytest.raises(Unauthorized, match="revoked"):
        running.identify(None, alice, None)
    assert running.refreshed(alice) is None  # a revoked cookie is never re-issued
    later = sessions(tmp_path, clock)  # the bot restarted
    assert later.session_user(alice) is None and later.session_user(bob) == bob_id
    assert main(["--config", config, "sessions", "list"]) == 0
    assert alice_id in capsys.readouterr().out

    clock.now += 1
    assert main(["--config", config, "sessions", "revoke", "--all"]) == 0
    capsys.readouterr()
    for auth in (running, sessions(tmp_path, clock)):
        assert auth.session_user(bob) is None
    clock.now += 0.01
    new = running.new_session()  # sessions made after the revocation work
    assert running.session_user(new) and sessions(tmp_path, clock).session_user(new)

    assert main(["--config", config, "sessions", "list"]) == 0
    assert "every session issued until" in capsys.readouterr().out  # alice's own entry is covered now
    for argv, message in ((["sessions", "revoke", "alice"], "not a page session"),
                          (["sessions", "revoke"], "WEB_USER_ID or --all"),
                          (["sessions", "revoke", "--all", alice_id], "WEB_USER_ID or --all")):
        assert main(["--config", config, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_cookie_from_before_the_upgrade_keeps_its_id_for_one_lifetime(tmp_path: Path):
    """Cookies were ``web-<id>.<signature>`` with no time in them: a browser keeps its
    conversation, gets a stamped cookie on its next request, and the old form expires
    session_days after the first start that knew about lifetimes."""
    user = "web-0123456789abcdefghijkl"
    old = f"{user}.{base64.urlsafe_b64encode(hmac.new(SECRET, user.encode(), 'sha256').digest()).rstrip(b'=').decode()}"
    clock = Clock()
    auth = sessions(tmp_path, clock)
    assert auth.session_user(old) == user
    stamped = auth.refreshed(old)
    assert stamped and stamped.count(".") == 2 and auth.session_user(stamped) == user
    clock.now += 31 * DAY
    assert sessions(tmp_path, clock).session_user(old) is None  # a restart does not start its clock again
    assert auth.session_user(stamped) is None
    # Any revocation covers old cookies too.
    other = tmp_path / "other"
    other.mkdir()
    auth = sessions(other, Clock(time.time()))
    assert auth.session_user(old) == user
    assert main(["--config", config_file(other, ""), "sessions", "revoke", user]) == 0
    assert auth.session_user(old) is None


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give files away")
def test_run_with_sudo_the_commands_leave_the_files_to_the_bots_user(tmp_path: Path, capsys):
    """The bot reads these files as its own user; a rewrite by root must not take them away."""
    config = config_file(tmp_path)
    keys, revoked = tmp_path / "keys.txt", tmp_path / "web_session.revoked"
    keys.write_text(f"{BOB} bob\n{ACME} acme/*\n", encoding="utf-8")
    Revocations.open(revoked, lifetime_s=DAY)
    for path in (keys, revoked):
        os.chown(path, 4321, 4321)
    assert main(["--config", config, "keys", "remove", "bob"]) == 0
    assert main(["--config", config, "sessions", "revoke", "--all"]) == 0
    for path in (keys, revoked):
        assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321), path
