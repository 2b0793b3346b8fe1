"""The Discord front-end (discord.py 2.x): the character in channels and DMs, 👍/👎 reactions as
ratings, and slash commands.

| what a user does                          | what the bot does                                         |
|-------------------------------------------|-----------------------------------------------------------|
| mentions the bot, or writes in a channel  | types, then streams the reply by editing one message (at   |
| of ``[discord] channels``, or in a DM     | most once per ``edit_interval``), more past 2000 chars     |
| reacts 👍 / 👎 on a reply (or removes it)  | records (or removes) the rating, also after restarts       |
| ``/reset``, ``/forget``                   | the service's answer, only to the user                     |
| ``/status``, ``/retrain``, ``/rollback``  | the same, for admins: ``[service] admins_discord``         |

Needs the Message Content intent switched on in the developer portal. The bot is on when the
environment variable named by ``[discord] token_env`` holds its token. If Discord is down or
the connection drops, it reconnects with back-off while the other platforms keep serving; a
token Discord refuses stops only this platform, with one error naming the variable.
"""

from __future__ import annotations

import asyncio
import logging
import re

import discord
from discord import app_commands

from bot.config import Config, DiscordSettings, secret
from bot.platforms import Options
from bot.platforms.text import RATINGS, paced_edits
from bot.platforms.text import split as text_split
from bot.service import Answer, IncomingMessage, Reply, Service, UnknownMessage
from training.errors import UserError

log = logging.getLogger(__name__)

PLATFORM = "discord"
MAX_CHARS = 2000  # Discord refuses longer message content
SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff]")  # 👍🏽 is a 👍 too
# Whatever the model writes, nobody is notified: no @everyone, roles, users or reply pings.
NO_PINGS = discord.AllowedMentions.none()
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 300.0
# How long stop() waits for replies that finished during shutdown to get their edit and reactions.
STOP_GRACE_S = 5.0
# (name, description, admin only, slow: acknowledge at once and answer in a follow-up, since
# Discord forgets an interaction that is not acknowledged within 3 seconds).
COMMANDS = (
    ("reset", "Start a new conversation in this channel", False, False),
    ("forget", "Delete your messages and ratings", False, True),
    ("status", "What the bot serves and how retraining stands (admins)", True, True),
    ("retrain", "Retrain the character from the rated replies (admins)", True, True),
    ("rollback", "Serve the previous adapter version (admins)", True, True),
)


def from_config(config: Config, service: Service, options: Options) -> DiscordFrontend | None:
    token = secret(config.discord.token_env)
    if token is None:
        return None
    return DiscordFrontend(service, config.discord, token)


class DiscordFrontend:
    """Keeps a ``CharacterClient`` connected in the background; ``start()`` never waits for
    Discord, so a platform that is down delays nothing else."""

    name = "discord"

    def __init__(self, service: Service, settings: DiscordSettings, token: str, *,
                 guild_ready_timeout: float = 2.0, retry_first_s: float = RETRY_FIRST_S):
        self.service = service
        self.settings = settings
        self.token = token
        self.guild_ready_timeout = guild_ready_timeout  # seconds READY waits for guilds
        self.retry_first_s = retry_first_s
        self.client: CharacterClient | None = None
        self.error: str | None = None  # why this platform gave up, if it did
        self.synced = False
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._answering: set[asyncio.Task] = set()  # on_message handlers still posting

    async def start(self) -> None:
        self.service.notifiers[PLATFORM] = self.notify
        self._task = asyncio.create_task(self._keep_connected(), name="discord")

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Disconnect. A reply that finished as the bot shut down still gets its last edit and
        its 👍/👎 first: the handlers posting are waited for (up to ``grace_s``) before the HTTP
        session closes under them."""
        self._stopping = True
        self.service.notifiers.pop(PLATFORM, None)
        if self._answering:
            await asyncio.wait(set(self._answering), timeout=grace_s)
        if self.client is not None:
            await self.client.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _keep_connected(self) -> None:
        """Log in and stay connected. discord.py reconnects (and RESUMEs) a dropped gateway by
        itself; this loop covers what it gives up on: a login that fails, a fatal close."""
        delay = self.retry_first_s
        while not self._stopping:
            self.client = client = CharacterClient(self)
            try:
                await client.start(self.token, reconnect=True)
            except discord.LoginFailure:
                return self._give_up(f"Discord refused the bot token in ${self.settings.token_env}: "
                                     "check the variable (Developer Portal → Bot → Reset Token); "
                                     "Discord is off until rolebot restarts")
            except discord.PrivilegedIntentsRequired:
                return self._give_up("Discord refused the Message Content intent: switch it on in the "
                                     "Developer Portal (Bot → Privileged Gateway Intents); Discord is "
                                     "off until rolebot restarts")
            except discord.ConnectionClosed as exc:
                if exc.code == 4004:  # the gateway's "Authentication failed"
                    return self._give_up(f"Discord refused the bot token in ${self.settings.token_env}; "
                                         "Discord is off until rolebot restarts")
                self._retrying(exc, delay)
            except Exception as exc:
                self._retrying(exc, delay)
            finally:
                await client.close()
            if client.was_ready:
                delay = self.retry_first_s
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _retrying(self, exc: Exception, delay: float) -> None:
        if not self._stopping:
            log.warning("Discord: cannot connect (%s); retrying in %.1f s",
                        redact(f"{type(exc).__name__}: {exc}", self.token), delay)

    def _give_up(self, error: str) -> None:
        self.error = error
        log.error("%s", error)

    async def notify(self, chat_id: str, text: str) -> None:
        """Send to a channel unprompted (e.g. that a retrain ended)."""
        if self.client is None or not self.client.is_ready():
            log.warning("Discord: not connected; dropped a notice for channel %s", chat_id)
            return
        channel = self.client.get_partial_messageable(int(chat_id))
        for part in split(text):
            await channel.send(part)

    # Messages

    def addressed(self, message: discord.Message, me: discord.ClientUser) -> bool:
        """Whether a message is for the character: a DM (if allowed), a mention (a reply to the
        bot mentions it too), or any message in a configured channel."""
        if message.author.bot:
            return False  # other bots, and the bot's own messages, which Discord echoes back
        if message.guild is None:
            return self.settings.allow_dms
        channel = message.channel
        configured = {str(channel.id), str(getattr(channel, "parent_id", None))}
        return me in message.mentions or bool(configured & set(self.settings.channels))

    async def on_message(self, message: discord.Message, me: discord.ClientUser) -> None:
        """Answer one user message with a streamed reply, or with the service's short answer."""
        if not self.addressed(message, me):
            return
        text = re.sub(rf"<@!?{me.id}>", "", message.content).strip()
        incoming = IncomingMessage(PLATFORM, str(message.channel.id), str(message.author.id), text,
                                   display_name=message.author.display_name,
                                   platform_message_id=str(message.id))
        task = asyncio.current_task()
        self._answering.add(task)
        try:
            async with message.channel.typing():
                out = await self.service.handle(incoming)
                if isinstance(out, Answer):
                    await message.reply(out.text, mention_author=False, allowed_mentions=NO_PINGS)
                    return
                if out.notice:
                    await message.channel.send(out.notice, allowed_mentions=NO_PINGS)
                parts = await self.stream(message, out)
            if (await out.result()).notice:  # dropped before it began: nothing to rate
                return
            for emoji in RATINGS:  # the buttons: a click is a rating
                await parts[-1].add_reaction(emoji)
        except discord.HTTPException as exc:
            log.warning("Discord: could not answer message %s in channel %s: %s",
                        message.id, message.channel.id, exc)
        finally:
            self._answering.discard(task)

    async def stream(self, message: discord.Message, reply: Reply) -> list[discord.Message]:
        """Show the reply as it grows: the first text as a reply to the user, then an edit at
        most every ``edit_interval`` seconds; past 2000 characters it goes on in a new message.
        Returns the messages that carry it, each linked to the reply's row."""
        parts: list[discord.Message] = []

        async def show(text: str) -> bool:
            await self._show(message, reply, parts, text)
            return True

        final = await paced_edits(reply, self.settings.edit_interval, show)
        await self._show(message, reply, parts, final)  # edits only what changed
        return parts

    async def _show(self, message: discord.Message, reply: Reply, parts: list[discord.Message],
                    text: str) -> None:
        """Make the posted messages read ``text``: edit the parts that changed, post new ones."""
        for i, chunk in enumerate(split(text.strip())):
            if i < len(parts):
                if parts[i].content != chunk:
                    parts[i] = await parts[i].edit(content=chunk, allowed_mentions=NO_PINGS)
                continue
            if parts:
                sent = await message.channel.send(chunk, allowed_mentions=NO_PINGS)
            else:
                sent = await message.reply(chunk, mention_author=False, allowed_mentions=NO_PINGS)
            parts.append(sent)
            await self.service.posted(reply, str(sent.id))

    # Ratings

    async def on_reaction(self, event: discord.RawReactionActionEvent, me: discord.ClientUser) -> None:
        """👍/👎 added to (or removed from) one of the character's replies. Raw events, so a
        reply from before a restart (not in discord.py's cache) counts too."""
        value = RATINGS.get(SKIN_TONES.sub("", str(event.emoji)))
        if value is None or event.user_id == me.id:
            return  # another emoji, or the bot's own reactions (the buttons it put there)
        if event.message_author_id is not None and event.message_author_id != me.id:
            return
        where = (PLATFORM, str(event.channel_id), str(event.message_id))
        try:
            if event.event_type == "REACTION_ADD":
                name = event.member.display_name if event.member else None
                await self.service.rate_platform_message(*where, str(event.user_id), value, display_name=name)
            else:
                await self.service.unrate_platform_message(*where, str(event.user_id), value)
        except UnknownMessage:
            return  # a reaction on a message that is not one of the character's logged replies
        except UserError as exc:
            log.info("Discord: rating on message %s not recorded: %s", event.message_id, exc)

    # Slash commands

    async def command(self, interaction: discord.Interaction, name: str, slow: bool) -> None:
        """Run a command through the service (which checks who is an admin) and answer only to
        the user who ran it."""
        if slow:
            await interaction.response.defer(ephemeral=True, thinking=True)
        incoming = IncomingMessage(PLATFORM, str(interaction.channel_id), str(interaction.user.id),
                                   f"/{name}", display_name=interaction.user.display_name)
        out = await self.service.handle(incoming)
        for i, part in enumerate(split(out.text)):  # a command is answered with an Answer, never a Reply
            if i == 0 and not slow:
                await interaction.response.send_message(part, ephemeral=True, allowed_mentions=NO_PINGS)
            else:
                await interaction.followup.send(part, ephemeral=True, allowed_mentions=NO_PINGS)


class CharacterClient(discord.Client):
    """One connection to Discord; its events go to the front-end."""

    def __init__(self, frontend: DiscordFrontend):
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: read what users write in channels
        super().__init__(intents=intents, allowed_mentions=NO_PINGS,
                         guild_ready_timeout=frontend.guild_ready_timeout)
        self.frontend = frontend
        self.tree = app_commands.CommandTree(self)
        self.was_ready = False
        for name, description, admin, slow in COMMANDS:
            command = app_commands.Command(name=name, description=description,
                                           callback=_command_callback(frontend, name, slow))
            if admin:
                # Hidden from members without Administrator until a server admin changes that
                # in Server Settings → Integrations; [service] admins_discord still decides.
                command.default_permissions = discord.Permissions(administrator=True)
            self.tree.add_command(command)

    async def setup_hook(self) -> None:
        # Once per process, not per reconnect: Discord rate-limits command registration.
        if not self.frontend.synced:
            await self.tree.sync()
            self.frontend.synced = True

    async def on_ready(self) -> None:
        self.was_ready = True
        log.info("Discord: connected as %s", self.user)

    async def on_message(self, message: discord.Message) -> None:
        await self.frontend.on_message(message, self.user)

    async def on_raw_reaction_add(self, event: discord.RawReactionActionEvent) -> None:
        await self.frontend.on_reaction(event, self.user)

    async def on_raw_reaction_remove(self, event: discord.RawReactionActionEvent) -> None:
        await self.frontend.on_reaction(event, self.user)


def _command_callback(frontend: DiscordFrontend, name: str, slow: bool):
    async def callback(interaction: discord.Interaction) -> None:
        await frontend.command(interaction, name, slow)

    callback.__name__ = name
    return callback


def split(text: str, limit: int = MAX_CHARS) -> list[str]:
    return text_split(text, limit)


def redact(text: str, token: str) -> str:
    return text.replace(token, "[token]") if token else text
