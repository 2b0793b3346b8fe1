"""The bot ↔ training-child seam: a job and a result survive their files as they were written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bot.config import load_config
from training.hygiene import Hygiene
from training.retrain_job import RetrainJob, RetrainResult, read_job, read_result, write_job, write_result


def test_a_job_reads_back_as_it_was_written(tmp_path):
    (tmp_path / "config.toml").write_text('[lora]\nr = 8\n[character]\npersona = "你是甄嬛。"\n', encoding="utf-8")
    config = load_config(str(tmp_path / "config.toml"))
    job = RetrainJob(
        run_id=3, trigger="admin", db=config.database, original=tmp_path / "pairs.json", val=None,
        data_file=tmp_path / "data/retrain/run-3.json", model=config.model, lora=config.lora,
        train=dataclasses.replace(config.training, max_steps=2), style=config.prompt_style(),
        adapters=config.adapter_root, character="甄嬛", parent="v0002", replay_ratio=1.0,
        preference="kto", tolerance=0.02, result=tmp_path / "result.json",
        hygiene=Hygiene(stops=("###",), names=("甄嬛", "嬛嬛"), speakers=("用户", "皇帝"), persona="你是甄嬛。"),
        hygiene_probes=8, hygiene_tolerance=0.05,
    )
    write_job(job, tmp_path / "job.json")
    assert read_job(tmp_path / "job.json") == job
    assert read_job(tmp_path / "job.json").style.persona == "你是甄嬛。"


def test_a_result_reads_back_and_a_missing_one_is_none(tmp_path):
    passed = RetrainResult(version="v0003", passed=True, reason="held-out NLL 2 → 1",
                           metrics={"liked": 6, "final_loss": 1.5})
    write_result(passed, tmp_path / "result.json")
    assert read_result(tmp_path / "result.json") == passed
    write_result(RetrainResult(error="no 👍-rated replies"), tmp_path / "failed.json")
    assert read_result(tmp_path / "failed.json").error == "no 👍-rated replies"
    assert read_result(Path(tmp_path / "never-written.json")) is None
