"""``rolebot keys``: add, list and remove the web API's keys in the key file ([web] api_keys_file)."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

from bot.config import load_config
from bot.platforms.web_auth import HASHED, key_hash, load_keys, parse_entry, parse_keys, same_owner
from training.errors import UserError

DESCRIPTION = """\
Manage the keys of the web API (Authorization: Bearer <key>) in the key file, [web] api_keys_file
(or --file). Each line is 'KEY IDENTITY' or 'sha256:<hex> IDENTITY', where the hex is the key's
SHA-256: `add` makes a strong key, appends only its hash and prints the key once, on stdout
alone (KEY=$(rolebot keys add alice) keeps it); nobody can read it back from the file. IDENTITY
is a user id (the key's conversations are that user's), or NAME/* for a key that acts for many
end users (the request's user field becomes NAME/<user>).

A running bot reads the key file when it starts: restart it (rolebot serve) after adding or
removing a key. Keys in $ROLEBOT_API_KEYS ([web] api_keys_env) are listed too, but are changed
where that variable is set.
"""
RESTART = "A running bot reads the key file when it starts: restart it (rolebot serve) for this to take effect."


def register(sub) -> None:
    parser = sub.add_parser("keys", help="add, list or remove web API keys (stored as SHA-256 hashes)",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    file_help = "the key file (default: [web] api_keys_file of the config)"
    add = actions.add_parser("add", help="make a key for IDENTITY, store its hash, print the key once",
                             description="Make a key (sk- and 43 random characters) for IDENTITY, append "
                             "'sha256:<hex> IDENTITY' to the key file (created with mode 0600) and print "
                             "the key, once, alone on stdout. " + RESTART)
    add.add_argument("identity", metavar="IDENTITY", help="a user id (alice) or NAME/* for a key of many end users")
    add.add_argument("--file", metavar="F", help=file_help)
    add.set_defaults(run=add_key)
    listing = actions.add_parser("list", help="identities and key hashes (never the keys)",
                                 description="Every key the bot would load: its identity, the start of its "
                                 "hash, whether the file holds it hashed or plain, and where it is listed.")
    listing.add_argument("--file", metavar="F", help=file_help)
    listing.set_defaults(run=list_keys)
    remove = actions.add_parser("remove", help="remove IDENTITY's keys from the key file",
                                description="Remove every entry of IDENTITY from the key file (comments and "
                                "other entries stay), or with --hash only the one whose hash starts so "
                                "(rolebot keys list shows it): add a new key, then remove the old one to "
                                "rotate. " + RESTART)
    remove.add_argument("identity", metavar="IDENTITY")
    remove.add_argument("--hash", metavar="PREFIX", help="only the key whose SHA-256 starts with PREFIX (hex)")
    remove.add_argument("--file", metavar="F", help=file_help)
    remove.set_defaults(run=remove_key)


def _key_file(args, config) -> Path:
    if args.file:
        return Path(args.file).resolve()
    if config.web.api_keys_file:
        return config.path(config.web.api_keys_file)
    raise UserError("no key file: set [web] api_keys_file in the config (e.g. api_keys_file = \"keys.txt\", "
                    "which the bot then reads) or pass --file FILE")


def _read(path: Path) -> str:
    """The key file's text ('' if it does not exist yet), checked line by line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"key file {path}: {getattr(exc, 'strerror', None) or exc}; fix it or pass --file") from None
    parse_keys(text, str(path))  # a broken file is named, line and all, and not touched
    return text


def add_key(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = _key_file(args, config)
    where = f"rolebot keys add {args.identity}"
    parse_entry(f"{HASHED}{'0' * 64} {args.identity}", where)  # the identity's rules, before anything is written
    text = _read(path)
    key = "sk-" + secrets.token_urlsafe(32)
    line = f"{HASHED}{key_hash(key)} {args.identity}  # added {time.strftime('%Y-%m-%d')} by rolebot keys add\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (("\n" if text and not text.endswith("\n") else "") + line).encode())  # one append
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise UserError(f"key file {path}: {exc.strerror or exc}; make it writable or pass --file") from None
    print(key)
    print(f"Added a key for {args.identity} to {path}: the file keeps only its SHA-256, so this is the only time "
          "the key is shown. Clients send it as Authorization: Bearer <key>.", file=sys.stderr)
    _note_other_file(path, config)
    print(RESTART, file=sys.stderr)
    return 0


def _note_other_file(path: Path, config) -> None:
    configured = config.path(config.web.api_keys_file) if config.web.api_keys_file else None
    if configured != path:
        print(f"Note: the bot reads {configured if configured else 'no key file'} ([web] api_keys_file), "
              f"not {path}.", file=sys.stderr)


def list_keys(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = None
    if args.file or config.web.api_keys_file:
        path = _key_file(args, config)
        if not path.exists():
            print(f"{path} does not exist yet (rolebot keys add creates it).")
            path = None
    keys = load_keys(path, config.web.api_keys_env)
    if not keys:
        print(f"No API keys (in [web] api_keys_file or ${config.web.api_keys_env}).")
        return 0
    entries = sorted(keys.items(), key=lambda item: item[1].identity)
    width = max(len("identity"), *(len(entry.identity) for _, entry in entries))
    print(f"{'identity':<{width}}  {'key hash':<20}  {'stored':<6}  where")
    for digest, entry in entries:
        print(f"{entry.identity:<{width}}  {HASHED}{digest[:12]}…  {'hashed' if entry.hashed else 'plain':<6}  {entry.where}")
    if any(not entry.hashed for entry in keys.values()):
        print("plain: the line holds the key itself; put 'sha256:' and its hash there instead "
              "(printf %s KEY | sha256sum), or replace it with a key from rolebot keys add.")
    return 0


def remove_key(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = _key_file(args, config)
    prefix = (args.hash or "").lower().removeprefix(HASHED)
    text = _read(path)
    kept, removed = [], 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        parsed = parse_entry(line.split("#", 1)[0], f"{path} line {number}")
        if parsed and parsed[1].identity == args.identity and parsed[0].startswith(prefix):
            removed += 1
        else:
            kept.append(line)
    if not removed:
        known = sorted({e.identity for e in parse_keys(text, str(path)).values()})
        which = f"no key for {args.identity!r}" + (f" whose hash starts with {prefix}" if prefix else "")
        elsewhere = args.identity in {e.identity for e in load_keys(None, config.web.api_keys_env).values()}
        hint = (f"it is in ${config.web.api_keys_env}: remove it where that variable is set" if elsewhere
                else f"its identities: {', '.join(known) or 'none'} (rolebot keys list)")
        raise UserError(f"key file {path}: {which}; {hint}")
    _replace(path, "".join(kept))
    print(f"Removed {removed} key{'s' if removed > 1 else ''} of {args.identity} from {path}.")
    print(RESTART)
    return 0


def _replace(path: Path, text: str) -> None:
    """Write ``text`` over ``path`` at once (a temporary file beside it, then a rename), keeping its mode."""
    try:
        mode = path.stat().st_mode & 0o777
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, mode)
            same_owner(temporary, path)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise UserError(f"key file {path}: {exc.strerror or exc}; make its folder writable") from None
