"""The Discord front-end (discord.py 2.x): the character in channels and DMs, 👍/👎 reactions as
ratings, and slash commands.

| what a user does                          | what the bot does                                         |
|-------------------------------------------|-----------------------------------------------------------|
| mentions the bot, or writes in a channel  | types, then streams the reply by editing one message (at   |
| of ``[discord] channels``, or in a DM     | most once per ``edit_interval``), more past 2000 chars     |
| reacts 👍 / 👎 on a reply (or removes it)  | records (or removes) the rating, also after restarts       |
| reacts 🔄 on the last reply, or sends      | writes another reply to the user's last message into the   |
| ``/retry`` (text or slash command); only  | same message(s), edited in place, then 👍/👎/🔄 again; the   |
| the one who wrote that message may        | old reply stays in the log as an alternative               |
| reacts ⏹ on a reply being written, or     | stops it there; its text so far stays, rateable            |
| sends ``/stop``                           |                                                            |
| ``/reset``, ``/forget``                   | the service's answer, only to the user                     |
| ``/status``, ``/retrain``, ``/rollback``  | the same, for admins: ``[service] admins_discord``         |

A cast of several characters: who answers where, and how a reply shows who speaks, is
``bot.platforms.discord_cast``; a reaction or 🔄 on a reply goes to the character who wrote it.

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
from bot.logs import keep_secret
from bot.platforms import Options
from bot.platforms.discord_cast import AS_BOT, NO_PINGS, Addressees, Voice, Voices, many, owner
from bot.platforms.text import RATINGS, RETRY, STOP, Showing, paced_edits, take_over
from bot.platforms.text import split as text_split
from bot.service import Answer, IncomingMessage, Reply, Service, UnknownMessage
from training.errors import UserError

log = logging.getLogger(__name__)

PLATFORM = "discord"
MAX_CHARS = 2000  # Discord refuses longer message content
SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff]")  # 👍🏽 is a 👍 too
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 300.0
# How long stop() waits for replies that finished during shutdown to get their edit and reactions.
STOP_GRACE_S = 5.0
# (name, description, admin only, slow: acknowledge at once and answer in a follow-up, since
# Discord forgets an interaction that is not acknowledged within 3 seconds).
COMMANDS = (
    ("retry", "Write another reply to your last message", False, True),
    ("stop", "Stop the reply being written in this channel", False, False),
    ("reset", "Start a new conversation in this channel", False, False),
    ("forget", "Delete your messages and ratings", False, True),
    ("status", "What the bot serves and how retraining stands (admins)", True, True),
    ("retrain", "Retrain the character from the rated replies (admins)", True, True),
    ("rollback", "Serve the previous adapter version (admins)", True, True),
)


def from_config(config: Config, service: Service, options: Options) -> DiscordFrontend | None:
    token = secret(config.discord.token_env)
    keep_secret(token)  # never in a log line
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
        self._answering: set[asyncio.Task] = set()  # handlers still posting
        self._showing = Showing()  # the replies streaming now, for ⏹ and for 🔄 in place
        self.voices = Voices()  # a cast's webhooks, per connection
        self.addressees = Addressees(service, settings)  # who of a cast each message goes to

    def _cast(self) -> list[Service]:
        return list(self.service.cast) if self.service.cast is not None else [self.service]

    async def start(self) -> None:
        for service in self._cast():  # a retrain of any character says in the channel when it ends
            service.notifiers[PLATFORM] = self.notify
        self._task = asyncio.create_task(self._keep_connected(), name="discord")

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Disconnect. A reply that finished as the bot shut down still gets its last edit and
        its 👍/👎 first: the handlers posting are waited for (up to ``grace_s``) before the HTTP
        session closes under them."""
        self._stopping = True
        for service in self._cast():
            service.notifiers.pop(PLATFORM, None)
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
            self.voices = Voices()  # webhooks use the client's HTTP session
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
        if message.author.bot or message.webhook_id is not None:
            return False  # other bots, and the bot's own messages (its webhooks'), which Discord echoes back
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
            speaker = await self.addressees.of(message.channel, message.author.id, text)
            voice = await self.voices.of(speaker, message.channel)
            async with message.channel.typing():
                if not incoming.text.startswith("/"):  # a conversation opens with [character] greeting
                    greeting = await speaker.greet(PLATFORM, incoming.chat_id, incoming.display_name)
                    for part in split(voice.dress(greeting.text)) if greeting is not None else ():
                        await voice.send(message.channel, part)
                out = await speaker.handle(incoming)
                if isinstance(out, Answer):
                    await message.reply(out.text, mention_author=False, allowed_mentions=NO_PINGS)
                    return
                if out.notice:
                    await message.channel.send(out.notice, allowed_mentions=NO_PINGS)
                if out.replaces is not None:  # "/retry" as text: the last reply is rewritten
                    await self.rewrite(message.channel, out, message, voice)
                    return
                parts = await self.stream(message.channel, out, message, voice=voice)
            await self.add_buttons(out, parts)
        except discord.HTTPException as exc:
            log.warning("Discord: could not answer message %s in channel %s: %s",
                        message.id, message.channel.id, exc)
        finally:
            self._answering.discard(task)

    async def add_buttons(self, reply: Reply, parts: list) -> None:
        """👍/👎/🔄 under a finished reply's last part: a click rates it, or writes another."""
        if (await reply.result()).notice:  # dropped before it began: nothing to rate
            return
        for emoji in (*RATINGS, RETRY):
            await parts[-1].add_reaction(emoji)

    async def stream(self, channel: discord.abc.Messageable, reply: Reply,
                     message: discord.Message | None = None, parts: list | None = None,
                     voice: Voice = AS_BOT) -> list:
        """Show the reply as it grows: the first text as a reply to the user's ``message`` (in
        ``channel`` without one), then an edit at most every ``edit_interval`` seconds; past
        2000 characters it goes on in a new message. Returns the messages that carry it, each
        linked to the reply's row. ``parts``: messages to write it into first (``rewrite``).
        ``voice``: who posts it (a cast member's name, or the bot)."""
        parts = [] if parts is None else parts

        async def show(text: str) -> bool:
            await self._show(channel, message, reply, parts, text, voice)
            return True

        with self._showing.showing(reply):
            final = await paced_edits(reply, self.settings.edit_interval, show)
            await self._show(channel, message, reply, parts, final, voice)  # edits only what changed
        return parts

    async def _show(self, channel: discord.abc.Messageable, message: discord.Message | None, reply: Reply,
                    parts: list, text: str, voice: Voice) -> None:
        """Make the posted messages read ``text``: edit the parts that changed, post new ones."""
        for i, chunk in enumerate(split(voice.dress(text.strip()))):
            if i < len(parts):
                if getattr(parts[i], "content", None) != chunk:  # a taken-over part: not known
                    try:
                        parts[i] = await parts[i].edit(content=chunk, allowed_mentions=NO_PINGS)
                    except discord.NotFound:  # deleted meanwhile: the text goes on in a new one
                        parts[i] = await voice.send(channel, chunk)
                        await self.service.posted(reply, str(parts[i].id))
                continue
            sent = await voice.send(channel, chunk, reply_to=None if parts else message)
            parts.append(sent)
            await self.service.posted(reply, str(sent.id))

    # Regenerate and stop

    async def rewrite(self, channel: discord.abc.Messageable, reply: Reply,
                      message: discord.Message | None = None, voice: Voice = AS_BOT) -> list:
        """Stream a regenerated reply into the message that showed the reply it replaces (edited
        in place), its further parts deleted (see ``take_over``), then put 👍/👎/🔄 under it.
        The reactions users left on the old reply are cleared first: they rated the old text
        (those ratings stay on its row), and a 👍 still showing would keep the user from adding
        one for the new text. Where Discord lets the bot remove only its own reactions (a DM),
        they stay. Without messages to take over, it is posted like any reply."""
        with self._showing.showing(reply):  # from now: a second 🔄 waits for this one
            keep, drop = await take_over(self.service, self._showing, reply)
            for message_id in drop:
                try:
                    await voice.message(channel, int(message_id)).delete()
                except discord.NotFound:
                    pass
            parts = [voice.message(channel, int(message_id)) for message_id in keep]
            if parts and not drop:  # one part: the reactions are on it
                try:
                    await channel.get_partial_message(parts[0].id).clear_reactions()
                except discord.Forbidden:
                    log.info("Discord: may not clear the reactions in channel %s; they stay", channel.id)
                except discord.NotFound:
                    pass
            parts = await self.stream(channel, reply, message, parts, voice)
        await self.add_buttons(reply, parts)
        return parts

    async def _retry(self, event: discord.RawReactionActionEvent, reply_id: int, service: Service) -> None:
        """🔄 added under a reply: the service decides whether this user may have another (only
        the author of the last message, only under its reply); a refusal is said in the channel,
        under the reply, pinging nobody."""
        channel = self.client.get_partial_messageable(event.channel_id, guild_id=event.guild_id)
        name = event.member.display_name if event.member else None
        out = await service.regenerate(
            IncomingMessage(PLATFORM, str(event.channel_id), str(event.user_id), "", display_name=name),
            reply_id=reply_id)
        if isinstance(out, Answer):
            await channel.send(f"<@{event.user_id}> {out.text}", allowed_mentions=NO_PINGS,
                               reference=channel.get_partial_message(event.message_id), mention_author=False)
            return
        if out.notice:
            await channel.send(out.notice, allowed_mentions=NO_PINGS)
        # The cached channel, not the partial one: whether the bot may post through a webhook there.
        voice = await self.voices.of(service, self.client.get_channel(event.channel_id) or channel)
        await self.rewrite(channel, out, voice=voice)

    # Ratings

    async def on_reaction(self, event: discord.RawReactionActionEvent, me: discord.ClientUser) -> None:
        """👍/👎 added to (or removed from) one of the character's replies. Raw events, so a
        reply from before a restart (not in discord.py's cache) counts too."""
        emoji = SKIN_TONES.sub("", str(event.emoji))
        value = RATINGS.get(emoji)
        if (value is None and emoji not in (RETRY, STOP)) or event.user_id == me.id:
            return  # another emoji, or the bot's own reactions (the buttons it put there)
        if event.message_author_id not in (None, me.id) and not many(self.service):
            return  # a cast's replies may be its webhooks' messages, also ones made before a restart
        where = (PLATFORM, str(event.channel_id), str(event.message_id))
        task = asyncio.current_task()
        self._answering.add(task)
        try:
            service = await self._writer(where)
            if service is None:
                return
            if value is None:  # 🔄 or ⏹; taking one back does nothing
                if event.event_type == "REACTION_ADD" and (row := await service.reply_by_platform_id(*where)):
                    if emoji == RETRY:
                        await self._retry(event, row.id, service)
                    elif (streaming := self._showing.get(row.id)) is not None:
                        streaming.cancel()
            elif event.event_type == "REACTION_ADD":
                name = event.member.display_name if event.member else None
                await service.rate_platform_message(*where, str(event.user_id), value, display_name=name)
            else:
                await service.unrate_platform_message(*where, str(event.user_id), value)
        except UnknownMessage:
            return  # a reaction on a message that is not one of the character's logged replies
        except UserError as exc:
            log.info("Discord: rating on message %s not recorded: %s", event.message_id, exc)
        except discord.HTTPException as exc:
            log.warning("Discord: could not answer %s on message %s: %s", emoji, event.message_id, exc)
        finally:
            self._answering.discard(task)

    async def _writer(self, where: tuple[str, str, str]) -> Service | None:
        """The character whose reply a platform message carries: in a cast, None for a message
        that carries none of theirs; a cast of one asks its service, which says so itself."""
        if not many(self.service):
            return self.service
        row = await self.service.reply_by_platform_id(*where)
        return None if row is None else await owner(self.service, row)

    # Slash commands

    async def command(self, interaction: discord.Interaction, name: str, slow: bool) -> None:
        """Run a command through the service (which checks who is an admin) and answer only to
        the user who ran it."""
        if slow:
            await interaction.response.defer(ephemeral=True, thinking=True)
        incoming = IncomingMessage(PLATFORM, str(interaction.channel_id), str(interaction.user.id),
                                   f"/{name}", display_name=interaction.user.display_name)
        channel = interaction.channel or self.client.get_partial_messageable(
            interaction.channel_id, guild_id=interaction.guild_id)
        service = await self.addressees.of(channel, interaction.user.id, f"/{name}")
        out = await service.handle(incoming)
        if isinstance(out, Reply):  # /retry: the last reply is rewritten where it stands
            await interaction.followup.send(f"{RETRY} Writing another reply in place of the last one.",
                                            ephemeral=True, allowed_mentions=NO_PINGS)
            task = asyncio.current_task()
            self._answering.add(task)
            try:
                if out.notice:
                    await interaction.followup.send(out.notice, ephemeral=True, allowed_mentions=NO_PINGS)
                await self.rewrite(channel, out, voice=await self.voices.of(service, channel))
            except discord.HTTPException as exc:
                log.warning("Discord: could not rewrite the last reply in channel %s: %s", interaction.channel_id, exc)
            finally:
                self._answering.discard(task)
            return
        for i, part in enumerate(split(out.text)):  # any other command is answered with an Answer
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
