"""Issue 27 item 8: API keys are kept as SHA-256 hashes (in the key file and in memory) and
managed with ``rolebot keys``; page sessions expire unless used and can be revoked
(``rolebot sessions``). No server and no model: the HTTP side is in test_web_hardening.py."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

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
