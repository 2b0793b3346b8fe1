"""The seam between the bot and its training subprocess: the job it writes, the result it reads.

The bot writes a ``RetrainJob`` to a file and starts ``python -m training.retrain JOB.json``;
the child writes a ``RetrainResult`` (or one with ``error``) to the job's ``result`` path. Both
are plain JSON, so the child needs nothing from the bot's process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from training.atomic import write_json_atomic
from training.hygiene import Hygiene
from training.prompts import PromptStyle
from training.settings import LoraSettings, ModelSettings, TrainSettings


@dataclass(frozen=True)
class RetrainJob:
    """Everything one cycle's training side needs."""

    run_id: int
    trigger: str
    db: Path  # the bot's chat log (read as a snapshot)
    original: Path  # the script's pairs, replayed beside the rated replies
    val: Path | None
    data_file: Path  # where the cycle's training set is written
    model: ModelSettings
    lora: LoraSettings
    train: TrainSettings
    style: PromptStyle
    adapters: Path
    character: str
    parent: str | None  # the version to start from; None: the base model
    replay_ratio: float
    preference: str  # "none", "kto" or "dpo": the stage after SFT
    tolerance: float  # the gate's held-out NLL tolerance
    result: Path  # where the child writes its RetrainResult
    hygiene: Hygiene = Hygiene()  # what replies are cleaned of, for the gate's hygiene rule
    hygiene_probes: int = 0  # held-out lines the gate generates replies for (0: no hygiene rule)
    hygiene_tolerance: float = 0.0
    first: bool = True  # the cast's first character: its data includes the conversations from before the cast


@dataclass(frozen=True)
class RetrainResult:
    """What the child reports: a gated candidate, or the error that stopped it."""

    version: str | None = None
    passed: bool = False
    reason: str = ""
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def write_job(job: RetrainJob, path: Path) -> None:
    write_json_atomic(path, _plain(job))


def read_job(path: Path) -> RetrainJob:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    paths = {name: Path(raw[name]) if raw[name] is not None else None
             for name in ("db", "original", "val", "data_file", "adapters", "result")}
    return RetrainJob(**{**raw, **paths, "model": ModelSettings(**raw["model"]),
                         "lora": LoraSettings(**raw["lora"]), "train": TrainSettings(**raw["train"]),
                         "style": PromptStyle(**raw["style"]),
                         "hygiene": Hygiene(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in raw.get("hygiene", {}).items()})})


def write_result(result: RetrainResult, path: Path) -> None:
    write_json_atomic(path, dataclasses.asdict(result))


def read_result(path: Path) -> RetrainResult | None:
    """The child's result; None when it wrote none (it was killed, or crashed before)."""
    if not Path(path).exists():
        return None
    return RetrainResult(**json.loads(Path(path).read_text(encoding="utf-8")))


def _plain(job: RetrainJob) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(job).items()}
