"""The retrain cycle on the CPU: rated replies in SQLite → subprocess SFT → gate → promotion,
and every way it can refuse or fail without touching the active adapter."""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import pytest

from bot.config import load_config
from bot.datasets import dataset_files
from bot.retrain import Retrainer
from bot.scheduler import RetrainSchedule, make_trigger
from bot.store import ReplyCost, Store
from training.dataset import load_samples
from training.errors import UserError
from training.prompts import PromptStyle, Sample
from training.registry import Registry

pytestmark = pytest.mark.slow

TINY = """
[training]
batch_size = 1
grad_accum = 1
warmup_steps = 0
learning_rate = 1e-3
pack_length = 512

[retrain]
start_from = "base"
max_steps = 2
cpu_max_steps = 0  # these steps even without a GPU
hygiene_probes = 0  # the hygiene rule has its own test
nll_tolerance = 0.05
replay_ratio = 1.0

[scheduler]
min_new_ratings = 5

[generation]
max_new_tokens = 8
"""


def project(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "config.toml").write_text(TINY + extra, encoding="utf-8")
    return tmp_path / "config.toml"


async def log_rated_replies(store: Store, config, liked: int, disliked: int) -> None:
    """What the bot writes while people chat and rate: the prompt it used, the reply, votes."""
    style = PromptStyle(config.model.prompt_format, config.character.persona, config.character.name)
    pairs = load_samples(dataset_files(config, quiet=True).train)
    for i in range(liked + disliked):
        pair = pairs[i % len(pairs)]
        asked = await store.add_user_message("web", f"chat{i}", f"user{i}", pair.instruction)
        prompt = style.prompt(Sample(pair.instruction), None)
        reply = await store.start_reply(asked.id, adapter_version=None, prompt=prompt, sampling={})
        text = pair.output if i < liked else "我是一个AI助手，很高兴为您服务。"
        await store.finish_reply(reply.id, text, ReplyCost(completion_tokens=8))
        await store.rate(reply.id, "web", f"rater{i}", 1 if i < liked else -1)


async def test_a_cycle_trains_gates_and_promotes(tmp_path):
    config = load_config(str(project(tmp_path)))
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=8, disliked=2)
        retrainer = Retrainer(config, store)
        assert await retrainer.new_ratings() == 10
        run = await retrainer.request(trigger="admin", requested_by="web:admin")
        with pytest.raises(UserError, match="a retrain is already running"):
            await retrainer.request(trigger="admin", requested_by="web:other")
        done = await retrainer.wait()
        assert done.status == "succeeded", done.reason
        registry = Registry(config.adapter_root, "甄嬛")
        assert registry.active().name == done.candidate_version == "v0001"
        meta = registry.active().meta
        assert meta["gate"]["passed"] and meta["retrain"]["run_id"] == run.id
        assert meta["retrain"]["liked"] >= 6 and meta["retrain"]["replayed"] == meta["retrain"]["liked"]
        assert [a.version for a in await store.activations("甄嬛")] == ["v0001"]
        data = json.loads((tmp_path / "data/retrain" / f"run-{run.id}.json").read_text(encoding="utf-8"))
        rated = [r for r in data if r["source"] == "rated"]
        assert rated and all(r["prompt"].startswith(config.character.persona) for r in rated)
        assert not any("AI助手" in r["output"] for r in data), "a 👎 reply was trained on"
        status = await retrainer.status()
        assert status.new_ratings == 0 and status.last_run.status == "succeeded"
        assert (status.recipe, status.nice) == ("2 steps of 1 x 1 rows of 512 tokens", 10)


async def test_a_crash_in_training_keeps_the_old_version_and_records_the_failure(tmp_path):
    config = load_config(str(project(tmp_path)))
    registry = Registry(config.adapter_root, "甄嬛")
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=6, disliked=0)
        retrainer = Retrainer(config, store)
        await retrainer.request(trigger="admin", requested_by="web:admin")
        while retrainer.process is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert os.getpriority(os.PRIO_PROCESS, retrainer.process.pid) == 10  # [retrain] nice: serving keeps the CPU
        with pytest.raises(UserError, match="a retrain is running .* roll back after it ends"):
            await retrainer.adapters.rollback()
        await asyncio.sleep(3)
        retrainer.process.kill()  # what the OOM killer does
        done = await retrainer.wait()
        assert done.status == "failed" and "killed" in done.reason, done.reason
        assert registry.versions() == [] and registry.active() is None
        assert (await store.last_run()).status == "failed"


async def test_a_candidate_that_fails_the_gate_is_not_promoted(tmp_path):
    # A learning rate this high wrecks the model: held-out NLL explodes and the gate says no.
    config = load_config(str(project(tmp_path)))
    config.training.learning_rate = 0.5
    config.retrain.max_steps = 3
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=6, disliked=0)
        retrainer = Retrainer(config, store)
        await retrainer.request(trigger="admin")
        done = await retrainer.wait()
    assert done.status == "rejected", done.reason
    assert "not promoted" in done.reason and "held-out NLL" in done.reason
    registry = Registry(config.adapter_root, "甄嬛")
    assert registry.active() is None and registry.get("v0001").meta["gate"]["passed"] is False


async def test_the_threshold_holds_the_scheduled_job_back(tmp_path):
    config = load_config(str(project(tmp_path)))
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=3, disliked=0)
        retrainer = Retrainer(config, store)
        assert await retrainer.scheduled() is None
        assert await store.last_run() is None
        schedule = RetrainSchedule(config.scheduler, retrainer)
        schedule.start()
        try:
            status = await retrainer.status()
            assert status.next_run is not None and not status.running
        finally:
            schedule.stop()


def test_a_bad_cron_expression_is_one_clear_line():
    from bot.config import SchedulerSettings

    with pytest.raises(UserError, match=r"\[scheduler\] cron: 'every day' is not a crontab expression"):
        make_trigger(SchedulerSettings(cron="every day"))
    assert "cron" in type(make_trigger(SchedulerSettings(cron="0 4 * * *"))).__name__.lower()


async def test_a_kto_stage_follows_sft_when_configured(tmp_path):
    (tmp_path / "config.toml").write_text(TINY.replace('replay_ratio = 1.0', 'replay_ratio = 1.0\npreference = "kto"'), encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=6, disliked=3)
        retrainer = Retrainer(config, store)
        await retrainer.request(trigger="admin")
        done = await retrainer.wait()
    registry = Registry(config.adapter_root, "甄嬛")
    kto = registry.get("v0002")
    assert kto.parent == "v0001" and kto.meta["stage"] == "kto"
    assert kto.meta["kto"]["undesirable"] >= 1 and kto.meta["steps"] == 2
    assert all(math.isfinite(loss) for _, loss in kto.meta["losses"]), kto.meta["losses"]
    assert done.candidate_version == "v0002" and "gate" in kto.meta, done.reason


def test_without_a_gpu_the_shipped_retrain_is_the_quick_cpu_recipe(tmp_path):
    """The full recipe (60 steps of 2 x 4 rows of 3,072 tokens) takes hours on 2 cores; a
    retrain on the CPU trains [retrain] cpu_max_steps single 512-token rows instead."""
    import torch

    from bot.retrain import recipe_text, retrain_settings

    config = load_config(None)
    settings = retrain_settings(config)
    if torch.cuda.is_available():
        assert settings.max_steps == config.retrain.max_steps == 60
    else:
        assert (settings.max_steps, settings.batch_size, settings.grad_accum, settings.pack_length) == (24, 1, 1, 512)
        assert recipe_text(config) == "24 steps of 1 x 1 rows of 512 tokens"
    config.retrain.cpu_max_steps = 0
    assert retrain_settings(config).max_steps == 60


async def log_regenerated(store: Store, config, count: int) -> None:
    """Users who swiped an out-of-character reply away and went on from the regenerated one."""
    style = PromptStyle(config.model.prompt_format, config.character.persona, config.character.name)
    pairs = load_samples(dataset_files(config, quiet=True).train)
    for i in range(count):
        pair = pairs[-1 - i]
        asked = await store.add_user_message("web", f"swipes{i}", f"swiper{i}", pair.instruction)
        prompt = style.prompt(Sample(pair.instruction), None)
        for text in ("我是一个AI助手，很高兴为您服务。", pair.output):
            reply = await store.start_reply(asked.id, adapter_version=None, prompt=prompt, sampling={})
            await store.finish_reply(reply.id, text, ReplyCost(completion_tokens=8))
        await store.add_user_message("web", f"swipes{i}", f"swiper{i}", "嗯。")


async def test_a_dpo_stage_trains_on_kept_alternatives_and_is_gated(tmp_path):
    from bot.status import data_text

    (tmp_path / "config.toml").write_text(TINY.replace('replay_ratio = 1.0', 'replay_ratio = 1.0\npreference = "dpo"'), encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=6, disliked=0)
        await log_regenerated(store, config, 3)
        retrainer = Retrainer(config, store)
        told: list[str] = []

        async def notify(text: str) -> None:
            told.append(text)

        await retrainer.request(trigger="admin", notify=notify)
        done = await retrainer.wait()
    registry = Registry(config.adapter_root, "甄嬛")
    dpo = registry.get("v0002")
    assert dpo.parent == "v0001" and dpo.meta["stage"] == "dpo"
    assert dpo.meta["dpo"]["pairs"] == dpo.meta["dpo"]["kept"] == 3 and dpo.meta["steps"] == 2
    assert dpo.meta["dpo"]["reference"] == "parent"  # DPO measured against the SFT candidate:
    assert abs(dpo.meta["losses"][0][1] - math.log(2)) < 1e-3  # at the first step policy = reference
    assert all(math.isfinite(loss) for _, loss in dpo.meta["losses"]), dpo.meta["losses"]
    assert not (dpo.path / "ref").exists(), "the frozen reference adapter was saved with the version"
    assert done.candidate_version == "v0002" and "gate" in dpo.meta, done.reason
    assert done.status == "succeeded" and "held-out NLL" in done.reason, done.reason
    assert registry.active().name == "v0002"
    assert done.metrics["pairs"] == 3 and registry.get("v0001").meta["retrain"]["pairs"] == 3
    # Of the 6 👍 the newest is held out for the gate.
    assert data_text(done.metrics) == "5 👍 replies, 0 👎, 5 script pairs replayed, 3 preference pairs"
    assert told and told[0].endswith("(trained on 5 👍 replies, 0 👎, 5 script pairs replayed, 3 preference pairs)")


async def test_the_retrain_data_counts_pairs_and_keeps_held_out_replies_out_of_them(tmp_path):
    from training.retrain import build_data

    config = load_config(str(project(tmp_path)))
    async with Store.open(config.database) as store:
        await log_rated_replies(store, config, liked=6, disliked=0)
        await log_regenerated(store, config, 2)
        # The newest 👍 (held out for the gate) against the reply swiped away before it: no pair.
        asked = await store.add_user_message("web", "late", "late", "皇上万福")
        swiped = await store.start_reply(asked.id, adapter_version=None, prompt="p", sampling={})
        await store.finish_reply(swiped.id, "AI", ReplyCost())
        liked = await store.start_reply(asked.id, adapter_version=None, prompt="p", sampling={})
        await store.finish_reply(liked.id, "臣妾恭请皇上圣安。", ReplyCost())
        await store.rate(liked.id, "web", "rater", 1)
    data = build_data(config.database, dataset_files(config, quiet=True).train, tmp_path / "run.json",
                      replay_ratio=1.0, seed=1)
    assert [p.reason for p in data.pairs] == ["kept", "kept"]
    assert "臣妾恭请皇上圣安。" in {s.output for s in data.heldout_up}
    assert data.report() == {"liked": 6, "disliked": 0, "replayed": 6, "pairs": 2}  # the 7th 👍 is held out


def test_a_dpo_stage_with_no_pairs_is_skipped_and_says_so(tmp_path):
    from bot.retrain import retrain_settings
    from bot.status import data_text
    from training.retrain import RetrainData, preference_stage
    from training.retrain_job import RetrainJob

    config = load_config(str(project(tmp_path)))
    config.retrain.preference = "dpo"
    job = RetrainJob(
        run_id=1, trigger="admin", db=config.database, original=tmp_path / "pairs.json", val=None,
        data_file=tmp_path / "run.json", model=config.model, lora=config.lora, train=retrain_settings(config),
        style=config.prompt_style(), adapters=config.adapter_root, character="甄嬛", parent="v0001",
        replay_ratio=1.0, preference=config.retrain.preference, tolerance=0.02, result=tmp_path / "result.json",
    )
    registry = Registry(config.adapter_root, "甄嬛")
    data = RetrainData(train_file=tmp_path / "run.json", liked=4, disliked=1, replayed=4,
                       heldout_up=(), heldout_down=(), disliked_samples=())
    candidate, skipped = preference_stage(job, registry, "the SFT candidate", data)
    assert candidate == "the SFT candidate" and skipped.startswith("DPO stage skipped: no preference pairs yet")
    assert registry.versions() == []
    assert data_text(data.report()) == "4 👍 replies, 1 👎, 4 script pairs replayed, 0 preference pairs"


def test_the_gate_refuses_a_candidate_worse_on_what_a_user_hears(tmp_path, builtin_path):
    """Two real adapters of the builtin model: one taught to answer in Chinese, one in English.
    Against the Chinese one, the English candidate is refused for its language, however its
    NLL compares; the other way round the hygiene rule lets it through."""
    from training.hygiene import Hygiene
    from training.retrain import gate
    from training.settings import LoraSettings, ModelSettings, TrainSettings
    from training.sft import TrainJob, train

    lines = ["皇上吉祥。", "你是谁？", "今日天气如何？", "御花园的花开了吗？", "你在做什么？", "请坐。"]
    val = [Sample(line, "臣妾在此。") for line in lines]
    model = ModelSettings(base="builtin:smollm2-135m", max_seq_length=256, prompt_format="alpaca")
    style = PromptStyle("alpaca", "", "甄嬛")
    settings = TrainSettings(max_steps=8, batch_size=2, grad_accum=1, warmup_steps=0, learning_rate=3e-3,
                             pack_length=256)
    versions = {}
    for name, answer in (("chinese", "臣妾在此，皇上万福金安。"), ("english", "Hello my friend, how are you today?")):
        data = tmp_path / f"{name}.json"
        data.write_text(json.dumps([{"instruction": q, "input": "", "output": answer} for q in lines * 4],
                                   ensure_ascii=False), encoding="utf-8")
        registry = Registry(tmp_path / name, "甄嬛")
        versions[name] = train(TrainJob(data=data, model=model, lora=LoraSettings(), train=settings, style=style,
                                        registry=registry), activate=False).version.path
    hygiene = Hygiene(stops=("###",), names=("甄嬛",), speakers=("用户",))
    refused = gate(model, style, versions["chinese"], versions["english"], val, (), (), tolerance=100.0,
                   hygiene=hygiene, probes=4)
    assert not refused.passed, refused.reason
    assert "what a user hears" in refused.reason and "script's language" in refused.reason
    assert refused.metrics["hygiene_active"]["language"] > refused.metrics["hygiene_candidate"]["language"]
    allowed = gate(model, style, versions["english"], versions["chinese"], val, (), (), tolerance=100.0,
                   hygiene=hygiene, probes=4)
    assert allowed.passed, allowed.reason
    assert "replies in the script's language" in allowed.reason
