"""A whole bot (``bot.app.App``, builtin model) serving its web chat on loopback, for the tests
that talk to it over real HTTP or a real browser."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bot.app import App
from bot.config import load_config

# Appended to every test config: no terminal, no schedule, never the real platforms (even on a
# machine whose environment holds their tokens).
QUIET = """
[console]
enabled = false

[scheduler]
enabled = false

[discord]
token_env = "ROLEBOT_TEST_NO_DISCORD"

[telegram]
token_env = "ROLEBOT_TEST_NO_TELEGRAM"
"""


@asynccontextmanager
async def serving(root: Path, config: str) -> AsyncIterator[tuple[App, str]]:
    """The bot of ``config`` (plus QUIET) in ``root``; yields it and its web chat's loopback URL."""
    (root / "config.toml").write_text(config + QUIET, encoding="utf-8")
    app = await App.start(load_config(str(root / "config.toml")), train=False)
    try:
        web = next(f for f in app.frontends if f.name == "web")
        yield app, f"http://127.0.0.1:{web.port}"
    finally:
        await app.stop()


def rows(app: App, sql: str, *params) -> list[sqlite3.Row]:
    with sqlite3.connect(app.config.database) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()
