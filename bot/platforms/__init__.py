"""Platform front-ends: each turns its platform's events into ``IncomingMessage``s for the
service and shows what comes back. None of them knows anything of models.

A front-end is an object with a ``name`` and ``async start()`` / ``async stop()``; its module
has ``from_config(config, service, options)`` that returns one, or None when config.toml leaves
it off. ``enabled`` asks every module named in ``FRONTENDS``; a new platform (``discord``,
``telegram``: on when their token's environment variable is set) is one more name there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bot.config import Config, secret

if TYPE_CHECKING:
    from bot.service import Service

# Modules of bot.platforms, in the order their front-ends start.
FRONTENDS = ("web", "discord", "telegram", "console")


class Frontend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Options:
    """What ``rolebot serve`` adds to config.toml for the front-ends."""

    host: str | None = None  # --host: the web chat's address instead of [web] host
    port: int | None = None  # --port: the web chat's port instead of [web] port
    on_quit: Callable[[], None] | None = None  # the console's /quit and Ctrl-D stop the process
    interactive: bool = False  # stdin is a terminal: the console may run


def enabled(config: Config, service: Service, options: Options) -> list[Frontend]:
    """The front-ends config.toml turns on, in the order they start."""
    modules = [importlib.import_module(f"bot.platforms.{name}") for name in FRONTENDS if _wanted(config, name)]
    return [f for module in modules if (f := module.from_config(config, service, options)) is not None]


def _wanted(config: Config, name: str) -> bool:
    """A platform that needs a token is not even imported while its token is unset: discord.py
    and python-telegram-bot take a while to import, and a bot serving only the web needs neither."""
    token_env = getattr(getattr(config, name, None), "token_env", None)
    return token_env is None or secret(token_env) is not None
