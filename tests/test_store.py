"""The SQLite store driven the way the service and the trainer drive it, checked row by row."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
import pytest_asyncio

from bot.store import MIGRATIONS, AlternativeError, Message, RatingError, ReplyCost, Store
from training import logs
from training.errors import UserError

STATS = ReplyCost(latency_ms=420.0, first_token_ms=80.0, prompt_tokens=120, completion_tokens=24)
SAMPLING = {"temperature": 0.7, "top_p": 0.9}


@pytest_asyncio.fixture
async def store(tmp_path):
    async with Store.open(tmp_path / "rolebot.db") as store:
        yield store


async def exchange(
    store: Store, text: str, *, user: str = "alice", chat: str = "c1", answer: str = "臣妾在。"
) -> tuple[Message, Message]:
    """One user message and the bot's completed reply, as the service logs them."""
    asked = await store.add_user_message(
        "telegram", chat, user, text, display_name=user.title(), platform_message_id=f"{text}-in"
    )
    reply = await store.start_reply(
        asked.id, adapter_version="v1", prompt=f"<persona>\n{text}\n", sampling=SAMPLING
    )
    reply = await store.finish_reply(
        reply.id, answer, STATS, platform_message_ids=[f"{text}-out"]
    )
    return asked, reply


def rows(path, sql, params=()):
    """What any other process would see: a fresh connection, so only committed rows."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_migrations_reach_the_version_training_reads():
    assert len(MIGRATIONS) == logs.SCHEMA_VERSION


@pytest.mark.asyncio
async def test_fresh_database_is_migrated_in_wal_mode_and_reopens(tmp_path):
    path = tmp_path / "data" / "rolebot.db"
    async with Store.open(path) as store:
        await exchange(store, "嬛嬛")

    assert rows(path, "PRAGMA user_version") == [(logs.SCHEMA_VERSION,)]
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in rows(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "conversations", "messages", "message_platform_ids", "ratings",
            "adapter_versions", "adapter_activations", "training_runs"} <= tables

    store = await Store.open(path)
    try:
        assert (await store.counts()).messages == 2
        assert rows(path, "PRAGMA user_version") == [(logs.SCHEMA_VERSION,)]
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_foreign_keys_are_enforced(store):
    with pytest.raises(LookupError):
        await store.start_reply(999, adapter_version="v1", prompt="p", sampling={})
    with pytest.raises(sqlite3.IntegrityError):
        await store.link_platform_messages(999, ["x"])


@pytest.mark.asyncio
async def test_fifty_concurrent_writers_are_all_committed(store):
    messages = await asyncio.gather(
        *(store.add_user_message("discord", "general", f"user{i}", f"hello {i}") for i in range(50))
    )

    assert len({m.id for m in messages}) == 50
    assert len({m.conversation_id for m in messages}) == 1
    assert rows(store.path, "SELECT COUNT(*) FROM messages") == [(50,)]
    assert rows(store.path, "SELECT COUNT(*) FROM users") == [(50,)]


@pytest.mark.asyncio
async def test_a_write_cancelled_at_any_point_leaves_the_store_usable(store):
    for steps in range(12):
        task = asyncio.create_task(store.add_user_message("discord", "general", "bob", "hi"))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    message = await store.add_user_message("discord", "general", "bob", "still here")
    assert (await store.message(message.id)).text == "still here"
    # Whatever committed did so whole: every message has its user and conversation.
    assert rows(store.path, "SELECT COUNT(*) FROM messages WHERE user_id IS NULL") == [(0,)]


@pytest.mark.asyncio
async def test_the_history_window_moves_in_steps_so_prompts_begin_alike(store):
    said = []
    for i in range(7):  # 14 messages
        asked, _ = await exchange(store, f"q{i}", answer=f"a{i}")
        said += [f"q{i}", f"a{i}"]
    conversation = asked.conversation_id
    texts = lambda rows: [m.text for m in rows]  # noqa: E731
    # A sliding window: the last 8.
    assert texts(await store.recent_history(conversation, 8)) == said[-8:]
    # In steps of 4: of 14, from the 8th (the first multiple of 4 that leaves at most 8).
    assert texts(await store.recent_history(conversation, 8, step=4)) == said[8:]
    # Before message q6 (12 said): from the 4th, 8 of them; two more keep the same start.
    assert texts(await store.recent_history(conversation, 8, step=4, before=asked.id)) == said[4:12]
    assert texts(await store.recent_history(conversation, 8, step=4, before=asked.id, ahead=2)) == said[8:12]
    # A step longer than the window is the window: never an empty history.
    assert texts(await store.recent_history(conversation, 4, step=9)) == said[12:]
    assert await store.recent_history(conversation, 0, step=4) == []


@pytest.mark.asyncio
async def test_conversation_history_and_reset(store):
    await exchange(store, "first", answer="one")
    asked, reply = await exchange(store, "second", answer="two")
    before = await store.current_conversation("telegram", "c1")
    assert before.id == asked.conversation_id

    history = await store.recent_history(before.id, limit=3)
    assert [(m.role, m.text) for m in history] == [
        ("assistant", "one"), ("user", "second"), ("assistant", "two")
    ]
    assert reply.reply_to == asked.id and reply.adapter_version == "v1"

    after = await store.new_conversation("telegram", "c1")
    assert after.id != before.id
    assert await store.current_conversation("telegram", "c1") == after
    assert await store.recent_history(after.id, limit=10) == []
    assert (await store.current_conversation("telegram", "other-chat")).id not in (before.id, after.id)


@pytest.mark.asyncio
async def test_reply_stores_prompt_sampling_and_stats_for_retraining(store):
    _, reply = await exchange(store, "嬛嬛")

    assert rows(
        store.path,
        "SELECT status, prompt, sampling, latency_ms, first_token_ms, prompt_tokens, "
        "completion_tokens FROM messages WHERE id = ?",
        (reply.id,),
    ) == [("complete", "<persona>\n嬛嬛\n", '{"temperature": 0.7, "top_p": 0.9}', 420.0, 80.0,
           120, 24)]


@pytest.mark.asyncio
async def test_reactions_find_a_split_reply_by_any_of_its_platform_messages(store):
    asked = await store.add_user_message("discord", "chan", "bob", "tell me a story",
                                         platform_message_id="100")
    reply = await store.start_reply(asked.id, adapter_version="v1", prompt="p", sampling={})
    await store.link_platform_messages(reply.id, ["101"])
    await store.finish_reply(reply.id, "long story", STATS, platform_message_ids=["101", "102"])

    found = await store.message_by_platform_id("discord", "chan", "102")
    assert found.id == reply.id and found.platform_message_ids == ("101", "102")
    assert (await store.message_by_platform_id("discord", "chan", "100")).id == asked.id
    assert await store.message_by_platform_id("discord", "other-chan", "102") is None


@pytest.mark.asyncio
async def test_rating_is_upserted_changed_and_removed(store):
    _, reply = await exchange(store, "嬛嬛")

    await store.rate(reply.id, "telegram", "bob", 1)
    await store.rate(reply.id, "telegram", "bob", 1)
    assert [r.value for r in await store.ratings(reply.id)] == [1]

    await store.rate(reply.id, "telegram", "bob", -1)
    assert rows(store.path, "SELECT value FROM ratings") == [(-1,)]

    # The 👍 reaction going away must not remove the 👎 that replaced it.
    assert await store.unrate(reply.id, "telegram", "bob", 1) is False
    assert await store.unrate(reply.id, "telegram", "bob", -1) is True
    assert await store.ratings(reply.id) == []
    assert await store.unrate(reply.id, "telegram", "bob") is False


@pytest.mark.asyncio
async def test_bad_ratings_are_refused_with_a_user_error(store):
    asked, reply = await exchange(store, "嬛嬛")

    with pytest.raises(RatingError, match="not in the log"):
        await store.rate(12345, "telegram", "bob", 1)
    with pytest.raises(RatingError, match="only the bot's replies"):
        await store.rate(asked.id, "telegram", "bob", 1)
    for value in (0, 2, -2):
        with pytest.raises(UserError, match="use \\+1 or -1"):
            await store.rate(reply.id, "telegram", "bob", value)
    assert rows(store.path, "SELECT COUNT(*) FROM ratings") == [(0,)]


@pytest.mark.asyncio
async def test_forget_deletes_the_users_messages_replies_and_ratings(store):
    _, alice_reply = await exchange(store, "alice asks", user="alice")
    _, bob_reply = await exchange(store, "bob asks", user="bob")
    await store.rate(alice_reply.id, "telegram", "alice", 1)
    await store.rate(alice_reply.id, "telegram", "bob", 1)
    await store.rate(bob_reply.id, "telegram", "alice", -1)
    await store.rate(bob_reply.id, "telegram", "bob", 1)

    result = await store.forget_user("telegram", "alice")

    assert (result.messages, result.replies, result.ratings) == (1, 1, 3)
    assert rows(store.path, "SELECT text FROM messages ORDER BY id") == [("bob asks",), ("臣妾在。",)]
    assert rows(store.path, "SELECT value FROM ratings") == [(1,)]
    assert rows(store.path, "SELECT COUNT(*) FROM message_platform_ids") == [(2,)]
    alice = await store.user("telegram", "alice")
    assert alice.forgotten_at is not None and alice.display_name == ""
    assert await store.forget_user("telegram", "nobody") == type(result)(0, 0, 0)


@pytest.mark.asyncio
async def test_training_never_sees_a_forgotten_user_even_after_they_return(store):
    await exchange(store, "before forgetting", user="alice")
    await store.forget_user("telegram", "alice")
    _, reply = await exchange(store, "alice again", user="alice")
    await store.rate(reply.id, "telegram", "bob", 1)
    _, bob_reply = await exchange(store, "bob asks", user="bob")
    await store.rate(bob_reply.id, "telegram", "alice", 1)

    assert logs.rated_replies(store.path) == []
    with logs.open_snapshot(store.path) as snapshot:
        assert snapshot.ratings_since(0) == 0 == await store.ratings_since(0)


@pytest.mark.asyncio
async def test_reply_forgotten_while_streaming_finishes_quietly(store):
    asked = await store.add_user_message("telegram", "c1", "alice", "hi")
    reply = await store.start_reply(asked.id, adapter_version="v1", prompt="p", sampling={})
    await store.forget_user("telegram", "alice")

    assert await store.finish_reply(reply.id, "too late", STATS) is None


@pytest.mark.asyncio
async def test_replies_cut_off_by_a_restart_are_marked_interrupted(tmp_path):
    path = tmp_path / "rolebot.db"
    async with Store.open(path) as store:
        asked = await store.add_user_message("telegram", "c1", "alice", "hi")
        reply = await store.start_reply(asked.id, adapter_version="v1", prompt="p", sampling={})
        assert reply.status == "generating"
        assert await store.recent_history(asked.conversation_id, 10) == [asked]

    async with Store.open(path) as store:
        assert await store.mark_unfinished_interrupted() == 1
        assert (await store.message(reply.id)).status == "interrupted"
        # A late finish from the old process does not overwrite the mark.
        late = await store.finish_reply(reply.id, "partial", STATS)
        assert late.status == "interrupted"
        assert await store.mark_unfinished_interrupted() == 0


@pytest.mark.asyncio
async def test_training_snapshot_ignores_writes_made_after_it_started(store):
    _, first = await exchange(store, "first", answer="一")
    _, second = await exchange(store, "second", answer="二")
    await store.rate(first.id, "telegram", "bob", 1)
    await store.rate(first.id, "telegram", "carol", -1)
    await store.rate(first.id, "telegram", "dave", 1)
    before = time.time()

    with logs.open_snapshot(store.path) as snapshot:
        await store.rate(second.id, "telegram", "bob", 1)
        await store.rate(first.id, "telegram", "carol", 1)

        assert snapshot.ratings_since(before) == 0
        [seen] = snapshot.rated_replies()

    assert (seen.message_id, seen.text, seen.user_text) == (first.id, "一", "first")
    assert (seen.prompt, seen.adapter_version) == ("<persona>\nfirst\n", "v1")
    assert (seen.score, seen.ups, seen.downs) == (1, 2, 1)
    assert [(r.text, r.score) for r in logs.rated_replies(store.path)] == [("一", 3), ("二", 1)]
    with logs.open_snapshot(store.path) as snapshot:
        assert snapshot.ratings_since(before) == 2 == await store.ratings_since(before)


@pytest.mark.asyncio
async def test_database_from_a_newer_rolebot_is_refused(tmp_path):
    path = tmp_path / "rolebot.db"
    async with Store.open(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {logs.SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(UserError, match="newer than this rolebot"):
        await Store.open(path)
    with pytest.raises(UserError, match="newer than this rolebot"):
        logs.rated_replies(path)


def test_training_reports_a_missing_or_unmigrated_database(tmp_path):
    with pytest.raises(UserError, match="no chat log database"):
        logs.rated_replies(tmp_path / "missing.db")
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(UserError, match="older than this rolebot"):
        logs.rated_replies(tmp_path / "empty.db")


@pytest.mark.asyncio
async def test_adapter_activations_are_logged_as_events(store):
    for version in ("v1", "v2", "v3"):
        await store.log_activation("甄嬛", version, {"loss": 1.0})
    await store.log_activation("甄嬛", "v3", {"loss": 1.0})  # served again after a restart: no new event
    await store.log_activation("甄嬛", "v2", {"loss": 1.0})  # a rollback is one more event

    assert [a.version for a in await store.activations("甄嬛")] == ["v1", "v2", "v3", "v2"]
    assert await store.activations("嬛嬛") == []


@pytest.mark.asyncio
async def test_training_runs_one_at_a_time_and_status_counts(store):
    assert await store.last_run() is None
    run = await store.start_run("admin", requested_by="telegram:alice")
    with pytest.raises(UserError, match="still running"):
        await store.start_run("schedule")
    finished = await store.finish_run(
        run.id, "succeeded", candidate_version="v2", metrics={"eval_loss": 1.2}
    )
    assert (finished.status, finished.metrics, finished.finished_at is not None) == (
        "succeeded", {"eval_loss": 1.2}, True
    )

    stale = await store.start_run("schedule")  # this process's own: stale to a bot starting up
    assert await store.fail_unfinished_runs() == 1
    assert (await store.last_run()).id == stale.id
    assert (await store.last_run("succeeded")).id == run.id

    _, reply = await exchange(store, "嬛嬛")
    await store.rate(reply.id, "telegram", "bob", 1)
    counts = await store.counts()
    assert (counts.users, counts.messages, counts.replies, counts.ratings) == (2, 2, 1, 1)
    assert await store.ratings_since(run.started_at) == 1


RUN_IN_ANOTHER_PROCESS = """
import asyncio, sys
from bot.store import Store

async def main():
    async with Store.open(sys.argv[1]) as store:
        run = await store.start_run("cli", requested_by="cli")
        print(run.id, flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_a_bot_starting_up_leaves_a_live_rolebot_retrain_running(tmp_path):
    """`rolebot retrain` from cron may be running when the bot starts: its run is not failed
    under it (and still blocks a second run); once its process is gone, it is."""
    import subprocess
    import sys

    path = tmp_path / "rolebot.db"
    async with Store.open(path):
        pass
    child = subprocess.Popen([sys.executable, "-c", RUN_IN_ANOTHER_PROCESS, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        run_id = int(child.stdout.readline())
        async with Store.open(path) as store:
            assert await store.fail_unfinished_runs() == 0
            assert (await store.last_run()).status == "running"
            with pytest.raises(UserError, match=f"training run {run_id} .*still running"):
                await store.start_run("admin")
            child.kill()
            child.wait()
            assert await store.fail_unfinished_runs() == 1
            assert (await store.last_run()).status == "failed"
            assert (await store.start_run("admin")).id == run_id + 1
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.asyncio
async def test_a_run_from_before_owners_were_recorded_counts_as_stale(store):
    run = await store.start_run("schedule")
    async with store._transaction() as conn:
        await conn.execute("UPDATE training_runs SET owner = NULL WHERE id = ?", (run.id,))
    assert await store.fail_unfinished_runs() == 1


async def regenerate(store: Store, asked: Message, answer: str, *, status="complete") -> Message:
    """Another reply to the same user message, as the service logs a 🔄 / /retry."""
    reply = await store.start_reply(
        asked.id, adapter_version="v2", prompt=f"<persona>\n{asked.text}\n",
        sampling={"temperature": 0.9, "top_p": 0.9},
    )
    return await store.finish_reply(reply.id, answer, STATS, status=status)


@pytest.mark.asyncio
async def test_regenerated_replies_are_alternatives_and_the_next_prompt_uses_the_kept_one(store):
    asked, first = await exchange(store, "你可还好？", answer="一")
    second = await regenerate(store, asked, "二")
    third = await regenerate(store, asked, "三")

    alternatives = await store.alternatives(asked.id)
    assert [m.text for m in alternatives] == ["一", "二", "三"]
    assert [m.adapter_version for m in alternatives] == ["v1", "v2", "v2"]
    assert rows(store.path, "SELECT sampling FROM messages WHERE id = ?", (third.id,)) == [
        ('{"temperature": 0.9, "top_p": 0.9}',)]
    # By default the last one shown is kept: the swiped-away ones are not in the history.
    assert (await store.kept_reply(asked.id)).id == third.id
    history = await store.recent_history(asked.conversation_id, limit=10)
    assert [m.text for m in history] == ["你可还好？", "三"]

    # The user goes back to the second one (◀ on the web page); the next turn sees it.
    kept = await store.keep_alternative(asked.id, second.id)
    assert kept.id == second.id and (await store.kept_reply(asked.id)).id == second.id
    assert rows(store.path, "SELECT kept_reply FROM messages WHERE id = ?", (asked.id,)) == [(second.id,)]
    later, _ = await exchange(store, "那便好", answer="嗯")
    history = await store.recent_history(asked.conversation_id, limit=10)
    assert [m.text for m in history] == ["你可还好？", "二", "那便好", "嗯"]
    assert [m.text for m in await store.recent_history(asked.conversation_id, limit=3)] == ["二", "那便好", "嗯"]
    assert (await store.last_user_message(asked.conversation_id)).id == later.id
    assert first.id not in {m.id for m in history}

    # A new regenerate replaces what is shown: the latest is kept again.
    fourth = await regenerate(store, asked, "四")
    assert (await store.kept_reply(asked.id)).id == fourth.id


@pytest.mark.asyncio
async def test_only_a_shown_sibling_can_be_kept(store):
    asked, reply = await exchange(store, "嬛嬛")
    other, other_reply = await exchange(store, "槿汐", user="bob", chat="c2")
    generating = await store.start_reply(asked.id, adapter_version="v1", prompt="p", sampling={})

    with pytest.raises(AlternativeError, match=f"message {other_reply.id} is not a reply to message {asked.id}"):
        await store.keep_alternative(asked.id, other_reply.id)
    with pytest.raises(AlternativeError, match="is not a reply"):
        await store.keep_alternative(asked.id, asked.id)  # the user message itself
    with pytest.raises(AlternativeError, match="is not a reply"):
        await store.keep_alternative(asked.id, 99999)
    with pytest.raises(AlternativeError, match=f"reply {generating.id} is generating"):
        await store.keep_alternative(asked.id, generating.id)
    assert rows(store.path, "SELECT kept_reply FROM messages WHERE id = ?", (asked.id,)) == [(None,)]
    # While the new one streams, history leaves the turn's reply out rather than show a swiped one.
    assert [m.text for m in await store.recent_history(asked.conversation_id, 10)] == ["嬛嬛"]
    await store.finish_reply(generating.id, "", STATS, status="interrupted")  # stopped at once
    with pytest.raises(AlternativeError, match=f"reply {generating.id} is interrupted with no text"):
        await store.keep_alternative(asked.id, generating.id)
    await store.keep_alternative(asked.id, reply.id)
    assert [m.text for m in await store.recent_history(asked.conversation_id, 10)] == ["嬛嬛", "臣妾在。"]
    assert await store.last_user_message(12345) is None
    assert await store.kept_reply(other.id) == other_reply
    unanswered = await store.add_user_message("telegram", "c3", "carol", "在吗？")
    assert await store.kept_reply(unanswered.id) is None and await store.alternatives(unanswered.id) == []
    assert (await store.last_user_message(unanswered.conversation_id)).id == unanswered.id


@pytest.mark.asyncio
async def test_forget_removes_every_alternative_and_their_ratings(store):
    asked, first = await exchange(store, "alice asks", user="alice")
    second = await regenerate(store, asked, "again")
    await store.keep_alternative(asked.id, first.id)
    await store.rate(second.id, "telegram", "bob", 1)
    await store.rate(first.id, "telegram", "alice", -1)
    _, bob_reply = await exchange(store, "bob asks", user="bob")

    result = await store.forget_user("telegram", "alice")

    assert (result.messages, result.replies, result.ratings) == (1, 2, 2)
    assert rows(store.path, "SELECT id FROM messages WHERE role = 'assistant'") == [(bob_reply.id,)]
    assert await store.alternatives(asked.id) == []
    with logs.open_snapshot(store.path) as snapshot:
        assert snapshot.preference_pairs() == []


@pytest.mark.asyncio
async def test_a_greeting_opens_a_new_conversation_once(store):
    greeting = await store.greet("web", "c1", "嬛嬛给您请安。")
    assert (greeting.role, greeting.reply_to, greeting.text) == ("assistant", None, "嬛嬛给您请安。")
    assert await store.greet("web", "c1", "again") is None
    asked = await store.add_user_message("web", "c1", "alice", "起来吧")
    assert [m.text for m in await store.recent_history(asked.conversation_id, 10)] == ["嬛嬛给您请安。", "起来吧"]
    await store.rate(greeting.id, "web", "alice", 1)
    assert logs.rated_replies(store.path) == []  # no prompt: nothing to train on
    await store.new_conversation("web", "c1")
    assert (await store.greet("web", "c1", "嬛嬛给您请安。")).conversation_id != asked.conversation_id


def schema_2_database(path) -> None:
    """A database as rolebot wrote it before alternatives: schema 2, a rated exchange in it."""
    conn = sqlite3.connect(path)
    with conn:
        for migration in MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 2")
        conn.execute("INSERT INTO users VALUES (1, 'telegram', 'alice', 'Alice', 1.0, NULL)")
        conn.execute("INSERT INTO users VALUES (2, 'telegram', 'bob', 'Bob', 1.0, NULL)")
        conn.execute("INSERT INTO conversations VALUES (1, 'telegram', 'c1', 1.0, NULL)")
        conn.execute("INSERT INTO messages (id, conversation_id, user_id, role, text, status, created_at) "
                     "VALUES (1, 1, 1, 'user', '嬛嬛', 'complete', 2.0)")
        conn.execute("INSERT INTO messages (id, conversation_id, role, text, status, created_at, reply_to, "
                     "adapter_version, prompt, sampling) VALUES (2, 1, 'assistant', '臣妾在。', 'complete', "
                     "3.0, 1, 'v1', '<persona>\n嬛嬛\n', '{}')")
        conn.execute("INSERT INTO ratings VALUES (2, 2, 1, 4.0)")
    conn.close()


@pytest.mark.asyncio
async def test_a_schema_2_database_with_data_migrates_to_alternatives(tmp_path):
    path = tmp_path / "old.db"
    schema_2_database(path)

    async with Store.open(path) as store:
        assert rows(path, "PRAGMA user_version") == [(logs.SCHEMA_VERSION,)]
        assert rows(path, "SELECT id, kept_reply FROM messages ORDER BY id") == [(1, None), (2, None)]
        assert [m.text for m in await store.recent_history(1, 10)] == ["嬛嬛", "臣妾在。"]
        [old] = await store.alternatives(1)
        regenerated = await regenerate(store, await store.message(1), "嬛嬛在此。")
        assert [m.id for m in await store.alternatives(1)] == [old.id, regenerated.id]
        await store.keep_alternative(1, old.id)
        assert [m.text for m in await store.recent_history(1, 10)] == ["嬛嬛", "臣妾在。"]
    [rated] = logs.rated_replies(path)
    assert (rated.message_id, rated.score) == (2, 1)


@pytest.mark.asyncio
async def test_alternatives_the_user_kept_or_rated_become_preference_pairs(store):
    # Swiped A away, went on from B: B over A.
    q1, a1 = await exchange(store, "q1", chat="c1", answer="a1")
    b1 = await regenerate(store, q1, "b1")
    await exchange(store, "went on", chat="c1")
    # 👍 against 👎 on the same message, nothing regenerated after.
    q2, a2 = await exchange(store, "q2", chat="c2", answer="a2")
    b2 = await regenerate(store, q2, "b2")
    await store.rate(a2.id, "telegram", "bob", 1)
    await store.rate(b2.id, "telegram", "bob", -1)
    # Went back to A (◀) and went on from it: A over B.
    q3, a3 = await exchange(store, "q3", chat="c3", answer="a3")
    b3 = await regenerate(store, q3, "b3")
    await store.keep_alternative(q3.id, a3.id)
    await exchange(store, "went on", chat="c3")
    # Two 👍 and one swiped away unrated: both 👍 over it, never one 👍 over the other.
    q4, a4 = await exchange(store, "q4", chat="c4", answer="a4")
    b4 = await regenerate(store, q4, "b4")
    c4 = await regenerate(store, q4, "c4")
    await store.keep_alternative(q4.id, b4.id)
    await store.rate(a4.id, "telegram", "carol", 1)
    await store.rate(b4.id, "telegram", "carol", 1)
    # Regenerated but neither kept (the conversation stops here) nor rated: no signal.
    q5, _ = await exchange(store, "q5", chat="c5", answer="a5")
    await regenerate(store, q5, "b5")
    # Went on from B although rating it 👎, A unrated: nothing was preferred.
    q6, a6 = await exchange(store, "q6", chat="c6", answer="a6")
    b6 = await regenerate(store, q6, "b6")
    await store.rate(b6.id, "telegram", "alice", -1)
    await exchange(store, "went on", chat="c6")
    # A single 👍 reply, an interrupted alternative and a 👍 from a forgotten rater pair with nothing.
    await exchange(store, "q7", chat="c7")
    q8, a8 = await exchange(store, "q8", chat="c8", answer="a8")
    await regenerate(store, q8, "b8 half", status="interrupted")
    q9, a9 = await exchange(store, "q9", chat="c9", answer="a9")
    await regenerate(store, q9, "b9")
    await store.rate(a9.id, "telegram", "mallory", 1)
    await store.forget_user("telegram", "mallory")
    # A persona changed between the two: not the same prompt, so no pair.
    q10, _ = await exchange(store, "q10", chat="c10", answer="a10")
    b10 = await store.start_reply(q10.id, adapter_version="v2", prompt="<new persona>\nq10\n", sampling={})
    await store.finish_reply(b10.id, "b10", STATS)
    await store.rate(b10.id, "telegram", "bob", 1)

    with logs.open_snapshot(store.path) as snapshot:
        pairs = snapshot.preference_pairs()

    assert [(p.user_message_id, p.chosen, p.rejected, p.reason) for p in pairs] == [
        (q1.id, "b1", "a1", "kept"),
        (q2.id, "a2", "b2", "rated"),
        (q3.id, "a3", "b3", "kept"),
        (q4.id, "a4", "c4", "rated"),
        (q4.id, "b4", "c4", "rated"),
    ]
    first = pairs[0]
    assert (first.chosen_id, first.rejected_id) == (b1.id, a1.id)
    assert (first.prompt, first.user_text) == ("<persona>\nq1\n", "q1")
    assert {a2.id, b2.id, a3.id, b3.id, c4.id} <= {p.chosen_id for p in pairs} | {p.rejected_id for p in pairs}
