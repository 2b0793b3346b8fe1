"""What /status and the admin API report, as typed values, and the one rendering of each: text
for a chat (``as_text``) and JSON for the web (``as_json``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bot.engine import EngineStatus
from bot.store import TrainingRun


@dataclass(frozen=True)
class RetrainStatus:
    running: bool
    last_run: TrainingRun | None
    next_run: str | None = None  # the scheduler's next slot, ISO 8601 local time
    new_ratings: int | None = None  # rated replies since the last run started
    recipe: str | None = None  # what a retrain trains here, e.g. "24 steps of 1 x 1 rows of 512 tokens"
    nice: int | None = None  # the CPU priority its process runs at


@dataclass(frozen=True)
class ServiceStatus:
    character: str
    active_version: str | None  # what the engine serves; None: the base model
    versions: tuple[str, ...]
    users: int
    conversations: int
    messages: int
    replies: int
    ratings: int
    replies_in_flight: int
    retrain: RetrainStatus
    engine: EngineStatus  # the engine's own report


def as_text(status: ServiceStatus) -> str:
    """/status as a few lines of text."""
    last = status.retrain.last_run
    last_text = f"run {last.id} {last.status}" + (f" ({last.reason})" if last.reason else "") if last else "none"
    lines = [
        f"{status.character}: serving {status.active_version or 'the base model (no adapter)'}",
        f"versions: {', '.join(status.versions) or 'none'}",
        f"messages: {status.messages} ({status.replies} replies), ratings: {status.ratings}, "
        f"users: {status.users}",
        f"retrain: {'running' if status.retrain.running else 'idle'}; last run: {last_text}",
    ]
    if status.retrain.new_ratings is not None:
        lines.append(f"ratings waiting for the next retrain: {status.retrain.new_ratings}")
    if last and (data := data_text(last.metrics)):
        lines.append(f"last run's data: {data}")
    if status.retrain.recipe:
        lines.append(f"retrain recipe: {status.retrain.recipe}, at CPU priority nice {status.retrain.nice}")
    return "\n".join(lines)


def data_text(metrics: dict) -> str | None:
    """What a run trained on, from its metrics; None for a run that got no data (it failed)."""
    if "liked" not in metrics:
        return None
    return (f"{metrics['liked']} 👍 replies, {metrics['disliked']} 👎, {metrics['replayed']} script pairs "
            f"replayed, {metrics.get('pairs', 0)} preference pairs")


def as_json(status: ServiceStatus) -> dict:
    """GET /api/admin/status: the same fields, the engine's report as it gives it."""
    return {**dataclasses.asdict(status), "versions": list(status.versions)}
