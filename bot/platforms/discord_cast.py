"""The cast on Discord: who answers a message, and how the reply shows who speaks.

A cast of one answers everywhere as itself, posted as the bot. In a larger cast:

| where     | who answers                                                                         |
|-----------|-------------------------------------------------------------------------------------|
| a channel | the cast member the message names (name or alias, also after a mention of the bot), |
|           | else the channel's ([discord] channels as a table), else the default (the first)    |
| a DM      | the one the user named last in that DM (kept across restarts), else the default     |

A command is for the chat's character (the channel's, the DM's), except ``/retry`` and
``/stop``: those are for the one the user's last message in that chat went to, since that is the
reply they mean (remembered while the bot runs; after a restart, the chat's character).

Where the bot has Manage Webhooks, the reply is posted through the channel's webhook (one named
``rolebot`` per channel, made once and reused) with the character's name and ``avatar`` (a
URL; an image file is not sent: the one webhook speaks for every character, so its own avatar
could be only one of theirs); elsewhere (DMs, channels without the permission) the reply opens
with the name in bold, ``**华妃**：…``. Streamed edits of a webhook's message go through the
webhook: Discord lets nobody else edit it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord
from discord.utils import MISSING

from bot.config import DiscordSettings
from bot.service import Service, parse_command
from bot.store import Message

log = logging.getLogger(__name__)

PLATFORM = "discord"
WEBHOOK_NAME = "rolebot"
# Whatever the model writes, nobody is notified: no @everyone, roles, users or reply pings.
NO_PINGS = discord.AllowedMentions.none()
UNKNOWN_WEBHOOK = 10015  # Discord's code: the webhook was deleted
ABOUT_THE_LAST_REPLY = ("retry", "stop")
REMEMBERED = 10_000  # (chat, user) pairs whose last addressee is kept in memory


def many(service: Service) -> bool:
    """Whether ``service`` plays in a cast of more than one."""
    return service.cast is not None and len(service.cast) > 1


def channel_character(settings: DiscordSettings, channel: Any) -> str | None:
    """The cast member ``[discord] channels`` gives a channel (a thread: its parent's), if any."""
    table = settings.channels
    if not isinstance(table, dict):
        return None
    for key in (str(channel.id), str(getattr(channel, "parent_id", None))):
        if key in table:
            return table[key]
    return None


def in_dm(channel: Any) -> bool:
    return isinstance(channel, discord.DMChannel) or (
        getattr(channel, "guild", None) is None and getattr(channel, "guild_id", None) is None)


async def who_answers(service: Service, settings: DiscordSettings, channel: Any, text: str) -> Service:
    """The cast member who answers ``text`` in ``channel`` (see the table above); naming one in a
    DM makes them that DM's character from now on."""
    if not many(service):
        return service
    cast = service.cast
    named = cast.named_in(text) if text else None
    if in_dm(channel):
        chat = str(channel.id)
        if named is not None:
            await service.store.set_chat_character(PLATFORM, chat, named.character)
            return named
        return cast.get(await service.store.chat_character(PLATFORM, chat)) or cast.default
    return named or cast.get(channel_character(settings, channel)) or cast.default


class Addressees:
    """Who each user's last message in each chat went to, for ``/retry`` and ``/stop``."""

    def __init__(self, service: Service, settings: DiscordSettings) -> None:
        self.service, self.settings = service, settings
        self._last: OrderedDict[tuple[str, str], Service] = OrderedDict()

    async def of(self, channel: Any, user_id: int | str, text: str) -> Service:
        """The cast member who answers ``text`` from this user in ``channel``."""
        if not many(self.service):
            return self.service
        key = (str(channel.id), str(user_id))
        command = parse_command(text)
        if command and command[0] in ABOUT_THE_LAST_REPLY and key in self._last:
            return self._last[key]
        speaker = await who_answers(self.service, self.settings, channel, "" if command else text)
        if not command:
            self._last[key] = speaker
            self._last.move_to_end(key)
            if len(self._last) > REMEMBERED:
                self._last.popitem(last=False)
        return speaker


async def owner(service: Service, reply: Message) -> Service:
    """The cast member whose reply ``reply`` is (a conversation is with one character)."""
    if not many(service):
        return service
    key = await service.store.conversation_character(reply.conversation_id)
    return (service.cast.get(key) if key else None) or service.cast.default


@dataclass(frozen=True)
class WebhookPart:
    """A message the webhook posted earlier (a reply being rewritten), known by its id only."""

    webhook: discord.Webhook
    id: int
    thread: Any = MISSING
    content: None = None  # not known: the first show edits it

    async def edit(self, **fields: Any) -> discord.WebhookMessage:
        return await self.webhook.edit_message(self.id, thread=self.thread, **fields)

    async def delete(self) -> None:
        await self.webhook.delete_message(self.id, thread=self.thread)


@dataclass
class Voice:
    """How one character's messages are posted in one channel: as the bot (``name`` empty: a
    cast of one), through the channel's webhook under the name, or with the name in bold."""

    name: str = ""
    webhook: discord.Webhook | None = None
    avatar_url: str | None = None
    thread: Any = MISSING  # the thread a webhook posts into
    # The channel's webhook anew, after Discord said this one is gone; None: there is none now.
    renew: Callable[[discord.Webhook], Awaitable[discord.Webhook | None]] | None = field(default=None, repr=False)

    def dress(self, text: str) -> str:
        """``text`` as posted: with the name in bold where no webhook shows it."""
        return f"**{self.name}**：{text}" if self.name and self.webhook is None else text

    async def send(self, channel: discord.abc.Messageable, text: str,
                   reply_to: discord.Message | None = None) -> discord.Message:
        """Post ``text`` (a reply to ``reply_to`` where the bot posts itself: a webhook cannot reply)."""
        if self.webhook is not None:
            try:
                return await self._post(text)
            except discord.NotFound as exc:  # deleted in the server's settings: another one, made now
                if exc.code != UNKNOWN_WEBHOOK or self.renew is None or (hook := await self.renew(self.webhook)) is None:
                    raise
                self.webhook = hook
                return await self._post(text)
        if reply_to is not None:
            return await reply_to.reply(text, mention_author=False, allowed_mentions=NO_PINGS)
        return await channel.send(text, allowed_mentions=NO_PINGS)

    async def _post(self, text: str) -> discord.WebhookMessage:
        return await self.webhook.send(text, username=self.name, avatar_url=self.avatar_url or MISSING,
                                       wait=True, allowed_mentions=NO_PINGS, thread=self.thread)

    def message(self, channel: discord.abc.Messageable, message_id: int):
        """A message this voice posted before, to edit or delete the way Discord allows."""
        if self.webhook is not None:
            return WebhookPart(self.webhook, message_id, self.thread)
        return channel.get_partial_message(message_id)


AS_BOT = Voice()


class Voices:
    """Each channel's webhook, found or made once per connection and reused."""

    def __init__(self) -> None:
        self._webhooks: dict[int, discord.Webhook] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._told: set[str] = set()  # characters whose avatar file was said to go unsent

    async def of(self, service: Service, channel: Any) -> Voice:
        """How ``service``'s character posts in ``channel``."""
        if not many(service):
            return AS_BOT
        character = service.config.character
        avatar = character.avatar.strip()
        avatar_url = avatar if avatar.startswith(("https://", "http://")) else None
        thread = channel if isinstance(channel, discord.Thread) else MISSING
        home = channel.parent if isinstance(channel, discord.Thread) else channel
        hook = await self._webhook(home) if isinstance(home, discord.TextChannel) else None
        if hook is None:
            return Voice(character.name)
        if avatar and avatar_url is None and character.name not in self._told:
            self._told.add(character.name)
            log.info("Discord: %s's avatar %s is a file; a webhook post takes a picture's URL, so %s's "
                     "replies show no picture of theirs ([[cast]] avatar = \"https://…\")",
                     character.name, avatar, character.name)
        return Voice(character.name, hook, avatar_url, thread, lambda gone: self._renew(home, gone))

    async def _renew(self, channel: discord.TextChannel, gone: discord.Webhook) -> discord.Webhook | None:
        """The channel's webhook after ``gone`` was deleted: made once, however many replies
        found it gone (one that comes second finds the new one cached)."""
        if (cached := self._webhooks.get(channel.id)) is not None and cached.id == gone.id:
            del self._webhooks[channel.id]
        return await self._webhook(channel)

    async def _webhook(self, channel: discord.TextChannel) -> discord.Webhook | None:
        """The channel's rolebot webhook; None where the bot may not manage webhooks (asked each
        time from the cached permissions: a server admin may grant or revoke it any time)."""
        if not channel.permissions_for(channel.guild.me).manage_webhooks:
            self._webhooks.pop(channel.id, None)
            return None
        async with self._locks.setdefault(channel.id, asyncio.Lock()):  # two replies at once: one webhook
            hook = self._webhooks.get(channel.id)
            if hook is None:
                try:
                    mine = [h for h in await channel.webhooks() if h.name == WEBHOOK_NAME and h.token
                            and h.user is not None and h.user.id == channel.guild.me.id]
                    hook = mine[0] if mine else await channel.create_webhook(
                        name=WEBHOOK_NAME, reason="rolebot posts each character's replies under their name")
                except discord.HTTPException as exc:
                    log.warning("Discord: no webhook in channel %s (%s); replies show the name in bold",
                                channel.id, exc)
                    return None
                self._webhooks[channel.id] = hook
            return hook
