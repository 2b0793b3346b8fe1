"""``rolebot sessions``: sign chat page sessions out (revoke their cookies) and see which are."""

from __future__ import annotations

import argparse
import sqlite3
import time

from bot.config import load_config
from bot.platforms.web_auth import SESSION_ID, Revocations, revocations_path
from training.errors import UserError

DESCRIPTION = """\
The chat page gives each browser a session: a signed cookie that carries its id (web-<random>,
the user and chat id of its conversation in the store) and the time it was issued. A session
lasts [web] session_days (30) after its last use: the cookie is re-issued at most once a day
while the page is used.

`revoke WEB_USER_ID` refuses every cookie of that id issued until now, `revoke --all` every
cookie of every id; the browser then gets a new, empty session (its old conversation stays in
the store). Revocations are kept in a small file beside [web] session_secret (web_session.revoked),
which a running bot reads again whenever it changes: it refuses those cookies from its next
request, without a restart, and after any restart. Deleting that file clears every revocation.
If the secret itself got out, delete [web] session_secret's file and restart the bot instead:
every cookie it ever signed is void then. API keys are signed out with `rolebot keys remove`.
"""


def register(sub) -> None:
    parser = sub.add_parser("sessions", help="revoke chat page sessions (their cookies), or list them",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    revoke = actions.add_parser("revoke", help="refuse the cookies of one page session (WEB_USER_ID) or all (--all)",
                                description="Refuse the session cookies issued until now: of WEB_USER_ID "
                                "(web-…, as `rolebot sessions list` shows) or, with --all, of every browser. "
                                "A running bot follows from its next request; no restart is needed.")
    revoke.add_argument("user", nargs="?", metavar="WEB_USER_ID", help="the page session's id, web-…")
    revoke.add_argument("--all", action="store_true", help="every page session")
    revoke.set_defaults(run=revoke_sessions)
    listing = actions.add_parser("list", help="the revocations in force and the page sessions in the store",
                                 description="The revocations in force, then the page sessions the store "
                                 "knows (the ids rolebot sessions revoke takes), most recently active first.")
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="page sessions shown (default 20)")
    listing.set_defaults(run=list_sessions)


def _revocations(config) -> Revocations:
    return Revocations(revocations_path(config.path(config.web.session_secret)))


def revoke_sessions(args: argparse.Namespace) -> int:
    if bool(args.user) == bool(args.all):
        raise UserError("rolebot sessions revoke: give WEB_USER_ID or --all (one of them)")
    if args.user and not SESSION_ID.match(args.user):
        raise UserError(f"{args.user!r} is not a page session id: those are web-<random> (rolebot sessions list "
                        "shows them); an API key's identity is signed out with rolebot keys remove")
    config = load_config(args.config)
    revocations = _revocations(config)
    revocations.revoke(args.user, lifetime_s=config.web.session_days * 24 * 3600)
    whose = f"of {args.user}" if args.user else "of every browser"
    print(f"Revoked the chat page sessions {whose} issued until now ({revocations.path}). A running bot "
          "refuses their cookies from its next request; the page gives those browsers new sessions.")
    return 0


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def list_sessions(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    revocations = _revocations(config)
    print(f"A chat page session lasts {config.web.session_days} days after its last use ([web] session_days).")
    if not revocations.path.exists():
        print(f"No revocations ({revocations.path} does not exist yet).")
    else:
        state = revocations.state()
        print(f"Revocations ({revocations.path}):")
        if state["all_before"] is not None:
            print(f"  every session issued until {_when(state['all_before'])}")
        for user, ms in sorted(state["users"].items(), key=lambda item: item[1]):
            print(f"  {user}: its sessions issued until {_when(ms)}")
        if state["all_before"] is None and not state["users"]:
            print("  none")
        if state["unstamped_until"] > time.time() * 1000:
            print(f"Cookies from before sessions carried a time are accepted until {_when(state['unstamped_until'])}.")
    _list_store(config, args.limit)
    return 0


def _list_store(config, limit: int) -> None:
    path = config.database
    if not path.exists():
        print(f"No page sessions: there is no database at {path} yet.")
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = conn.execute(
                "SELECT u.platform_user_id, u.created_at, MAX(m.created_at), COUNT(m.id) FROM users u "
                "LEFT JOIN messages m ON m.user_id = u.id WHERE u.platform = 'web' AND u.platform_user_id LIKE 'web-%' "
                "AND u.forgotten_at IS NULL GROUP BY u.id ORDER BY COALESCE(MAX(m.created_at), u.created_at) DESC LIMIT ?",
                (max(limit, 0),)).fetchall()
    except sqlite3.Error as exc:
        raise UserError(f"[store] path {path}: cannot read it ({exc}); is it a rolebot database?") from None
    if not rows:
        print("No page sessions in the store yet.")
        return
    print("Page sessions in the store, most recently active first:")
    for user, created, last, count in rows:
        seen = _when(int((last or created) * 1000))
        print(f"  {user:<26}  last active {seen}  {count} message{'s' if count != 1 else ''}")
