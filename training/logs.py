"""Rated chat logs as training sees them: a read-only, consistent snapshot of the bot's store.

The bot (``bot/store.py``) owns the database and its migrations; this module only reads it, with
plain ``sqlite3`` in the training subprocess. Both sides agree on the layout through
``SCHEMA_VERSION``: the store migrates up to it, and the reader refuses any other version.

Timestamps in the store are unix seconds (float, UTC).
"""

from __future__ import annotations

import sqlite3
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from training.errors import UserError

# The store's schema version this reader understands; bot/store.py migrates to exactly this.
SCHEMA_VERSION = 4


def kept_reply_sql(user_message: str) -> str:
    """SQL for the id of the alternative a user message's conversation goes on from: the one
    the user kept (``messages.kept_reply``), else the latest reply. ``user_message`` is an SQL
    expression for the user message's id; shared with bot/store.py so that the prompt of the
    next turn and training agree on which reply was kept."""
    return (f"COALESCE((SELECT kept_reply FROM messages WHERE id = {user_message}), "
            f"(SELECT MAX(id) FROM messages WHERE reply_to = {user_message}))")

# A cast member's replies: those of their conversations (:character NULL: every character's).
# The cast's first character (:first) keeps conversations under '' (bot/store.py, migration 4).
CHARACTER_FILTER = ("(:character IS NULL OR (SELECT c.character = CASE WHEN :first THEN '' ELSE :character END "
                    "FROM conversations AS c WHERE c.id = {m}.conversation_id))")


def character_params(character: str | None, first: bool = True) -> dict:
    """The named parameters of ``CHARACTER_FILTER``."""
    return {"character": character, "first": int(first)}


# The ratings training may use: votes on finished replies, with nothing from a forgotten user
# (neither their question nor their vote). Forgetting deletes those rows; the filters also keep
# out anything such a user wrote afterwards.
_TRAINABLE_RATINGS = f"""
FROM ratings AS r
JOIN users AS rater ON rater.id = r.user_id AND rater.forgotten_at IS NULL
JOIN messages AS m ON m.id = r.message_id
LEFT JOIN messages AS q ON q.id = m.reply_to
LEFT JOIN users AS asker ON asker.id = q.user_id
WHERE m.role = 'assistant' AND m.status = 'complete' AND m.prompt IS NOT NULL
  AND asker.forgotten_at IS NULL
  AND {CHARACTER_FILTER.format(m="m")}
"""

_RATED_REPLIES_SQL = f"""
SELECT m.id AS message_id, m.conversation_id, m.prompt, m.text,
       COALESCE(q.text, '') AS user_text, m.adapter_version, m.created_at,
       SUM(r.value) AS score, SUM(r.value = 1) AS ups, SUM(r.value = -1) AS downs
{_TRAINABLE_RATINGS}
GROUP BY m.id
ORDER BY m.id
"""

# Shared with bot/store.py so /status and the scheduler count exactly what training would use.
# A changed vote counts as new: its rated_at moves.
NEW_RATINGS_SQL = f"SELECT COUNT(*) {_TRAINABLE_RATINGS} AND r.rated_at > :since"


# Finished replies to user messages that have at least two of them (regenerated alternatives),
# with what the user did about each: their votes, whether the conversation went on from it.
_ALTERNATIVE_REPLY = ("{m}.role = 'assistant' AND {m}.status = 'complete' AND {m}.prompt IS NOT NULL "
                      "AND {m}.text != ''")
_ALTERNATIVES_SQL = f"""
SELECT m.id AS message_id, q.id AS user_message_id, m.prompt, m.text, q.text AS user_text,
       COALESCE((SELECT SUM(r.value) FROM ratings AS r
                 JOIN users AS rater ON rater.id = r.user_id AND rater.forgotten_at IS NULL
                 WHERE r.message_id = m.id), 0) AS score,
       m.id = {kept_reply_sql("q.id")} AS kept,
       EXISTS (SELECT 1 FROM messages AS later WHERE later.conversation_id = q.conversation_id
               AND later.role = 'user' AND later.id > q.id) AS continued
FROM messages AS m
JOIN messages AS q ON q.id = m.reply_to AND q.role = 'user'
JOIN users AS asker ON asker.id = q.user_id AND asker.forgotten_at IS NULL
WHERE {_ALTERNATIVE_REPLY.format(m="m")}
  AND {CHARACTER_FILTER.format(m="m")}
  AND (SELECT COUNT(*) FROM messages AS s WHERE s.reply_to = q.id AND {_ALTERNATIVE_REPLY.format(m="s")}) >= 2
ORDER BY q.id, m.id
"""


@dataclass(frozen=True)
class PreferencePair:
    """Two replies to the same prompt, one the user preferred: the data of a DPO stage.

    ``reason`` says why: ``kept``, the user went on from ``chosen`` after swiping ``rejected``
    away; ``rated``, the user rated ``chosen`` 👍 and ``rejected`` 👎 or swiped it away.
    """

    user_message_id: int
    prompt: str
    user_text: str
    chosen_id: int
    chosen: str
    rejected_id: int
    rejected: str
    reason: str


@dataclass(frozen=True)
class _Alternative:
    message_id: int
    user_message_id: int
    prompt: str
    text: str
    user_text: str
    score: int
    kept: int
    continued: int

    @property
    def went_on_from(self) -> bool:
        return bool(self.kept and self.continued) and self.score >= 0


def pairs_of(alternatives: list[_Alternative]) -> list[PreferencePair]:
    """The (chosen, rejected) pairs among one user message's alternatives.

    Chosen: rated 👍 on balance, or the one the conversation went on from (unless rated 👎).
    Rejected, once something was chosen: rated 👎, or swiped away unrated. Only replies to the
    same prompt pair up (a changed persona makes a different prompt).
    """
    chosen = [a for a in alternatives if a.score > 0 or a.went_on_from]
    if not chosen:
        return []
    rejected = [a for a in alternatives if a.score < 0 or (a.score == 0 and a not in chosen)]
    return [
        PreferencePair(
            user_message_id=good.user_message_id, prompt=good.prompt, user_text=good.user_text,
            chosen_id=good.message_id, chosen=good.text, rejected_id=bad.message_id,
            rejected=bad.text, reason="rated" if good.score > 0 else "kept",
        )
        for good in chosen for bad in rejected if good.prompt == bad.prompt
    ]


@dataclass(frozen=True)
class RatedReply:
    """One assistant reply with its votes: the exact prompt the model saw and what it answered."""

    message_id: int
    conversation_id: int
    prompt: str
    text: str
    user_text: str  # the user message this reply answered ('' if none)
    adapter_version: str | None
    created_at: float
    score: int  # sum of votes: ups - downs
    ups: int
    downs: int


class LogSnapshot:
    """Reads inside one read transaction, so every query sees the same committed state."""

    def __init__(self, conn: sqlite3.Connection, character: str | None = None, first: bool = True) -> None:
        self._conn = conn
        self._who = character_params(character, first)

    def rated_replies(self) -> list[RatedReply]:
        """Every finished assistant reply (of the snapshot's character) with at least one vote, oldest first."""
        rows = self._conn.execute(_RATED_REPLIES_SQL, self._who).fetchall()
        return [RatedReply(**dict(row)) for row in rows]

    def preference_pairs(self) -> list[PreferencePair]:
        """Every (chosen, rejected) pair from regenerated alternatives, oldest first."""
        rows = [_Alternative(**dict(row)) for row in self._conn.execute(_ALTERNATIVES_SQL, self._who)]
        grouped = itertools.groupby(rows, key=lambda a: a.user_message_id)
        return [pair for _, group in grouped for pair in pairs_of(list(group))]

    def ratings_since(self, timestamp: float) -> int:
        """Votes cast or changed after ``timestamp`` (unix seconds)."""
        return self._conn.execute(NEW_RATINGS_SQL, {"since": timestamp, **self._who}).fetchone()[0]


@contextmanager
def open_snapshot(path: str | Path, character: str | None = None, first: bool = True) -> Iterator[LogSnapshot]:
    """Open the store read-only and hold one snapshot of it until the block ends: of
    ``character``'s conversations (None: everyone's; ``first``: with those from before the cast).

    WAL lets the bot keep writing meanwhile; those writes stay invisible here.
    """
    conn = _connect_read_only(Path(path))
    try:
        conn.execute("BEGIN")
        # The first read pins the snapshot, so the version check also fixes what we see.
        _check_schema_version(conn, path)
        yield LogSnapshot(conn, character, first)
    finally:
        conn.close()


def rated_replies(path: str | Path) -> list[RatedReply]:
    """Rated replies from one snapshot of the store at ``path``."""
    with open_snapshot(path) as snapshot:
        return snapshot.rated_replies()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise UserError(
            f"{path}: no chat log database here; run `rolebot serve` first or set store.path "
            "in config.toml to the bot's database"
        )
    # mode=ro makes a stray write fail instead of touching the live database.
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _check_schema_version(conn: sqlite3.Connection, path: str | Path) -> None:
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"{path}: not readable as a SQLite database ({exc}); set store.path to the bot's "
            "database"
        ) from None
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{path}: chat log schema version {version} is newer than this rolebot understands "
            f"({SCHEMA_VERSION}); upgrade rolebot"
        )
    if version < SCHEMA_VERSION:
        raise UserError(
            f"{path}: chat log schema version {version} is older than this rolebot expects "
            f"({SCHEMA_VERSION}); start the bot once (`rolebot serve`) so it migrates the database"
        )
