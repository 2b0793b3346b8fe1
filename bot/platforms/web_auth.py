"""Who a web request is: a signed session cookie (the chat page), an API key (the HTTP API), the
admin token, or, on a loopback-only server with no keys, whoever a local tool says it is.

| credential                  | identity (the store's user id)       | admin                      |
|-----------------------------|--------------------------------------|----------------------------|
| ``Authorization: Bearer`` admin token | ``admin``                  | yes                        |
| ``Bearer`` key → ``alice``  | ``alice``; the ``user`` field is ignored | if in ``admins_web``    |
| ``Bearer`` key → ``acme/*`` | ``acme/<user>`` (``acme/anonymous``) | if ``acme/<user>`` is listed |
| session cookie              | ``web-<random id>``                  | if listed                  |
| nothing (or any key), API open | the ``user`` field, or ``anonymous`` | never                   |
| nothing, API closed         | refused with 401                     |                            |

The API is open only when ``[web] host`` is a loopback address and no key is configured: then
every caller already runs on this machine. A session cookie is ``<id>.<HMAC-SHA256 of the id>``
with a secret kept in the data folder (created on first start, mode 0600); a browser cannot
make one for an id it was not given.

A key file's entry is ``KEY IDENTITY`` or ``sha256:<hex SHA-256 of the key> IDENTITY`` (what
``rolebot keys add`` writes); either way only the hash is held in memory, and a request's key is
hashed and compared with every known hash in constant time. The hash itself is no key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

COOKIE = "rolebot_session"
SESSION_PREFIX = "web-"
ADMIN_IDENTITY = "admin"
COOKIE_MAX_AGE = 400 * 24 * 3600  # the longest browsers keep a cookie
MIN_KEY_CHARS = 16
HASHED = "sha256:"  # a key file's entry that holds the key's hash, not the key
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# An identity in a key file: a user id, or NAME/* for a key that acts for many end users.
IDENTITY = re.compile(r"^[A-Za-z0-9_.@:+-]{1,128}(/\*)?$")


class Unauthorized(Exception):
    """No acceptable credential; the message says what to send."""


@dataclass(frozen=True)
class Identity:
    user: str  # the store's platform user id, also the chat id of the user's conversation
    admin: bool = False
    keyed: bool = False  # authenticated by an API key or the admin token (not rate-limited per address)


@dataclass(frozen=True)
class ApiKey:
    identity: str  # "alice", or "acme/*"
    where: str  # "keys.txt line 3", for messages
    hashed: bool = True  # listed as sha256:<hex> (False: the key itself, hashed when read)

    @property
    def many(self) -> bool:
        return self.identity.endswith("/*")

    def user(self, claimed: str | None) -> str:
        """The user this key acts as; a many-user key's end users live under its name."""
        if not self.many:
            return self.identity
        return f"{self.identity[:-2]}/{claimed or 'anonymous'}"


def key_hash(key: str) -> str:
    """What a key file may hold instead of the key, and all that memory holds of any key: the
    hex SHA-256 of the key's UTF-8 bytes (``printf %s KEY | sha256sum``)."""
    return hashlib.sha256(key.encode()).hexdigest()


def identity_problem(identity: str) -> str | None:
    """Why ``identity`` cannot be a key's identity, or None."""
    if not IDENTITY.match(identity) or identity.startswith(SESSION_PREFIX) or identity in (ADMIN_IDENTITY, "anonymous"):
        return (f"identity {identity!r} must be letters, digits and _.@:+- (at most 128), "
                f"optionally ending in /* for a key that acts for many users; it may not be "
                f"'{ADMIN_IDENTITY}', 'anonymous' or start with '{SESSION_PREFIX}'")
    return None


def parse_entry(line: str, where: str) -> tuple[str, ApiKey] | None:
    """One line of a key file, its comment already cut: None if blank, else (the key's hash,
    the entry). ``KEY IDENTITY``, ``KEY=IDENTITY``, or ``sha256:<hex of the key> IDENTITY``."""
    line = line.strip()
    if not line:
        return None
    parts = line.replace("=", " ", 1).split()
    if len(parts) != 2:
        raise UserError(f"{where}: expected 'KEY IDENTITY' or 'sha256:<hex> IDENTITY' (e.g. 'sk-3f9a… alice' or "
                        f"'sk-… acme/*'; rolebot keys add makes one), got {len(parts)} fields")
    key, identity = parts
    if key.lower().startswith(HASHED):
        digest = key[len(HASHED):].lower()
        if not HEX_DIGEST.match(digest):
            raise UserError(f"{where}: a hashed key is '{HASHED}' and the 64 hex digits of the key's SHA-256 "
                            f"(printf %s KEY | sha256sum), got {len(digest)} characters")
        hashed = True
    else:
        if len(key) < MIN_KEY_CHARS:
            raise UserError(f"{where}: the key is {len(key)} characters; use at least {MIN_KEY_CHARS} "
                            "(rolebot keys add makes a strong one)")
        digest, hashed = key_hash(key), False
    if problem := identity_problem(identity):
        raise UserError(f"{where}: {problem}")
    return digest, ApiKey(identity, where, hashed)


def parse_keys(text: str, source: str, *, separators: str = "\n") -> dict[str, ApiKey]:
    """Entries by the hash of their key (see ``parse_entry``); ``#`` starts a comment. Errors
    name the line. No key is kept: a plain entry is hashed as it is read."""
    keys: dict[str, ApiKey] = {}
    entries = text.splitlines() if separators == "\n" else re.split(r"[\n,]", text)
    for number, raw in enumerate(entries, 1):
        where = f"{source} line {number}" if separators == "\n" else f"{source} entry {number}"
        parsed = parse_entry(raw.split("#", 1)[0], where)
        if parsed is None:
            continue
        digest, entry = parsed
        if digest in keys:
            raise UserError(f"{where}: this key is already listed ({keys[digest].where}); each key maps to one identity")
        keys[digest] = entry
    return keys


def load_keys(path: Path | None, env_name: str) -> dict[str, ApiKey]:
    keys: dict[str, ApiKey] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"[web] api_keys_file {path}: {exc.strerror or exc}; create it or set "
                            "api_keys_file = \"\"") from None
        keys.update(parse_keys(text, str(path)))
    value = os.environ.get(env_name, "") if env_name else ""
    if value.strip():
        for digest, entry in parse_keys(value, f"${env_name}", separators=",").items():
            if digest in keys:
                raise UserError(f"{entry.where}: this key is already listed ({keys[digest].where})")
            keys[digest] = entry
    return keys


def load_secret(path: Path) -> bytes:
    """The cookie-signing secret, created (32 random bytes, mode 0600) if the file is absent."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            value = path.read_bytes().strip()
        else:
            value = secrets.token_hex(32).encode()
            with os.fdopen(fd, "wb") as out:
                out.write(value + b"\n")
                out.flush()
                os.fsync(out.fileno())
    except OSError as exc:
        raise UserError(f"[web] session_secret {path}: {exc.strerror or exc}; make its folder writable "
                        "or point session_secret elsewhere") from None
    if len(value) < 32:
        raise UserError(f"[web] session_secret {path}: the secret is {len(value)} bytes, too short to sign "
                        "cookies; delete the file (a new one is made at start; page users get new sessions)")
    return value


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Turns a request's headers and cookie into an ``Identity``, or raises ``Unauthorized``."""

    def __init__(self, *, secret: bytes, keys: dict[str, ApiKey], admin_token: str | None,
                 admins: list[str], open_api: bool, keys_hint: str = "[web] api_keys_file or $ROLEBOT_API_KEYS"):
        self._secret = secret
        self._hint = keys_hint
        self._keys = keys
        self._admin_token = admin_token
        self._admins = frozenset(admins)
        self.open_api = open_api

    # Sessions

    def new_session(self) -> str:
        return self._sign(SESSION_PREFIX + secrets.token_urlsafe(16))

    def session_user(self, cookie: str | None) -> str | None:
        """The id a cookie carries if its signature is ours, else None."""
        if not cookie or "." not in cookie:
            return None
        user, _, signature = cookie.rpartition(".")
        if not user.startswith(SESSION_PREFIX) or not hmac.compare_digest(self._sign(user), cookie):
            return None
        return user

    def _sign(self, user: str) -> str:
        digest = hmac.new(self._secret, user.encode(), hashlib.sha256).digest()
        return f"{user}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"

    # Requests

    def identify(self, authorization: str | None, cookie: str | None, claimed: str | None) -> Identity:
        """``claimed`` is the request's ``user`` field (already cleaned), or None."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("the Authorization header must be 'Bearer <API key>'")
            if self._admin_token and hmac.compare_digest(token.encode(), self._admin_token.encode()):
                return Identity(ADMIN_IDENTITY, admin=True, keyed=True)
            key = self._find_key(token)
            if key is None and self.open_api:
                # With no keys configured any key is accepted, as vLLM and llama.cpp do: local
                # tools such as the OpenAI client always send one.
                return Identity(claimed or "anonymous")
            if key is None:
                raise Unauthorized(f"unknown API key: send Authorization: Bearer <key> with a key from {self._hint}")
            user = key.user(claimed)
            return Identity(user, admin=user in self._admins, keyed=True)
        session = self.session_user(cookie)
        if session is not None:
            return Identity(session, admin=session in self._admins)
        if cookie:
            raise Unauthorized("the session cookie is not valid (signed by another server or altered); "
                               "reload the chat page for a new one")
        if self.open_api:
            return Identity(claimed or "anonymous")
        raise Unauthorized(f"this server needs an API key: send Authorization: Bearer <key> (keys are set with "
                           f"{self._hint}), or use the chat page")

    def _find_key(self, token: str) -> ApiKey | None:
        # Only hashes are held: compare the token's with every one in constant time, so the
        # answer's timing says nothing.
        digest = key_hash(token).encode()
        found = None
        for known, entry in self._keys.items():
            if hmac.compare_digest(digest, known.encode()):
                found = entry
        return found
