"""The Discord emulator drives a real discord.py Client: login, gateway, messages, slash commands, faults."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import discord
import pytest
from discord import app_commands
from emulators.discord_api import DiscordEmulator

USER = 4242


def make_client(*, message_content: bool = True) -> discord.Client:
    intents = discord.Intents.default()
    intents.message_content = message_content
    # on_ready waits guild_ready_timeout after the last GUILD_CREATE; 2 s by default.
    return discord.Client(intents=intents, guild_ready_timeout=0.1)


@contextlib.asynccontextmanager
async def running(dc: DiscordEmulator, client: discord.Client) -> AsyncIterator[discord.Client]:
    """Log the client in and connect it inside the test's loop, as the product will; close it after."""
    with dc.patch_discord():
        await client.login(dc.bot_token)
        task = asyncio.create_task(client.connect(reconnect=True))
        try:
            await asyncio.wait_for(client.wait_until_ready(), 5)
            yield client
        finally:
            await client.close()
            await asyncio.wait_for(task, 5)
    assert dc.unhandled == []  # discord.py called no endpoint the emulator lacks


@pytest.mark.asyncio
async def test_client_becomes_ready_with_the_guild_and_the_intents_it_asked_for():
    async with DiscordEmulator() as dc, running(dc, make_client()) as client:
        assert client.user.id == dc.bot_user_id
        assert client.application_id == dc.bot_user_id
        assert client.get_channel(dc.channel_id).guild.id == dc.guild_id
        assert discord.Intents._from_value(dc.intents).message_content
        assert dc.heartbeats >= 1  # discord.py beats once on HELLO
        assert [r.path for r in dc.requests] == ["/users/@me", "/oauth2/applications/@me"]
        assert dc.gateway_urls == ["/gateway?v=10&encoding=json&compress=zlib-stream"]


@pytest.mark.asyncio
async def test_bad_token_raises_login_failure():
    client = make_client()
    async with DiscordEmulator() as dc:
        with dc.patch_discord():
            with pytest.raises(discord.LoginFailure):
                await client.login("not-the-token")
            await client.close()


@pytest.mark.asyncio
async def test_bot_replies_then_edits_and_sees_reactions():
    client = make_client()
    seen: list[discord.Message] = []
    ratings: list[discord.RawReactionActionEvent] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author == client.user:
            return  # Discord echoes the bot's own messages back to it
        seen.append(message)
        async with message.channel.typing():
            reply = await message.reply("thinking…", mention_author=False)
        await reply.add_reaction("👍")
        await reply.edit(content=f"you said: {message.content}")

    @client.event
    async def on_raw_reaction_add(event: discord.RawReactionActionEvent) -> None:
        if event.user_id == client.user.id:
            return
        ratings.append(event)
        message = client.get_channel(event.channel_id).get_partial_message(event.message_id)
        await message.remove_reaction("👍", client.user)  # the hint has done its job

    @client.event
    async def on_raw_reaction_remove(event: discord.RawReactionActionEvent) -> None:
        if event.user_id != client.user.id:
            ratings.append(event)

    async with DiscordEmulator() as dc, running(dc, client):
        sent = await dc.user_sends("hello there", user_id=USER, mention_bot=True)
        reply = await dc.wait_for(lambda: dc.sent_messages and dc.sent_messages[0].edits and dc.sent_messages[0])

        assert seen[0].content == f"<@{dc.bot_user_id}> hello there"
        assert seen[0].author.id == USER and client.user in seen[0].mentions
        assert reply.versions == ["thinking…", f"you said: <@{dc.bot_user_id}> hello there"]
        assert reply.reply_to == int(sent["id"]) and reply.pinged_user_ids == []
        assert reply.edits[0].at >= reply.at
        assert [t.channel_id for t in dc.typing] == [dc.channel_id]
        assert dc.reactions[reply.id] == {"👍": {dc.bot_user_id}}

        await dc.user_reacts(reply.id, "👎", user_id=USER)
        await dc.wait_for(lambda: not dc.reactions[reply.id]["👍"])
        await dc.user_reacts(reply.id, "👎", user_id=USER, remove=True)
        await dc.wait_for(lambda: len(ratings) == 2)
        assert [(r.event_type, r.message_id, str(r.emoji), r.user_id) for r in ratings] == [
            ("REACTION_ADD", reply.id, "👎", USER),
            ("REACTION_REMOVE", reply.id, "👎", USER),
        ]
        assert ratings[0].member.id == USER


@pytest.mark.asyncio
async def test_direct_messages_and_missing_message_content_intent():
    client = make_client(message_content=False)
    seen: list[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message)

    async with DiscordEmulator() as dc, running(dc, client):
        await dc.user_sends("not for you", user_id=USER)
        await dc.user_sends("for you", user_id=USER, mention_bot=True)
        await dc.user_sends("a secret", user_id=USER, dm=True)
        await dc.wait_for(lambda: len(seen) == 3)

    # Discord blanks guild messages that neither mention the bot nor are DMs.
    assert [m.content for m in seen] == ["", f"<@{dc.bot_user_id}> for you", "a secret"]
    assert isinstance(seen[2].channel, discord.DMChannel)


@pytest.mark.asyncio
async def test_slash_command_is_synced_once_deferred_and_followed_up():
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="ask", description="Ask the character something")
    async def ask(interaction: discord.Interaction, question: str) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content=f"answer to {question}")
        await interaction.followup.send("and one more thing")

    @tree.command(name="whoami", description="Say whether you are an admin")
    async def whoami(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"admin={interaction.permissions.administrator}", ephemeral=True)

    client.setup_hook = tree.sync

    async with DiscordEmulator() as dc, running(dc, client):
        assert [(s.guild_id, s.names) for s in dc.command_syncs] == [(None, ["ask", "whoami"])]

        asked = dc.interactions[await dc.user_invokes("ask", USER, {"question": "why?"})]
        await dc.wait_for(lambda: asked.followups)
        assert asked.deferred and asked.original.versions == ["", "answer to why?"]
        assert [m.content for m in asked.followups] == ["and one more thing"]
        assert [c.name for c in await tree.fetch_commands()] == ["ask", "whoami"]

        admin = dc.interactions[await dc.user_invokes("whoami", USER, admin_permissions=True)]
        plain = dc.interactions[await dc.user_invokes("whoami", USER)]
        await dc.wait_for(lambda: admin.original and plain.original)
        assert (admin.original.content, plain.original.content) == ("admin=True", "admin=False")
        assert admin.original.ephemeral

        with pytest.raises(LookupError):
            await dc.user_invokes("retrain", USER)


@pytest.mark.asyncio
async def test_interaction_not_acknowledged_in_time_is_unknown():
    client = make_client()
    tree = app_commands.CommandTree(client)
    errors: list[Exception] = []

    @tree.command(name="slow", description="Answers without deferring first")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.2)
        try:
            await interaction.response.send_message("too late")
        except discord.NotFound as e:
            errors.append(e)

    client.setup_hook = tree.sync
    async with DiscordEmulator(interaction_ack_timeout=0.1) as dc, running(dc, client):
        await dc.user_invokes("slow", USER)
        await dc.wait_for(lambda: errors)
        assert errors[0].code == 10062  # Unknown interaction: Discord's 3 s window has passed


@pytest.mark.asyncio
async def test_privileged_intent_not_enabled_in_the_portal():
    client = make_client(message_content=True)
    async with DiscordEmulator(portal_privileged_intents=0) as dc:
        with dc.patch_discord():
            await client.login(dc.bot_token)
            with pytest.raises(discord.PrivilegedIntentsRequired):
                await asyncio.wait_for(client.connect(reconnect=True), 5)
            await client.close()


@pytest.mark.asyncio
async def test_rate_limited_send_is_waited_out():
    async with DiscordEmulator() as dc, running(dc, make_client()) as client:
        dc.fail_next("POST", r"^/channels/\d+/messages$", status=429, retry_after=0.3)
        await client.get_channel(dc.channel_id).send("hello")

        posts = [r for r in dc.requests if r.method == "POST"]
        assert [r.status for r in posts] == [429, 200]
        assert posts[1].at - posts[0].at >= 0.29  # discord.py slept retry_after
        assert [m.content for m in dc.sent_messages] == ["hello"]


@pytest.mark.asyncio
async def test_what_discord_refuses_is_refused():
    async with DiscordEmulator() as dc, running(dc, make_client()) as client:
        channel = client.get_channel(dc.channel_id)
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        assert (too_long.value.status, too_long.value.code) == (400, 50035)

        await channel.send("@everyone look", allowed_mentions=discord.AllowedMentions.none())
        await channel.send("@everyone look")
        assert [m.pings_everyone for m in dc.sent_messages] == [False, True]


@pytest.mark.parametrize("abrupt", [False, True])
@pytest.mark.asyncio
async def test_dropped_gateway_is_resumed_and_missed_events_replayed(abrupt: bool):
    client = make_client()
    seen: list[str] = []
    resumed = asyncio.Event()
    client.event(_named("on_message", lambda m: seen.append(m.content)))
    client.event(_named("on_resumed", resumed.set))

    async with DiscordEmulator() as dc, running(dc, client):
        session_id = client.ws.session_id
        await dc.drop_gateway(abrupt=abrupt)
        await dc.user_sends("sent while you were away", user_id=USER)
        await asyncio.wait_for(resumed.wait(), 10)
        await dc.wait_for(lambda: seen)

        assert seen == ["sent while you were away"]
        assert [r["session_id"] for r in dc.resumes] == [session_id]
        assert len(dc.identifies) == 1
        assert dc.gateway_urls[1].startswith("/resume?")  # READY's resume_gateway_url


def _named(name: str, callback):
    """An event handler with the name discord.py dispatches on."""

    async def handler(*args):
        callback(*args)

    handler.__name__ = name
    return handler


@pytest.mark.asyncio
async def test_channel_webhooks_post_as_any_name_and_only_they_edit_their_messages():
    from emulators.discord_api import BOT_PERMISSIONS, MANAGE_WEBHOOKS

    async with DiscordEmulator(bot_permissions=BOT_PERMISSIONS | MANAGE_WEBHOOKS) as dc:
        closed = await dc.add_channel("closed", bot_denied=MANAGE_WEBHOOKS)
        async with running(dc, make_client()) as client:
            general, other = client.get_channel(dc.channel_id), client.get_channel(closed)
            assert general.permissions_for(general.guild.me).manage_webhooks
            assert not other.permissions_for(other.guild.me).manage_webhooks
            with pytest.raises(discord.Forbidden):
                await other.create_webhook(name="rolebot")
            with pytest.raises(discord.HTTPException):
                await general.create_webhook(name="Discord bot")  # Discord refuses such names

            hook = await general.create_webhook(name="rolebot")
            assert [(h.id, h.token, h.user.id) for h in await general.webhooks()] == [(hook.id, hook.token, client.user.id)]
            posted = await hook.send("臣妾在", username="华妃", avatar_url="https://example.org/hua.png", wait=True)
            assert posted.author.bot and posted.author.name == "华妃" and posted.webhook_id == hook.id
            with pytest.raises(discord.Forbidden):  # the bot's own route: not its message
                await general.get_partial_message(posted.id).edit(content="x")
            edited = await posted.edit(content="臣妾在此")
            await edited.add_reaction("👍")
            sent = dc.sent_messages[-1]
            assert (sent.webhook_id, sent.username, sent.avatar_url, sent.content) == (
                hook.id, "华妃", "https://example.org/hua.png", "臣妾在此")
            assert dc.reactions[sent.id] == {"👍": {client.user.id}}
            await edited.delete()
            assert sent.deleted
