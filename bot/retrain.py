"""The self-improvement loop in the bot: one retrain at a time, in a subprocess, gated, then
hot-swapped into the running engine. The scheduler and an admin's /retrain both come here."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bot.adapters import Adapters
from bot.config import Config
from bot.engine.base import hygiene_for
from bot.datasets import dataset_files
from bot.status import RetrainStatus, data_text
from bot.store import Store, TrainingRun
from training.canon import CanonIndex
from training.errors import UserError
from training.hygiene import Hygiene
from training.registry import Registry
from training.retrain_job import RetrainJob, read_result, write_job
from training.yielding import ENV, ChatsWaiting
from training.settings import TrainSettings, recipe_for_device

log = logging.getLogger(__name__)
WATCH_S = 0.005  # how often the engine is looked at while a retrain that yields to chats runs
Notify = Callable[[str], Awaitable[None]]


class Retrainer:
    def __init__(self, config: Config, store: Store, adapters: Adapters | None = None, *, echo: bool = False,
                 lock: asyncio.Lock | None = None):
        self.config = config  # the character's view (Config.for_character)
        self.store = store
        self.key = config.store_key
        # Promotion goes through the process's one owner of the adapter (bot.adapters);
        # `rolebot retrain` has no engine, so there nothing is hot-swapped.
        self.adapters = adapters or Adapters(Registry(config.adapter_root, config.character.name), store=store)
        self.lock = lock or asyncio.Lock()  # a cast's retrainers share one: one training process at a time
        self.task: asyncio.Task | None = None
        self.next_run: float | None = None  # set by the scheduler
        self.last_run: TrainingRun | None = None
        self.process: asyncio.subprocess.Process | None = None  # the training child, while one runs
        self.echo = echo  # the child's progress goes to this terminal instead of the run's log

    async def request(self, *, trigger: str, requested_by: str | None = None, notify: Notify | None = None) -> TrainingRun:
        """Start a cycle in the background; refused while one runs (same lock as the schedule)."""
        if self.lock.locked():
            raise UserError(f"a retrain is already running (run {self.last_run.id if self.last_run else '?'}); "
                            "wait for it to finish")
        await self.lock.acquire()
        try:
            run = await self.store.start_run(trigger, requested_by, self.key)
        except BaseException:
            self.lock.release()
            raise
        self.last_run = run
        self.adapters.pending = f"a retrain is running (run {run.id})"
        self.task = asyncio.create_task(self._cycle(run, notify), name=f"retrain-{run.id}")
        return run

    async def scheduled(self) -> TrainingRun | None:
        """The scheduler's job: a cycle only when enough new ratings are waiting."""
        waiting = await self.new_ratings()
        needed = self.config.scheduler.min_new_ratings
        if waiting < needed:
            log.info("scheduled retrain skipped: %d new rated replies, %d needed", waiting, needed)
            return None
        if self.lock.locked():
            log.info("scheduled retrain skipped: one is running")
            return None
        try:
            run = await self.request(trigger="schedule")
        except UserError as exc:  # e.g. `rolebot retrain` from cron is running beside the bot
            log.info("scheduled retrain skipped: %s", exc)
            return None
        await self.wait()
        return run

    async def wait(self) -> TrainingRun | None:
        if self.task is not None:
            await asyncio.shield(self.task)
        return self.last_run

    async def new_ratings(self) -> int:
        """Rated replies cast or changed since the last run started."""
        return await self.store.ratings_since(self.last_run.started_at if self.last_run else 0.0,
                                              self.config.character.name if len(self.config.members) > 1 else None,
                                              self.config.first)

    async def status(self) -> RetrainStatus:
        next_run = None if self.next_run is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.next_run))
        return RetrainStatus(running=self.lock.locked(), last_run=self.last_run, next_run=next_run,
                             new_ratings=await self.new_ratings(), recipe=recipe_text(self.config),
                             nice=self.config.retrain.nice)

    async def load_last_run(self) -> None:
        self.last_run = await self.store.last_run(character=self.key if len(self.config.members) > 1 else None)

    async def _cycle(self, run: TrainingRun, notify: Notify | None) -> None:
        try:
            status, reason, version, metrics = await self._train_and_gate(run)
        except asyncio.CancelledError:
            status, reason, version, metrics = "failed", "the bot stopped during the run", None, {}
        except Exception as exc:  # a bug here must not kill the bot: record it
            log.exception("retrain %s failed", run.id)
            status, reason, version, metrics = "failed", f"{type(exc).__name__}: {exc}", None, {}
        try:
            self.last_run = await self.store.finish_run(run.id, status, reason=reason, candidate_version=version, metrics=metrics)
        finally:
            self.adapters.pending = None
            self.lock.release()
        log.info("retrain %s %s: %s", run.id, status, reason)
        if notify is not None:
            try:
                data = data_text(metrics)
                await notify(f"Retrain {run.id} {status}: {reason}" + (f" (trained on {data})" if data else ""))
            except Exception:
                log.warning("could not tell the admin about retrain %s", run.id, exc_info=True)

    async def _train_and_gate(self, run: TrainingRun) -> tuple[str, str, str | None, dict]:
        job, job_file = self._job(run)
        code, output = await self._subprocess(job_file)
        result = read_result(job.result)
        if code != 0 or result is None or result.error is not None:
            reason = (result.error if result else None) or _tail(output) or f"training exited with {code}"
            if code < 0 and result is None:
                reason = f"training was killed (signal {-code}): {reason}"
            return "failed", reason, None, {}
        if not result.passed:
            return "rejected", f"{result.version} not promoted: {result.reason}", result.version, result.metrics
        version = await self.adapters.promote(result.version)
        return "succeeded", f"{version.name} is active: {result.reason}", version.name, result.metrics

    def _job(self, run: TrainingRun) -> tuple[RetrainJob, Path]:
        """The training child's job, written to a file in a fresh folder beside its result."""
        config = self.config
        files = dataset_files(config, quiet=True)
        work = Path(tempfile.mkdtemp(prefix=f"rolebot-retrain-{run.id}-"))
        active = self.adapters.active() if config.retrain.start_from == "active" else None
        job = RetrainJob(
            run_id=run.id, trigger=run.trigger, db=config.database, original=files.train, val=files.val,
            data_file=config.path(f"data/retrain/run-{run.id}.json"),
            model=config.model, lora=config.lora,
            train=retrain_settings(config),
            style=config.prompt_style(training=True), adapters=config.adapter_root, character=config.character.name,
            parent=active.name if active else None, replay_ratio=config.retrain.replay_ratio,
            preference=config.retrain.preference, tolerance=config.retrain.nll_tolerance,
            result=work / "result.json", hygiene=self.hygiene(files.canon), first=config.first,
            hygiene_probes=config.retrain.hygiene_probes, hygiene_tolerance=config.retrain.hygiene_tolerance,
        )
        write_job(job, work / "job.json")
        return job, work / "job.json"

    def hygiene(self, canon: Path | None) -> Hygiene:
        """The engine's reply hygiene, with the script's speakers from the canon index if any."""
        hygiene = hygiene_for(self.config)
        names = (self.config.character.name, *self.config.character.aliases)
        try:
            index = CanonIndex.load(canon) if canon is not None and canon.exists() else None
        except UserError:  # the bot already said so at start-up; the gate goes on without it
            index = None
        return dataclasses.replace(hygiene, speakers=hygiene.speakers + index.speakers(names)) if index else hygiene

    async def _subprocess(self, job: Path) -> tuple[int, str]:
        """Train in a child process; kill it when it runs past the timeout. With an engine in
        this process and ``[retrain] yield_to_chats``, the child pauses while chats wait."""
        engine = self.adapters.engine
        chats = ChatsWaiting(job.with_name("chats-waiting")) if engine is not None and self.config.retrain.yield_to_chats else None
        watcher = asyncio.create_task(_watch(engine, chats)) if chats is not None else None
        try:
            return await self._run_child(job, {**os.environ, ENV: str(chats.path)} if chats is not None else None)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                chats.close()

    async def _run_child(self, job: Path, env: dict | None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "training.retrain", str(job), env=env,
            stdout=None if self.echo else asyncio.subprocess.PIPE,
            stderr=None if self.echo else asyncio.subprocess.STDOUT)
        self.process = proc
        with contextlib.suppress(OSError):  # the child may be gone already
            os.setpriority(os.PRIO_PROCESS, proc.pid, self.config.retrain.nice)
        timeout = self.config.retrain.timeout_minutes * 60
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return -9, f"killed after the {self.config.retrain.timeout_minutes:g}-minute timeout"
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            raise
        return proc.returncode, (output or b"").decode("utf-8", "replace")


async def _watch(engine, chats: ChatsWaiting) -> None:
    """Keep the flag up while the engine holds requests that have not begun."""
    while True:
        chats.set(engine.status().starting > 0)
        await asyncio.sleep(WATCH_S)


def retrain_settings(config: Config) -> TrainSettings:
    """The recipe of a retrain: [retrain] max_steps of the full recipe on a GPU; without one,
    [retrain] cpu_max_steps of the quick CPU recipe (the full one takes hours on 2 cores)."""
    return recipe_for_device(dataclasses.replace(config.training, max_steps=config.retrain.max_steps),
                             config.retrain.cpu_max_steps)


def recipe_text(config: Config) -> str:
    t = retrain_settings(config)
    rows = f"{t.batch_size} x {t.grad_accum} rows of {t.pack_length} tokens" if t.batching != "padded" else \
        f"{t.batch_size} x {t.grad_accum} samples"
    return f"{t.max_steps} steps of {rows}"


def _tail(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
