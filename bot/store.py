"""The bot's SQLite store: users, conversations, messages, ratings, adapter activations, training runs.

One writer connection serialises every write behind an asyncio lock; each write method returns only
after its transaction has committed, so a message or rating the bot acknowledges is on disk. Reads
go through a second, read-only connection; WAL lets them run beside the writer. Training reads its
own snapshot through ``training.logs``, which owns the schema version both sides agree on.

Timestamps are unix seconds (float, UTC) everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from training.errors import UserError
from training.logs import NEW_RATINGS_SQL, SCHEMA_VERSION, character_params, kept_reply_sql

# How long a connection waits for another process's lock (e.g. `rolebot status` beside the bot).
BUSY_TIMEOUT_MS = 5000

Role = Literal["user", "assistant"]
# 'generating' marks a reply row whose text is still streaming.
MessageStatus = Literal["generating", "complete", "interrupted", "failed"]
Trigger = Literal["schedule", "admin", "cli"]
RunStatus = Literal["running", "succeeded", "failed", "rejected"]

# Migration N+1 is MIGRATIONS[N]: statements run in one transaction that also sets
# PRAGMA user_version. Append new migrations; never edit one that has shipped.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE users (
            id               INTEGER PRIMARY KEY,
            platform         TEXT NOT NULL,
            platform_user_id TEXT NOT NULL,
            display_name     TEXT NOT NULL DEFAULT '',
            created_at       REAL NOT NULL,
            forgotten_at     REAL,
            UNIQUE (platform, platform_user_id)
        )""",
        """CREATE TABLE conversations (
            id         INTEGER PRIMARY KEY,
            platform   TEXT NOT NULL,
            chat_id    TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at   REAL
        )""",
        # A chat has at most one open (current) conversation; /reset closes it.
        """CREATE UNIQUE INDEX conversations_current
            ON conversations (platform, chat_id) WHERE ended_at IS NULL""",
        """CREATE TABLE messages (
            id                INTEGER PRIMARY KEY,
            conversation_id   INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            user_id           INTEGER REFERENCES users (id),
            role              TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            text              TEXT NOT NULL DEFAULT '',
            status            TEXT NOT NULL
                              CHECK (status IN ('generating', 'complete', 'interrupted', 'failed')),
            created_at        REAL NOT NULL,
            reply_to          INTEGER REFERENCES messages (id) ON DELETE CASCADE,
            adapter_version   TEXT,
            prompt            TEXT,
            sampling          TEXT,
            latency_ms        REAL,
            first_token_ms    REAL,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            CHECK ((role = 'user') = (user_id IS NOT NULL))
        )""",
        "CREATE INDEX messages_conversation ON messages (conversation_id, id)",
        "CREATE INDEX messages_user ON messages (user_id)",
        "CREATE INDEX messages_reply_to ON messages (reply_to)",
        # A reply split over several platform messages has several rows here; reactions arrive
        # with a platform message id, so that column is indexed.
        """CREATE TABLE message_platform_ids (
            message_id          INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            platform_message_id TEXT NOT NULL,
            PRIMARY KEY (message_id, platform_message_id)
        )""",
        "CREATE INDEX message_platform_ids_lookup ON message_platform_ids (platform_message_id)",
        """CREATE TABLE ratings (
            message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
            user_id    INTEGER NOT NULL REFERENCES users (id),
            value      INTEGER NOT NULL CHECK (value IN (-1, 1)),
            rated_at   REAL NOT NULL,
            PRIMARY KEY (message_id, user_id)
        )""",
        "CREATE INDEX ratings_user ON ratings (user_id)",
        "CREATE INDEX ratings_rated_at ON ratings (rated_at)",
        """CREATE TABLE adapter_versions (
            character  TEXT NOT NULL,
            version    TEXT NOT NULL,
            created_at REAL NOT NULL,
            meta       TEXT NOT NULL DEFAULT '{}',
            PRIMARY KEY (character, version)
        )""",
        # An event log of what the bot served; rolled_back_at is no longer written (the
        # registry's active.json holds the active version and its history).
        """CREATE TABLE adapter_activations (
            id             INTEGER PRIMARY KEY,
            character      TEXT NOT NULL,
            version        TEXT NOT NULL,
            activated_at   REAL NOT NULL,
            rolled_back_at REAL,
            FOREIGN KEY (character, version) REFERENCES adapter_versions (character, version)
        )""",
        """CREATE TABLE training_runs (
            id                INTEGER PRIMARY KEY,
            started_at        REAL NOT NULL,
            finished_at       REAL,
            trigger           TEXT NOT NULL CHECK (trigger IN ('schedule', 'admin', 'cli')),
            requested_by      TEXT,
            status            TEXT NOT NULL
                              CHECK (status IN ('running', 'succeeded', 'failed', 'rejected')),
            reason            TEXT NOT NULL DEFAULT '',
            candidate_version TEXT,
            metrics           TEXT NOT NULL DEFAULT '{}'
        )""",
        # At most one run at a time, even across processes (the bot and `rolebot retrain`).
        "CREATE UNIQUE INDEX training_runs_one_running ON training_runs (status) "
        "WHERE status = 'running'",
    ),
    (
        # host:pid:process start time of the process that started a run, so that a bot starting
        # up fails only runs whose process is gone, not a `rolebot retrain` running beside it.
        "ALTER TABLE training_runs ADD COLUMN owner TEXT",
    ),
    (
        # Regenerated replies are siblings: assistant rows with the same reply_to. The user row
        # records the one the user kept (went back to); NULL means the latest, the one shown last.
        # Deleting the kept reply falls back to the latest.
        "ALTER TABLE messages ADD COLUMN kept_reply INTEGER REFERENCES messages (id) ON DELETE SET NULL",
    ),
    (
        # A cast: each conversation is with one character, so a chat has an open conversation
        # per character. '' is the cast's first character (the default one, and the only one
        # before the cast: old conversations stay hers); a run trains one character, '' likewise.
        "ALTER TABLE conversations ADD COLUMN character TEXT NOT NULL DEFAULT ''",
        "DROP INDEX conversations_current",
        """CREATE UNIQUE INDEX conversations_current
            ON conversations (platform, chat_id, character) WHERE ended_at IS NULL""",
        "ALTER TABLE training_runs ADD COLUMN character TEXT NOT NULL DEFAULT ''",
        # The character a chat picked (Telegram's /character), kept across restarts.
        """CREATE TABLE chat_characters (
            platform   TEXT NOT NULL,
            chat_id    TEXT NOT NULL,
            character  TEXT NOT NULL,
            chosen_at  REAL NOT NULL,
            PRIMARY KEY (platform, chat_id)
        )""",
    ),
]


class RatingError(UserError):
    """A rating that cannot be recorded: unknown message, a user's own message, or a bad value."""


class UnknownReply(RatingError):
    """The message to rate is not in the log, or not in the rater's chat."""


class AlternativeError(UserError):
    """An alternative that cannot be kept: not a reply to that user message, or not one shown."""


@dataclass(frozen=True)
class User:
    id: int
    platform: str
    platform_user_id: str
    display_name: str
    created_at: float
    forgotten_at: float | None


@dataclass(frozen=True)
class Conversation:
    id: int
    platform: str
    chat_id: str
    started_at: float


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: Role
    text: str
    status: MessageStatus
    created_at: float
    user_id: int | None  # None for the bot's replies
    reply_to: int | None  # the user message a reply answers
    adapter_version: str | None
    platform_message_ids: tuple[str, ...]


@dataclass(frozen=True)
class ReplyCost:
    """What generating one reply cost, in the log's units (milliseconds); the engine's own
    ``ReplyStats`` measures in seconds."""

    latency_ms: float | None = None
    first_token_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Rating:
    message_id: int
    user_id: int
    value: int  # +1 or -1
    rated_at: float


@dataclass(frozen=True)
class ForgetResult:
    """What /forget deleted: the user's messages, the bot's replies to them, and ratings."""

    messages: int
    replies: int
    ratings: int


@dataclass(frozen=True)
class Activation:
    """An adapter version the bot began to serve (activated, promoted, rolled back to)."""

    character: str
    version: str
    activated_at: float


@dataclass(frozen=True)
class TrainingRun:
    id: int
    trigger: Trigger
    requested_by: str | None
    status: RunStatus
    started_at: float
    finished_at: float | None
    reason: str
    candidate_version: str | None
    metrics: Mapping[str, Any]
    character: str = ""


@dataclass(frozen=True)
class StoreCounts:
    users: int
    conversations: int
    messages: int  # user messages and replies together
    replies: int
    ratings: int


_MESSAGE_SELECT = """
SELECT m.id, m.conversation_id, m.role, m.text, m.status, m.created_at, m.user_id, m.reply_to,
       m.adapter_version,
       (SELECT json_group_array(platform_message_id) FROM (
            SELECT platform_message_id FROM message_platform_ids
            WHERE message_id = m.id ORDER BY rowid)) AS platform_message_ids
FROM messages AS m
"""

class Store:
    """The bot's database: ``store = await Store.open(path)`` or ``async with Store.open(path)``."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    def open(cls, path: str | Path) -> _Opening:
        """Open (creating and migrating if needed) the database at ``path``."""
        return _Opening(cls._open(Path(path)))

    @classmethod
    async def _open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect(path)
        try:
            await _use_wal(writer, path)
            await _migrate(writer, path)
            reader = await _connect(path, read_only=True)
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader)

    async def close(self) -> None:
        """Close both connections; a write in progress finishes first."""
        await self._reader.close()
        async with self._write_lock:
            await self._writer.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction on the writer connection, committed before the block returns."""
        async with self._write_lock:
            try:
                # IMMEDIATE takes the file's write lock now, so another process makes us wait
                # here (under busy_timeout) instead of failing halfway through the transaction.
                await self._writer.execute("BEGIN IMMEDIATE")
                yield self._writer
                await self._writer.commit()
            except BaseException:
                # Also on cancellation, which can strike at any await above: the transaction must
                # not outlive the lock. sqlite3's rollback is a no-op when nothing is open.
                await self._writer.rollback()
                raise

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self._reader.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    # Users and conversations

    async def user(self, platform: str, platform_user_id: str) -> User | None:
        row = await self._fetchone(
            "SELECT id, platform, platform_user_id, display_name, created_at, forgotten_at "
            "FROM users WHERE platform = ? AND platform_user_id = ?",
            (platform, platform_user_id),
        )
        return User(**dict(row)) if row else None

    async def current_conversation(self, platform: str, chat_id: str, character: str = "") -> Conversation:
        """The chat's open conversation with ``character``, started now if the chat has none."""
        row = await self._fetchone(
            "SELECT id, platform, chat_id, started_at FROM conversations "
            "WHERE platform = ? AND chat_id = ? AND character = ? AND ended_at IS NULL",
            (platform, chat_id, character),
        )
        if row:
            return Conversation(**dict(row))
        async with self._transaction() as conn:
            conversation_id = await _current_conversation_id(conn, platform, chat_id, time.time(), character)
            return await _conversation(conn, conversation_id)

    async def new_conversation(self, platform: str, chat_id: str, character: str = "") -> Conversation:
        """Close the chat's current conversation with ``character`` and start a new one (/reset)."""
        now = time.time()
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE conversations SET ended_at = ? "
                "WHERE platform = ? AND chat_id = ? AND character = ? AND ended_at IS NULL",
                (now, platform, chat_id, character),
            )
            conversation_id = await _current_conversation_id(conn, platform, chat_id, now, character)
            return await _conversation(conn, conversation_id)

    async def chat_character(self, platform: str, chat_id: str) -> str | None:
        """The character this chat picked (``set_chat_character``), None if it never did."""
        row = await self._fetchone("SELECT character FROM chat_characters WHERE platform = ? AND chat_id = ?",
                                   (platform, chat_id))
        return row[0] if row else None

    async def set_chat_character(self, platform: str, chat_id: str, character: str) -> None:
        """From now on ``character`` answers in this chat (by name, as [[cast]] gives it)."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO chat_characters (platform, chat_id, character, chosen_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (platform, chat_id) DO UPDATE SET character = excluded.character, "
                "chosen_at = excluded.chosen_at", (platform, chat_id, character, time.time()))

    async def conversation_character(self, conversation_id: int) -> str | None:
        row = await self._fetchone("SELECT character FROM conversations WHERE id = ?", (conversation_id,))
        return row[0] if row else None

    # Messages

    async def add_user_message(
        self,
        platform: str,
        chat_id: str,
        platform_user_id: str,
        text: str,
        *,
        display_name: str | None = None,
        platform_message_id: str | None = None,
        character: str = "",
    ) -> Message:
        """Log an incoming message in the chat's current conversation with ``character``;
        returns once committed."""
        now = time.time()
        async with self._transaction() as conn:
            user_id = await _upsert_user(conn, platform, platform_user_id, display_name, now)
            conversation_id = await _current_conversation_id(conn, platform, chat_id, now, character)
            cursor = await conn.execute(
                "INSERT INTO messages (conversation_id, user_id, role, text, status, created_at) "
                "VALUES (?, ?, 'user', ?, 'complete', ?)",
                (conversation_id, user_id, text, now),
            )
            if platform_message_id is not None:
                await _link(conn, cursor.lastrowid, [platform_message_id])
            return await _message(conn, cursor.lastrowid)

    async def start_reply(
        self,
        reply_to: int,
        *,
        adapter_version: str,
        prompt: str,
        sampling: Mapping[str, Any],
    ) -> Message:
        """Create the reply row as generation starts, so a crash leaves a trace to mark."""
        async with self._transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT conversation_id FROM messages WHERE id = ? AND role = 'user'", (reply_to,)
            )
            if not rows:
                # Most likely the user ran /forget while their message waited for the model.
                raise LookupError(f"user message {reply_to} is not in the log")
            # A regenerated reply replaces the one shown: the latest alternative is kept again.
            await conn.execute("UPDATE messages SET kept_reply = NULL WHERE id = ?", (reply_to,))
            cursor = await conn.execute(
                "INSERT INTO messages (conversation_id, role, status, created_at, reply_to, "
                "adapter_version, prompt, sampling) "
                "VALUES (?, 'assistant', 'generating', ?, ?, ?, ?, ?)",
                (rows[0][0], time.time(), reply_to, adapter_version, prompt, _json(sampling)),
            )
            return await _message(conn, cursor.lastrowid)

    async def finish_reply(
        self,
        message_id: int,
        text: str,
        stats: ReplyCost,
        *,
        status: MessageStatus = "complete",
        platform_message_ids: Sequence[str] = (),
    ) -> Message | None:
        """Store a reply's final text and stats. None if /forget deleted it while it streamed.

        A reply no longer generating (already marked interrupted) keeps its status.
        """
        if status == "generating":
            raise ValueError("finish_reply needs a final status: complete, interrupted or failed")
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE messages SET text = ?, status = ?, latency_ms = ?, first_token_ms = ?, "
                "prompt_tokens = ?, completion_tokens = ? "
                "WHERE id = ? AND role = 'assistant' AND status = 'generating'",
                (text, status, stats.latency_ms, stats.first_token_ms, stats.prompt_tokens,
                 stats.completion_tokens, message_id),
            )
            gone = not await conn.execute_fetchall(
                "SELECT 1 FROM messages WHERE id = ?", (message_id,)
            )
            if gone:
                return None
            await _link(conn, message_id, platform_message_ids)
            return await _message(conn, message_id)

    async def save_partial_texts(self, texts: Mapping[int, str]) -> None:
        """The text streamed so far of replies still generating, all in one transaction, so a
        crash leaves each row with what its user saw. A reply already finished keeps its text."""
        if not texts:
            return
        async with self._transaction() as conn:
            await conn.executemany(
                "UPDATE messages SET text = ? WHERE id = ? AND role = 'assistant' AND status = 'generating'",
                [(text, message_id) for message_id, text in texts.items()],
            )

    async def link_platform_messages(
        self, message_id: int, platform_message_ids: Sequence[str]
    ) -> None:
        """Record the platform messages that carry a message, e.g. as a streamed reply is split."""
        async with self._transaction() as conn:
            await _link(conn, message_id, platform_message_ids)

    async def mark_unfinished_interrupted(self) -> int:
        """Mark replies left generating by a previous process as interrupted; call at startup."""
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "UPDATE messages SET status = 'interrupted' WHERE status = 'generating'"
            )
            return cursor.rowcount

    async def message(self, message_id: int) -> Message | None:
        row = await self._fetchone(f"{_MESSAGE_SELECT} WHERE m.id = ?", (message_id,))
        return _message_from_row(row) if row else None

    async def message_by_platform_id(
        self, platform: str, chat_id: str, platform_message_id: str
    ) -> Message | None:
        """The message a platform message belongs to, e.g. the reply a reaction was added to.

        The chat is part of the key because Telegram numbers messages per chat. A regenerate
        edits the platform messages of the reply it replaces, so one platform message can carry
        several alternatives: it shows the latest, and that one is returned.
        """
        row = await self._fetchone(
            f"""{_MESSAGE_SELECT}
            JOIN message_platform_ids AS p ON p.message_id = m.id
            JOIN conversations AS c ON c.id = m.conversation_id
            WHERE p.platform_message_id = ? AND c.platform = ? AND c.chat_id = ?
            ORDER BY m.id DESC LIMIT 1""",
            (platform_message_id, platform, chat_id),
        )
        return _message_from_row(row) if row else None

    async def recent_history(self, conversation_id: int, limit: int, *, before: int | None = None,
                             step: int = 1, ahead: int = 0) -> list[Message]:
        """The conversation's last ``limit`` messages the user saw (before message ``before``),
        oldest first.

        Of a user message's alternatives only the kept one counts (the latest, unless the user
        went back to another); the ones swiped away were not said. Replies still generating or
        failed are left out: the model should not see them as said.

        With ``step`` > 1 the window's first message moves ``step`` messages at a time: of the
        ``n`` messages, those from the first multiple of ``step`` that leaves at most ``limit``
        (between ``limit - step + 1`` and ``limit``). Successive prompts then begin alike.
        ``ahead``: where the window will begin once that many more messages are said.
        """
        where = f"""WHERE m.conversation_id = ? AND m.status IN ('complete', 'interrupted') AND m.text != ''
              AND (m.reply_to IS NULL OR m.id = {kept_reply_sql("m.reply_to")})
              AND m.id < ?"""
        args = (conversation_id, before if before is not None else 1 << 62)
        if limit <= 0:
            return []
        step = max(1, min(step, limit))
        count = (await self._fetchall(f"SELECT COUNT(*) FROM messages AS m {where}", args))[0][0]
        said = count + ahead
        start = 0 if said <= limit else -(-(said - limit) // step) * step
        rows = await self._fetchall(
            f"{_MESSAGE_SELECT} {where} ORDER BY m.id LIMIT ? OFFSET ?", (*args, limit, start))
        return [_message_from_row(row) for row in rows]

    async def conversation_messages(self, conversation_id: int) -> list[Message]:
        """Every message of a conversation, oldest first: user messages, each alternative reply
        (whatever its status) and the greeting."""
        rows = await self._fetchall(f"{_MESSAGE_SELECT} WHERE m.conversation_id = ? ORDER BY m.id",
                                    (conversation_id,))
        return [_message_from_row(row) for row in rows]

    async def user_ratings(self, user_id: int, conversation_id: int) -> dict[int, int]:
        """A user's own votes in a conversation: message id → +1 or -1."""
        rows = await self._fetchall(
            "SELECT r.message_id, r.value FROM ratings AS r JOIN messages AS m ON m.id = r.message_id "
            "WHERE r.user_id = ? AND m.conversation_id = ?", (user_id, conversation_id))
        return {row[0]: row[1] for row in rows}

    async def last_user_message(self, conversation_id: int) -> Message | None:
        """The conversation's latest user message: what /retry and 🔄 answer again."""
        row = await self._fetchone(
            f"{_MESSAGE_SELECT} WHERE m.conversation_id = ? AND m.role = 'user' "
            "ORDER BY m.id DESC LIMIT 1",
            (conversation_id,),
        )
        return _message_from_row(row) if row else None

    # Alternatives: regenerated replies to one user message

    async def alternatives(self, user_message_id: int) -> list[Message]:
        """Every reply to a user message, oldest first (a regenerate adds one at the end)."""
        rows = await self._fetchall(
            f"{_MESSAGE_SELECT} WHERE m.reply_to = ? AND m.role = 'assistant' ORDER BY m.id",
            (user_message_id,),
        )
        return [_message_from_row(row) for row in rows]

    async def kept_reply(self, user_message_id: int) -> Message | None:
        """The alternative the conversation goes on from: the one the user went back to, else
        the latest. None when the message has no reply."""
        row = await self._fetchone(
            f"{_MESSAGE_SELECT} WHERE m.id = {kept_reply_sql('?')}", (user_message_id, user_message_id)
        )
        return _message_from_row(row) if row else None

    async def keep_alternative(self, user_message_id: int, reply_id: int) -> Message:
        """Keep one alternative (◀ ▶ on the web page): the next turn's prompt uses it, and
        training takes it as chosen over its siblings once the user goes on from it."""
        async with self._transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT reply_to, role, status, text FROM messages WHERE id = ?", (reply_id,)
            )
            if not rows or rows[0]["role"] != "assistant" or rows[0]["reply_to"] != user_message_id:
                raise AlternativeError(
                    f"message {reply_id} is not a reply to message {user_message_id}; keep one of "
                    f"its alternatives (Store.alternatives({user_message_id}))"
                )
            if rows[0]["status"] not in ("complete", "interrupted") or not rows[0]["text"]:
                what = rows[0]["status"] if rows[0]["text"] else f"{rows[0]['status']} with no text"
                raise AlternativeError(
                    f"reply {reply_id} is {what}; keep a reply that was shown, in full or stopped"
                )
            await conn.execute(
                "UPDATE messages SET kept_reply = ? WHERE id = ?", (reply_id, user_message_id)
            )
            return await _message(conn, reply_id)

    # Greetings

    async def greet(self, platform: str, chat_id: str, text: str, character: str = "") -> Message | None:
        """Open the chat's current conversation with the character's greeting ([character]
        greeting) as its first reply; None (nothing written) once the conversation has messages.

        The greeting has no prompt, so training never learns from it, but the model sees it in
        the next turn's history, as the user did.
        """
        # Every message on a platform that greets asks this: answer a begun conversation from the
        # reader, without taking the writer's lock.
        if await self._fetchone(
            "SELECT 1 FROM messages AS m JOIN conversations AS c ON c.id = m.conversation_id "
            "WHERE c.platform = ? AND c.chat_id = ? AND c.character = ? AND c.ended_at IS NULL LIMIT 1",
            (platform, chat_id, character)
        ):
            return None
        now = time.time()
        async with self._transaction() as conn:
            conversation_id = await _current_conversation_id(conn, platform, chat_id, now, character)
            if await conn.execute_fetchall(
                "SELECT 1 FROM messages WHERE conversation_id = ? LIMIT 1", (conversation_id,)
            ):
                return None
            cursor = await conn.execute(
                "INSERT INTO messages (conversation_id, role, text, status, created_at) "
                "VALUES (?, 'assistant', ?, 'complete', ?)",
                (conversation_id, text, now),
            )
            return await _message(conn, cursor.lastrowid)

    # Ratings

    async def rate(
        self,
        message_id: int,
        platform: str,
        platform_user_id: str,
        value: int,
        *,
        display_name: str | None = None,
        chat_id: str | None = None,
    ) -> Rating:
        """Record or change a user's 👍 (+1) / 👎 (-1) on a reply; returns once committed.

        With ``chat_id`` the reply must be in that chat of ``platform``: only those who can see
        a reply rate it."""
        if value not in (1, -1):
            raise RatingError(f"rating value {value!r} for message {message_id}: use +1 or -1")
        now = time.time()
        async with self._transaction() as conn:
            await _check_rateable(conn, message_id, platform if chat_id is not None else None, chat_id)
            user_id = await _upsert_user(conn, platform, platform_user_id, display_name, now)
            await conn.execute(
                "INSERT INTO ratings (message_id, user_id, value, rated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (message_id, user_id) DO UPDATE "
                "SET value = excluded.value, rated_at = excluded.rated_at",
                (message_id, user_id, value, now),
            )
        return Rating(message_id, user_id, value, now)

    async def unrate(
        self, message_id: int, platform: str, platform_user_id: str, value: int | None = None
    ) -> bool:
        """Remove a user's rating; True if one was removed.

        With ``value``, only a rating of that value goes: removing a 👍 reaction must not undo
        the 👎 the same user switched to since.
        """
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "DELETE FROM ratings WHERE message_id = ? AND (? IS NULL OR value = ?) "
                "AND user_id = (SELECT id FROM users WHERE platform = ? AND platform_user_id = ?)",
                (message_id, value, value, platform, platform_user_id),
            )
            return cursor.rowcount > 0

    async def ratings(self, message_id: int) -> list[Rating]:
        rows = await self._fetchall(
            "SELECT message_id, user_id, value, rated_at FROM ratings WHERE message_id = ? "
            "ORDER BY rated_at",
            (message_id,),
        )
        return [Rating(**dict(row)) for row in rows]

    async def ratings_since(self, timestamp: float, character: str | None = None, first: bool = True) -> int:
        """Ratings training could use that were cast or changed after ``timestamp``: of
        ``character``'s replies (None: of every character's; ``first``: the cast's first)."""
        row = await self._fetchone(NEW_RATINGS_SQL, {"since": timestamp, **character_params(character, first)})
        return row[0]

    # Privacy

    async def forget_user(self, platform: str, platform_user_id: str) -> ForgetResult:
        """Delete a user's messages, the replies to them and their ratings (/forget).

        The user row stays, blanked and marked forgotten, so training also skips anything the
        user writes later.
        """
        async with self._transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT id FROM users WHERE platform = ? AND platform_user_id = ?",
                (platform, platform_user_id),
            )
            if not rows:
                return ForgetResult(messages=0, replies=0, ratings=0)
            user_id = rows[0][0]
            replies = (
                "SELECT id FROM messages WHERE reply_to IN "
                "(SELECT id FROM messages WHERE user_id = :user)"
            )
            ratings = await conn.execute(
                f"DELETE FROM ratings WHERE user_id = :user OR message_id IN ({replies})",
                {"user": user_id},
            )
            replies_deleted = await conn.execute(
                f"DELETE FROM messages WHERE id IN ({replies})", {"user": user_id}
            )
            messages = await conn.execute("DELETE FROM messages WHERE user_id = ?", (user_id,))
            await conn.execute(
                "UPDATE users SET display_name = '', forgotten_at = ? WHERE id = ?",
                (time.time(), user_id),
            )
            return ForgetResult(messages.rowcount, replies_deleted.rowcount, ratings.rowcount)

    # Adapter activations: an event log; the registry (active.json) decides what is active

    async def log_activation(self, character: str, version: str, meta: Mapping[str, Any]) -> None:
        """Record that ``version`` became the one served, with its meta; the same version as the
        last logged one adds nothing (a restart serving what it served before)."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO adapter_versions (character, version, created_at, meta) "
                "VALUES (?, ?, ?, ?) "
                "ON CONFLICT (character, version) DO UPDATE SET meta = excluded.meta",
                (character, version, time.time(), _json(meta)),
            )
            last = await conn.execute_fetchall(
                "SELECT version FROM adapter_activations WHERE character = ? ORDER BY id DESC LIMIT 1",
                (character,),
            )
            if not last or last[0][0] != version:
                await conn.execute(
                    "INSERT INTO adapter_activations (character, version, activated_at) "
                    "VALUES (?, ?, ?)",
                    (character, version, time.time()),
                )

    async def activations(self, character: str) -> list[Activation]:
        """Every logged activation of ``character``'s versions, oldest first."""
        rows = await self._fetchall(
            "SELECT character, version, activated_at FROM adapter_activations "
            "WHERE character = ? ORDER BY id",
            (character,),
        )
        return [Activation(**dict(row)) for row in rows]

    # Training runs

    async def start_run(self, trigger: Trigger, requested_by: str | None = None, character: str = "") -> TrainingRun:
        """Record that a training run of ``character`` starts; refused while another one (of any
        character: one training process at a time) is running."""
        async with self._transaction() as conn:
            try:
                cursor = await conn.execute(
                    "INSERT INTO training_runs (started_at, trigger, requested_by, status, owner, character) "
                    "VALUES (?, ?, ?, 'running', ?, ?)",
                    (time.time(), trigger, requested_by, _this_process(), character),
                )
            except sqlite3.IntegrityError:
                running = await _run(conn, "WHERE status = 'running'")
                if running is None:
                    raise
                raise UserError(
                    f"training run {running.id} (started by {running.trigger}) is still "
                    "running; wait for it to finish"
                ) from None
            return await _run(conn, "WHERE id = ?", (cursor.lastrowid,))

    async def finish_run(
        self,
        run_id: int,
        status: RunStatus,
        *,
        reason: str = "",
        candidate_version: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> TrainingRun:
        """Record how a running training run ended."""
        if status == "running":
            raise ValueError("finish_run needs a final status: succeeded, failed or rejected")
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "UPDATE training_runs SET status = ?, finished_at = ?, reason = ?, "
                "candidate_version = ?, metrics = ? WHERE id = ? AND status = 'running'",
                (status, time.time(), reason, candidate_version, _json(metrics or {}), run_id),
            )
            if cursor.rowcount == 0:
                raise LookupError(f"training run {run_id} is not running")
            return await _run(conn, "WHERE id = ?", (run_id,))

    async def fail_unfinished_runs(self, reason: str = "the bot stopped during the run") -> int:
        """Mark runs left running by a process that is gone as failed; call at startup.

        A run whose process still lives (``rolebot retrain`` from cron beside the bot) keeps
        running; so does one started on another host, which this one cannot see."""
        async with self._transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT id, owner FROM training_runs WHERE status = 'running'"
            )
            now = time.time()
            gone = [(now, reason, row[0]) for row in rows if not _owner_alive(row[1])]
            await conn.executemany(
                "UPDATE training_runs SET status = 'failed', finished_at = ?, reason = ? WHERE id = ?", gone
            )
            return len(gone)

    async def last_run(self, status: RunStatus | None = None, character: str | None = None) -> TrainingRun | None:
        """The most recently started run, or the most recent one with ``status``; of
        ``character`` (None: of any)."""
        return await _run(
            self._reader, "WHERE (? IS NULL OR status = ?) AND (? IS NULL OR character = ?) ORDER BY id DESC LIMIT 1",
            (status, status, character, character)
        )

    # /status

    async def counts(self) -> StoreCounts:
        row = await self._fetchone(
            """SELECT (SELECT COUNT(*) FROM users) AS users,
                      (SELECT COUNT(*) FROM conversations) AS conversations,
                      (SELECT COUNT(*) FROM messages) AS messages,
                      (SELECT COUNT(*) FROM messages WHERE role = 'assistant') AS replies,
                      (SELECT COUNT(*) FROM ratings) AS ratings"""
        )
        return StoreCounts(**dict(row))


class _Opening:
    """What ``Store.open`` returns: await it for a Store, or use it with ``async with``."""

    def __init__(self, opening: Coroutine[Any, Any, Store]) -> None:
        self._opening = opening
        self._store: Store | None = None

    def __await__(self) -> Any:
        return self._opening.__await__()

    async def __aenter__(self) -> Store:
        self._store = await self._opening
        return self._store

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._store is not None
        await self._store.close()


async def _connect(path: Path, read_only: bool = False) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN ourselves, so sqlite3 opens no hidden transactions.
    if read_only:
        conn = await aiosqlite.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None
        )
    else:
        conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await conn.execute("PRAGMA foreign_keys = ON")
    return conn


async def _use_wal(conn: aiosqlite.Connection, path: Path) -> None:
    try:
        rows = await conn.execute_fetchall("PRAGMA journal_mode = WAL")
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"{path}: not usable as a SQLite database ({exc}); set store.path to a new file"
        ) from None
    if rows[0][0] != "wal":
        raise UserError(
            f"{path}: SQLite could not switch to WAL journaling (got {rows[0][0]!r}); "
            "put the database on a local disk"
        )


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION; all pending migrations commit together or not at all."""
    try:
        await conn.execute("BEGIN IMMEDIATE")
        # Read inside the transaction: another process may have migrated while we waited.
        version = (await conn.execute_fetchall("PRAGMA user_version"))[0][0]
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{path}: database schema version {version} is newer than this rolebot "
                f"supports ({SCHEMA_VERSION}); upgrade rolebot or set store.path to another file"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {number}")
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise


async def _upsert_user(
    conn: aiosqlite.Connection,
    platform: str,
    platform_user_id: str,
    display_name: str | None,
    now: float,
) -> int:
    # A None display name (e.g. from a reaction event) keeps the name we already have.
    await conn.execute(
        "INSERT INTO users (platform, platform_user_id, display_name, created_at) "
        "VALUES (?, ?, COALESCE(?, ''), ?) "
        "ON CONFLICT (platform, platform_user_id) "
        "DO UPDATE SET display_name = COALESCE(?, display_name)",
        (platform, platform_user_id, display_name, now, display_name),
    )
    rows = await conn.execute_fetchall(
        "SELECT id FROM users WHERE platform = ? AND platform_user_id = ?",
        (platform, platform_user_id),
    )
    return rows[0][0]


async def _current_conversation_id(
    conn: aiosqlite.Connection, platform: str, chat_id: str, now: float, character: str = ""
) -> int:
    rows = await conn.execute_fetchall(
        "SELECT id FROM conversations WHERE platform = ? AND chat_id = ? AND character = ? AND ended_at IS NULL",
        (platform, chat_id, character),
    )
    if rows:
        return rows[0][0]
    cursor = await conn.execute(
        "INSERT INTO conversations (platform, chat_id, started_at, character) VALUES (?, ?, ?, ?)",
        (platform, chat_id, now, character),
    )
    return cursor.lastrowid


async def _conversation(conn: aiosqlite.Connection, conversation_id: int) -> Conversation:
    rows = await conn.execute_fetchall(
        "SELECT id, platform, chat_id, started_at FROM conversations WHERE id = ?",
        (conversation_id,),
    )
    return Conversation(**dict(rows[0]))


async def _link(
    conn: aiosqlite.Connection, message_id: int, platform_message_ids: Sequence[str]
) -> None:
    await conn.executemany(
        "INSERT OR IGNORE INTO message_platform_ids (message_id, platform_message_id) "
        "VALUES (?, ?)",
        [(message_id, str(pid)) for pid in platform_message_ids],
    )


async def _message(conn: aiosqlite.Connection, message_id: int) -> Message:
    rows = await conn.execute_fetchall(f"{_MESSAGE_SELECT} WHERE m.id = ?", (message_id,))
    return _message_from_row(rows[0])


def _message_from_row(row: sqlite3.Row) -> Message:
    fields = dict(row)
    fields["platform_message_ids"] = tuple(json.loads(fields["platform_message_ids"]))
    return Message(**fields)


async def _check_rateable(conn: aiosqlite.Connection, message_id: int, platform: str | None = None,
                          chat_id: str | None = None) -> None:
    rows = await conn.execute_fetchall(
        "SELECT m.role FROM messages AS m JOIN conversations AS c ON c.id = m.conversation_id "
        "WHERE m.id = ? AND (? IS NULL OR (c.platform = ? AND c.chat_id = ?))",
        (message_id, platform, platform, chat_id))
    if not rows and chat_id is not None:
        raise UnknownReply(f"message {message_id} is not a reply in this chat; rate a reply you were given")
    if not rows:
        raise UnknownReply(
            f"message {message_id} is not in the log (it may have been forgotten); "
            "rate one of the bot's replies"
        )
    if rows[0][0] != "assistant":
        raise RatingError(
            f"message {message_id} was written by a user; only the bot's replies can be rated"
        )


async def _run(
    conn: aiosqlite.Connection, where: str, params: Sequence[Any] = ()
) -> TrainingRun | None:
    rows = await conn.execute_fetchall(
        "SELECT id, trigger, requested_by, status, started_at, finished_at, reason, "
        f"candidate_version, metrics, character FROM training_runs {where}",
        params,
    )
    if not rows:
        return None
    fields = dict(rows[0])
    return TrainingRun(**{**fields, "metrics": json.loads(fields["metrics"])})


def _this_process() -> str:
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.3f}"


def _owner_alive(owner: str | None) -> bool:
    """Whether the process that started a run is another process still running (this one, at
    start-up, has none of its own; a row from before owners were recorded counts as gone)."""
    import psutil

    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, started_text = rest.partition(":")
    if host != socket.gethostname():
        return True
    try:
        pid, started = int(pid_text), float(started_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0  # else the pid was reused
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
