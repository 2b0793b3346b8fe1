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
every caller already runs on this machine. A session cookie is ``<id>.<issued, ms>.<HMAC-SHA256
of both>`` with a secret kept in the data folder (created on first start, mode 0600); a browser
cannot make one for an id it was not given, nor change when it was issued. A cookie is good for
``[web] session_days`` after it was issued and is re-issued (same id, new time) at most once a day
while the browser uses it, so an active browser stays signed in and an idle one is signed out.
``rolebot sessions revoke`` refuses the cookies issued before now, of one id or of all
(``Revocations``: a small file beside the secret, which the running bot reads again whenever it
changes, so no restart is needed and the refusal survives restarts). Cookies from before the
stamp (``<id>.<signature>``) are accepted, and re-issued stamped, for one lifetime from the first
start that keeps revocations; any revocation that names them refuses them.

A key file's entry is ``KEY IDENTITY`` or ``sha256:<hex SHA-256 of the key> IDENTITY`` (what
``rolebot keys add`` writes); either way only the hash is held in memory, and a request's key is
hashed and compared with every known hash in constant time. The hash itself is no key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

log = logging.getLogger(__name__)

COOKIE = "rolebot_session"
SESSION_PREFIX = "web-"
ADMIN_IDENTITY = "admin"
SESSION_DAYS = 30  # [web] session_days: how long a page session lasts after its last use
DAY_MS = 24 * 3600 * 1000
# A stamp this far ahead of the clock was not made here (only a leaked secret could sign it).
FUTURE_SLACK_MS = 5 * 60 * 1000
# Revocations older than the longest session_days can refuse nothing more and are dropped.
KEEP_REVOCATIONS_MS = 400 * DAY_MS
SESSION_ID = re.compile(r"^web-[A-Za-z0-9_-]{1,64}$")
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


def revocations_path(secret: Path) -> Path:
    """Where the revocations of the sessions ``secret`` signs are kept: beside it, ``.revoked``."""
    return secret.with_suffix(".revoked")


def now_ms(clock: Callable[[], float] = time.time) -> int:
    return int(clock() * 1000)


class Revocations:
    """The page sessions refused although their signature is good: those issued at or before a
    time, of every id (``all_before``) or of one (``users``), in milliseconds since the epoch::

        {"unstamped_until": 1767225600000, "all_before": null, "users": {"web-…": 1764633600000}}

    ``unstamped_until`` ends the cookies made before they carried a time. The file (JSON, mode
    0600, replaced whole) is read again whenever it changes, so a running bot follows
    ``rolebot sessions revoke`` from its next request. Deleting it clears every revocation."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time):
        self.path = path
        self._clock = clock
        self._seen: tuple | None = None  # (mtime_ns, size, inode) of the file the state came from
        self._state: dict = {"unstamped_until": 0, "all_before": None, "users": {}}

    @classmethod
    def open(cls, path: Path, *, lifetime_s: float, clock: Callable[[], float] = time.time) -> Revocations:
        """The revocations as a bot starts with them; the file is made first if there is none
        (old cookies then last ``lifetime_s`` from now). A broken file is a ``UserError``."""
        revocations = cls(path, clock=clock)
        if not path.exists():
            revocations._write(revocations._fresh_state(lifetime_s), exclusive=True)
        revocations._reload(strict=True)
        return revocations

    @property
    def unstamped_until(self) -> int:
        self._reload()
        return self._state["unstamped_until"]

    def state(self) -> dict:
        self._reload(strict=True)
        return json.loads(json.dumps(self._state))

    def refused(self, user: str, issued: int | None) -> bool:
        """Whether a cookie of ``user`` issued at ``issued`` (ms; None: before stamps) is revoked."""
        self._reload()
        all_before, users = self._state["all_before"], self._state["users"]
        if issued is None:
            return all_before is not None or user in users
        return (all_before is not None and issued <= all_before) or issued <= users.get(user, -1)

    def revoke(self, user: str | None, *, lifetime_s: float) -> int:
        """Refuse the sessions of ``user`` (None: of everyone) issued until now; returns now (ms)."""
        if self.path.exists():
            self._reload(strict=True)
            state = json.loads(json.dumps(self._state))
        else:
            state = self._fresh_state(lifetime_s)
        now = now_ms(self._clock)
        if user is None:
            state["all_before"] = now
            state["users"] = {}
        else:
            state["users"][user] = now
        if now > state["unstamped_until"]:  # an old revocation can refuse nothing any more
            state["users"] = {u: t for u, t in state["users"].items() if t > now - KEEP_REVOCATIONS_MS}
        self._write(state, exclusive=False)
        self._reload(strict=True)
        return now

    def _fresh_state(self, lifetime_s: float) -> dict:
        return {"unstamped_until": now_ms(self._clock) + int(lifetime_s * 1000), "all_before": None, "users": {}}

    def _reload(self, strict: bool = False) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._seen != "missing":  # deleted: every revocation is cleared
                self._state = {**self._state, "all_before": None, "users": {}}
                self._seen = "missing"
            return
        except OSError as exc:
            if strict:
                raise UserError(f"session revocations {self.path}: {exc.strerror or exc}; make it readable") from None
            return
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return
        try:
            self._state = self._parse(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = (f"session revocations {self.path}: {getattr(exc, 'strerror', None) or exc}; rolebot sessions "
                       "revoke rewrites it, or delete it to clear every revocation")
            if strict:
                raise UserError(problem) from None
            log.warning("%s (the revocations read before stay in force)", problem)
        self._seen = seen

    @staticmethod
    def _parse(text: str) -> dict:
        data = json.loads(text)
        ok = (isinstance(data, dict) and type(data.get("unstamped_until")) is int
              and (data.get("all_before") is None or type(data.get("all_before")) is int)
              and isinstance(data.get("users"), dict)
              and all(isinstance(u, str) and type(t) is int for u, t in data["users"].items()))
        if not ok:
            raise ValueError("not a revocation file: expected {\"unstamped_until\": ms, \"all_before\": ms or null, "
                             "\"users\": {id: ms}}")
        return {"unstamped_until": data["unstamped_until"], "all_before": data["all_before"], "users": dict(data["users"])}

    def _write(self, state: dict, *, exclusive: bool) -> None:
        """The whole file at once: a temporary file beside it, then a rename (``exclusive``: a
        link, which leaves a file that appeared meanwhile as it is)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")  # mode 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(state, out, indent=1)
                    out.write("\n")
                    out.flush()
                    os.fsync(out.fileno())
                if exclusive:
                    try:
                        os.link(temporary, self.path)
                    except FileExistsError:
                        pass
                else:
                    same_owner(temporary, self.path)
                    os.replace(temporary, self.path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
        except OSError as exc:
            raise UserError(f"session revocations {self.path}: {exc.strerror or exc}; make its folder writable "
                            "or point [web] session_secret elsewhere") from None


def same_owner(temporary: str | Path, path: Path) -> None:
    """Give a file about to replace ``path`` the owner ``path`` has, where this process may (run
    as root, e.g. with sudo): a bot running as that owner must go on reading it."""
    try:
        old, new = os.stat(path), os.stat(temporary)
    except FileNotFoundError:
        return
    if (old.st_uid, old.st_gid) != (new.st_uid, new.st_gid):
        try:
            os.chown(temporary, old.st_uid, old.st_gid)
        except PermissionError:
            log.warning("%s belongs to uid %d; written as uid %d, the bot may not read it: run rolebot as the "
                        "bot's user", path, old.st_uid, new.st_uid)


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
                 admins: list[str], open_api: bool, keys_hint: str = "[web] api_keys_file or $ROLEBOT_API_KEYS",
                 session_days: int = SESSION_DAYS, revocations: Revocations | None = None,
                 clock: Callable[[], float] = time.time):
        self._secret = secret
        self._hint = keys_hint
        self._keys = keys
        self._admin_token = admin_token
        self._admins = frozenset(admins)
        self.open_api = open_api
        self.session_days = session_days
        self.max_age = session_days * 24 * 3600  # the cookie's Max-Age, seconds
        self._lifetime_ms = self.max_age * 1000
        self._reissue_ms = min(DAY_MS, self._lifetime_ms // 2)
        self._revocations = revocations
        self._clock = clock

    # Sessions

    def new_session(self) -> str:
        return self._stamped(SESSION_PREFIX + secrets.token_urlsafe(16))

    def session_user(self, cookie: str | None) -> str | None:
        """The id a cookie carries if its signature is ours and it is neither expired nor revoked, else None."""
        return self._session(cookie)[0]

    def refreshed(self, cookie: str | None) -> str | None:
        """A new cookie for a good one issued more than a day ago (or before stamps), else None:
        an active browser's session goes on, an idle one ends ``session_days`` after its last use."""
        user, issued, _ = self._session(cookie)
        if user is None or (issued is not None and now_ms(self._clock) - issued < self._reissue_ms):
            return None
        return self._stamped(user)

    def _session(self, cookie: str | None) -> tuple[str | None, int | None, str | None]:
        """(user, issued in ms or None for a cookie from before stamps, None) for a good cookie;
        (None, None, what is wrong) for any other, and (None, None, None) for none."""
        if not cookie:
            return None, None, None
        parts = cookie.split(".")
        user, stamp = parts[0], parts[1] if len(parts) == 3 else None
        signed = f"{user}.{stamp}" if stamp is not None else user
        if (len(parts) not in (2, 3) or not SESSION_ID.match(user)
                or (stamp is not None and not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 15))
                or not hmac.compare_digest(self._sign(signed).encode(), cookie.encode())):
            return None, None, "is not valid (signed by another server or altered)"
        now = now_ms(self._clock)
        issued = int(stamp) if stamp is not None else None
        if issued is not None and issued > now + FUTURE_SLACK_MS:
            return None, None, "is not valid (issued in the future)"
        until = self._revocations.unstamped_until if self._revocations else 0
        if (now - issued > self._lifetime_ms) if issued is not None else now >= until:
            return None, None, f"has expired (a chat page session lasts {self.session_days} days after its last use)"
        if self._revocations is not None and self._revocations.refused(user, issued):
            return None, None, "was revoked (rolebot sessions revoke)"
        return user, issued, None

    def _stamped(self, user: str) -> str:
        return self._sign(f"{user}.{now_ms(self._clock)}")

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"

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
        session, _, problem = self._session(cookie)
        if session is not None:
            return Identity(session, admin=session in self._admins)
        if cookie:
            raise Unauthorized(f"the session cookie {problem}; reload the chat page for a new one")
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
