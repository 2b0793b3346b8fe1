"""Admission by measured capacity (issue 27, item 7): 50 clients for 60 s on 2 CPU cores had 22
of 111 requests admitted, started, and not finished within 120 s. The service now asks the
engine's forecast (``bot.engine.pace``, fed by every step the engine runs) whether a new reply
would be whole within [service] max_reply_s, and refuses at once with Retry-After if not."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from bot.config import load_config
from bot.engine.pace import AUTO_ROWS, Forecast, Pace, StepCost, Work, batch_rows, fit, play, retry_after
from bot.service import Answer, IncomingMessage, Reply, Service
from bot.store import Store
from training.errors import UserError

CONFIG = """
[model]
max_seq_length = 256

[character]
persona = "你是甄嬛。"

[generation]
max_new_tokens = 8
temperature = 0.0

[console]
enabled = false

[service]
rate_limit_per_minute = 1000
"""


def steady(pace: Pace, fixed: float, per_row: float, per_token: float = 0.0, steps: int = 128) -> None:
    """``steps`` measured steps of a machine whose step costs ``fixed + per_row * rows`` (plus
    ``per_token`` for each prompt token in it), at every batch size up to the pace's rows."""
    for i in range(steps):
        rows = 1 + i % pace.rows
        prefill = 64 if i % 5 == 0 else 0
        pace.record(fixed + per_row * rows + per_token * prefill, rows, rows + prefill)


def long_replies(pace: Pace, limit: int) -> None:
    """Every recent reply ran to its limit."""
    for _ in range(64):
        pace.note_reply(limit, limit)


# The forecast, from measured steps.


def test_the_step_cost_is_fitted_to_the_measured_steps():
    pace = Pace(rows=8)
    steady(pace, fixed=0.1, per_row=0.05, per_token=0.002)
    cost = pace.cost()
    assert cost.fixed == pytest.approx(0.1) and cost.per_row == pytest.approx(0.05)
    assert cost.per_token == pytest.approx(0.002)


def test_a_forecast_plays_the_batch_forward_row_by_row():
    cost = StepCost(fixed=0.1, per_row=0.05, per_token=0.001)
    # Two rows, both taken by replies with 10 tokens left: the new one (100 prompt tokens) waits
    # for a row (10 steps of 0.2 s), prefills (0.1 s), then decodes alone (10 steps of 0.15 s).
    forecast = play(cost, 2, [Work(10), Work(10)], Work(10, 100))
    assert forecast.first_token_s == pytest.approx(2.0 + 0.1 + 0.15)
    assert forecast.finish_s == pytest.approx(2.0 + 0.1 + 1.5)
    # With a free row it joins at once and shares every step with the one ahead.
    forecast = play(cost, 2, [Work(4)], Work(10))
    assert forecast.finish_s == pytest.approx(4 * 0.2 + 6 * 0.15)


def test_what_the_steps_cannot_tell_apart_is_taken_the_costly_way():
    # Only single-row steps seen (the engine's warm-up): a step costs in proportion to its rows,
    # and a prompt token what a row does.
    cost = fit([(0.3, 1, 0)] * 4)
    assert (cost.fixed, cost.per_row, cost.per_token) == (0.0, pytest.approx(0.3), pytest.approx(0.3))
    assert cost.step_s(8) == pytest.approx(2.4)


def test_a_cold_start_and_an_idle_engine_admit():
    pace = Pace(rows=8)
    assert pace.forecast([Work(128)], Work(128)) is None  # nothing measured yet: admit
    steady(pace, fixed=10.0, per_row=10.0)  # a very slow machine...
    assert pace.forecast([], Work(128)) is None  # ...with nothing in flight still takes a request
    assert pace.forecast([Work(128)], Work(128)).finish_s > 120


def test_replies_ahead_are_planned_at_the_recent_lengths_and_the_new_one_at_its_limit():
    pace = Pace(rows=8)
    assert pace.left(128) == 128 and pace.left(128, generated=100) == 28  # no lengths known yet
    for tokens in [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]:
        pace.note_reply(tokens, 128)
    assert pace.left(128) == 100  # the 90th percentile of what ended
    assert pace.left(128, generated=15) == 100 - 15  # of those longer than it is so far
    assert pace.left(128, generated=60) == 128 - 60  # too few ran that long to say
    assert pace.left(64) == 64  # within its own limit
    long_replies(pace, 128)  # replies that ran to their limit would have gone on
    assert pace.left(128) == 128
    steady(pace, fixed=0.0, per_row=1.0)
    # The new reply is planned at its whole limit: 100 tokens alone after the 20 ahead.
    assert pace.forecast([Work(pace.left(20))], Work(100)).finish_s == pytest.approx(20 * 2 + 80 * 1)


def test_retry_after_is_what_the_batch_must_work_off_first():
    assert retry_after(Forecast(first_token_s=5, finish_s=150.2), 120, 60) == 31
    assert retry_after(Forecast(first_token_s=80, finish_s=100), 120, 60) == 20
    assert retry_after(Forecast(first_token_s=1, finish_s=10_000), 120, 60) == 120


def test_the_auto_batch_size_is_32_on_cuda_and_the_measured_choice_on_a_cpu():
    assert batch_rows(0, "cuda") == 32 and batch_rows(0, "cpu") == AUTO_ROWS["cpu"] == 16
    assert batch_rows(5, "cpu") == batch_rows(5, "cuda") == 5  # a configured value stays


@pytest.mark.parametrize(("toml", "message"), [
    ("[service]\nmax_reply_s = -1\n", "bad.toml:2: [service] max_reply_s: expected a number from 0.0 to 3600.0, got -1.0"),
    ('[service]\nmax_reply_s = "2m"\n', "bad.toml:2: [service] max_reply_s: expected a number from 0.0 to 3600.0, got '2m'"),
    ("[generation]\nmax_batch_size = -1\n", "bad.toml:2: [generation] max_batch_size: expected an integer from 0 to 1024, got -1"),
])
def test_bad_admission_settings_are_one_clear_line(tmp_path, toml, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_config(str(bad))
    assert message in str(caught.value) and "\n" not in str(caught.value)


# The service over the real engine (builtin model).


@pytest.fixture(scope="module")
def project(tmp_path_factory, builtin_path):
    root = tmp_path_factory.mktemp("admission")
    (root / "config.toml").write_text(CONFIG, encoding="utf-8")
    return root


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(project):
    from bot.engine import make_engine

    engine = make_engine(load_config(str(project / "config.toml")), None)
    await engine.start()
    yield engine
    await engine.close()


@pytest_asyncio.fixture(loop_scope="module")
async def bot(project, engine, tmp_path):
    config = load_config(str(project / "config.toml"))
    config.store.path = str(tmp_path / "bot.db")
    async with Store.open(config.database) as store:
        service = Service(config, store, engine)
        yield service
        await service.close()


async def burst(service: Service, n: int) -> list[Reply | Answer]:
    """``n`` users write at the same moment (as a flood of web clients does)."""
    return list(await asyncio.gather(*(service.handle(IncomingMessage("web", f"c{i}", f"u{i}", f"第{i}位客人"))
                                       for i in range(n))))


def logged(service: Service) -> int:
    import sqlite3

    with sqlite3.connect(service.config.database) as conn:
        return conn.execute("SELECT COUNT(*) FROM messages WHERE role = 'user'").fetchone()[0]


ASYNC = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.slow
@ASYNC
async def test_the_auto_batch_size_on_this_cpu_is_the_measured_one(engine, bot):
    assert engine.max_batch_size == AUTO_ROWS["cpu"] and bot.capacity == AUTO_ROWS["cpu"] + 16
    assert f"up to {AUTO_ROWS['cpu']} rows" in engine.status().batching


@pytest.mark.slow
@ASYNC
async def test_the_engine_times_every_step_it_runs(engine, bot):
    before = engine.pace.measured
    [reply] = await burst(bot, 1)
    result = await reply.result()
    # A prefill step, then one step per token after the first.
    assert engine.pace.measured - before >= max(1, result.completion_tokens)
    assert engine.pace.cost().step_s(1) > 0


@pytest.mark.slow
@ASYNC
async def test_without_capacity_admission_replies_that_cannot_finish_are_admitted(engine, bot):
    """The problem as it was: on a machine whose steps take seconds, the queue's limit lets in
    replies that the forecast itself says are not whole within two minutes."""
    bot.config.service.max_reply_s = 0  # off: only the row and queue limits
    steady(engine.pace, fixed=0.5, per_row=2.0, per_token=0.001)
    long_replies(engine.pace, 8)
    late = engine.forecast(8, [8] * 9)
    out = await burst(bot, 10)
    assert all(isinstance(o, Reply) for o in out)  # all ten admitted...
    assert late.finish_s > 120  # ...the tenth behind nine others though it cannot finish in time
    for reply in out:
        await reply.result()


@pytest.mark.slow
@ASYNC
async def test_replies_that_cannot_finish_in_time_are_refused_at_once_with_retry_after(engine, bot):
    """The same burst with admission by capacity: each admitted reply's forecast is within
    max_reply_s; the rest hear 'busy' before anything is logged, with a Retry-After."""
    assert bot.config.service.max_reply_s == 120
    steady(engine.pace, fixed=0.5, per_row=2.0, per_token=0.001)  # 8 tokens at k rows: 8 × (0.5 + 2k) s
    long_replies(engine.pace, 8)
    out = await burst(bot, 10)
    admitted = [o for o in out if isinstance(o, Reply)]
    refused = [o for o in out if isinstance(o, Answer)]
    # 8 × (0.5 + 2 × 7) = 116 s (and a prefill of ~0.05 s each): seven fit; the eighth takes 132 s.
    assert len(admitted) == 7 and len(refused) == 3
    for answer in refused:
        assert answer.kind == "busy" and "甄嬛" in answer.text and answer.retry_after >= 1
    assert logged(bot) == 7  # a refused message is not logged
    results = [await reply.result() for reply in admitted]
    assert all(r.status == "complete" and r.text for r in results)


@pytest.mark.slow
@ASYNC
async def test_an_idle_engine_admits_however_slow_its_last_steps_were(engine, bot):
    steady(engine.pace, fixed=100.0, per_row=100.0)  # a forecast of hours
    [reply] = await burst(bot, 1)
    assert isinstance(reply, Reply) and (await reply.result()).status == "complete"
