"""Scheduled retraining: APScheduler 3.x in the bot's event loop, one job, never two at once."""

from __future__ import annotations

import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bot.config import SchedulerSettings
from bot.retrain import Retrainer
from training.errors import UserError

log = logging.getLogger(__name__)
JOB_ID = "retrain"


def make_trigger(settings: SchedulerSettings):
    if settings.cron.strip():
        try:
            return CronTrigger.from_crontab(settings.cron.strip())
        except ValueError as exc:
            raise UserError(f"[scheduler] cron: {settings.cron!r} is not a crontab expression ({exc}); "
                            "e.g. '0 4 * * *' for 04:00 daily") from None
    return IntervalTrigger(hours=settings.interval_hours)


class RetrainSchedule:
    """Runs ``Retrainer.scheduled`` on the configured trigger. A long retrain that overlaps its
    next slot is not stacked (max_instances 1, coalesce), and a slot missed while the bot was
    busy or asleep still runs within the grace time instead of being dropped."""

    def __init__(self, settings: SchedulerSettings, retrainer: Retrainer | list[Retrainer]):
        self.settings = settings
        # A cast: each character's retrainer in turn at every slot (one training process at a
        # time), each against its own threshold of new ratings.
        self.retrainers = retrainer if isinstance(retrainer, list) else [retrainer]
        self.retrainer = self.retrainers[0]
        self.scheduler = AsyncIOScheduler()

    def start(self) -> None:
        self.scheduler.add_job(
            self._tick, make_trigger(self.settings), id=JOB_ID,
            max_instances=1, coalesce=True, misfire_grace_time=3600,
        )
        self.scheduler.start()
        self._publish_next()

    async def _tick(self) -> None:
        try:
            for retrainer in self.retrainers:
                try:
                    await retrainer.scheduled()
                except Exception:  # one character's failure must not skip the others
                    log.exception("the scheduled retrain of %s failed", retrainer.config.character.name)
        finally:
            self._publish_next()

    def _publish_next(self) -> None:
        job = self.scheduler.get_job(JOB_ID)
        when = job.next_run_time if job else None
        for retrainer in self.retrainers:
            retrainer.next_run = when.timestamp() if when else None

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
