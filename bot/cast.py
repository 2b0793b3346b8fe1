"""The cast a bot plays: one ``Service`` per character, on one store and one base model.

Each character has its own conversations, adapter registry (``adapters/<character>/``), canon,
retrainer and hot swap; the front-ends ask the cast who answers: a name the OpenAI API's
``model`` gives, the character a chat picked, a channel's character, or the cast member a
message names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.config import UnknownCharacter
from bot.service import Service

if TYPE_CHECKING:
    from bot.store import Message


@dataclass
class Cast:
    services: dict[str, Service]  # by name, in the config's order: the first is the default

    def __post_init__(self) -> None:
        first = self.default
        for service in self.services.values():
            service.cast = self
            # Limits are per person, not per character: talking to two characters is no loophole.
            service.limiter = first.limiter
            service.address_limiter = first.address_limiter

    @property
    def default(self) -> Service:
        return next(iter(self.services.values()))

    @property
    def names(self) -> list[str]:
        return list(self.services)

    def __iter__(self) -> Iterator[Service]:
        return iter(self.services.values())

    def __len__(self) -> int:
        return len(self.services)

    def get(self, name: str | None) -> Service | None:
        """The character called ``name`` (its name or an alias); None if no one is."""
        if name is None:
            return None
        try:
            member = self.default.config.member(name)
        except UnknownCharacter:
            return None
        return self.services.get(member.name)

    def require(self, name: str | None) -> Service:
        """``get``, or the default for no name; an unknown name raises ``UnknownCharacter``."""
        if name is None or not str(name).strip():
            return self.default
        service = self.get(name)
        if service is None:
            self.default.config.member(name)  # raises, naming the cast
        return service

    def named_in(self, text: str) -> Service | None:
        """The cast member a message names first (by name or alias; the longer of two names that
        start at the same place wins, so 皇后 is not read as 皇); None if it names none."""
        best: tuple[int, int, Service] | None = None
        for service in self.services.values():
            for word in service.config.character.names:
                if not word:
                    continue
                match = re.search(re.escape(word), text)
                if match and (best is None or (match.start(), -len(word)) < (best[0], -best[1])):
                    best = (match.start(), len(word), service)
        return best[2] if best else None

    async def answering(self, platform: str, chat_id: str) -> Service:
        """The character who answers in a chat: the one it chose (``choose``), else the default;
        a choice of a character since removed from the cast falls back to the default."""
        name = await self.default.store.chat_character(platform, str(chat_id))
        return self.services.get(name) or self.default

    async def choose(self, platform: str, chat_id: str, name: str) -> Service:
        """From now on the character called ``name`` (a name or an alias) answers in this chat,
        across restarts; an unknown name raises ``UnknownCharacter``."""
        service = self.get(name) if name.strip() else None
        if service is None:
            raise UnknownCharacter(f"no character {name.strip()!r} in the cast — known: {', '.join(self.names)}")
        await self.default.store.set_chat_character(platform, str(chat_id), service.character)
        return service

    async def speaker(self, reply: Message) -> Service | None:
        """The character in whose conversation ``reply`` (a row of the store) was written; None
        if that character is no longer in the cast."""
        key = await self.default.store.conversation_character(reply.conversation_id)
        return self.default if key == "" else self.services.get(key)

    async def close(self, grace_s: float) -> None:
        import asyncio

        await asyncio.gather(*(service.close(grace_s) for service in self.services.values()))
