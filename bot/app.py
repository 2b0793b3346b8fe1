"""``rolebot serve`` as one asyncio process: store → adapter → engine → service → front-ends.

Shutdown runs the other way round. On Ctrl-C or SIGTERM the service stops taking messages,
replies in flight get ``SHUTDOWN_GRACE_S`` seconds to finish and are then cancelled (their rows
marked interrupted), the front-ends stop, the engine and the database close. A second Ctrl-C
ends at once; the next start marks whatever was left generating as interrupted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from bot.config import Config
from bot.platforms import Frontend, Options, enabled
from bot.service import Service
from bot.store import Store
from training.registry import Registry, Version
from training.settings import TrainSettings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0


@dataclass
class App:
    """A running bot; ``await App.start(config)``, later ``await app.stop()``."""

    config: Config
    store: Store
    engine: Any
    service: Service
    frontends: list[Frontend]
    _resources: AsyncExitStack

    @classmethod
    async def start(cls, config: Config, *, host: str | None = None, port: int | None = None,
                    train: bool = True, retraining: bool = True, interactive: bool = False,
                    on_quit: Callable[[], None] | None = None) -> App:
        """Open everything; whatever opened before a failure is closed again.

        ``train``: train a first adapter when the character has none (else serve the base).
        ``retraining``: /retrain, /rollback through the retrainer, and the [scheduler] job.
        """
        from bot.engine import make_engine

        async with AsyncExitStack() as stack:
            store = await Store.open(config.database)
            stack.push_async_callback(store.close)
            if interrupted := await store.mark_unfinished_interrupted():
                log.info("%d replies left generating by the last run marked interrupted", interrupted)
            version = await active_adapter(config, store, train=train)
            engine = make_engine(config, version)
            stack.push_async_callback(engine.close)
            await engine.start()
            retrainer = await start_retraining(config, store, engine, stack) if retraining else None
            service = Service(config, store, engine, retrainer=retrainer)
            frontends = enabled(config, service, Options(host, port, on_quit, interactive))
            for frontend in frontends:
                await frontend.start()
                stack.push_async_callback(frontend.stop)
            return cls(config, store, engine, service, frontends, stack.pop_all())

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        await self.service.close(grace_s)
        await self._resources.aclose()  # front-ends, then the engine, then the store

    def describe(self) -> str:
        where = ", ".join(getattr(f, "url", f.name) for f in self.frontends) or "no front-end enabled"
        return f"serving {self.config.character.name} ({self.engine.adapter_version or 'base model, no adapter'}): {where}"


async def run_app(config: Config, *, host: str | None = None, port: int | None = None,
                  train: bool = True) -> None:
    """Serve until Ctrl-C, SIGTERM or the console's /quit, then shut down cleanly."""
    loop = asyncio.get_running_loop()
    quit = asyncio.Event()
    app = await App.start(config, host=host, port=port, train=train,
                          interactive=sys.stdin.isatty(), on_quit=quit.set)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, quit.set)
    print(f"rolebot: {app.describe()} — Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        await quit.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # a second Ctrl-C stops at once
        print("rolebot: stopping — replies in flight finish or are marked interrupted",
              file=sys.stderr, flush=True)
        await app.stop()
        print("rolebot: stopped", file=sys.stderr, flush=True)


async def start_retraining(config: Config, store: Store, engine: Any, stack: AsyncExitStack):
    """The retrainer (/retrain, /rollback) and, if [scheduler] enabled, its schedule. At
    shutdown the schedule stops and a retrain in progress is cancelled (its run recorded as
    failed, its training process killed) before the engine and the store close."""
    from bot.retrain import Retrainer
    from bot.scheduler import RetrainSchedule

    # A run still 'running' whose process is gone was cut off by a crash or a kill.
    await store.fail_unfinished_runs()
    retrainer = Retrainer(config, store, engine)
    await retrainer.load_last_run()

    async def cancel_run() -> None:
        if retrainer.task is not None and not retrainer.task.done():
            retrainer.task.cancel()
            await asyncio.gather(retrainer.task, return_exceptions=True)

    stack.push_async_callback(cancel_run)
    if config.scheduler.enabled:
        schedule = RetrainSchedule(config.scheduler, retrainer)
        schedule.start()
        stack.callback(schedule.stop)
    return retrainer


async def active_adapter(config: Config, store: Store, *, train: bool) -> Version | None:
    """The version to serve, recorded in the store. A character with no version yet gets one
    trained from its script (or the project's sample script) unless ``train`` is off."""
    registry = Registry(config.adapter_root, config.character.name)
    version = registry.active()
    if version is None and (versions := registry.versions()):
        version = registry.activate(versions[-1].name)
        log.info("no active adapter version: activated the newest, %s", version.name)
    if version is None and train:
        version = await in_thread(train_first_adapter, config, registry)
    known = {v.version for v in await store.adapter_versions(config.character.name)}
    for v in registry.versions():
        if v.name not in known:
            await store.add_adapter_version(v.character, v.name, v.meta)
    if version is not None:
        await store.activate_adapter(version.character, version.name)
    return version


def train_first_adapter(config: Config, registry: Registry) -> Version:
    """Prepare the script and train the first version with the SFT core, as `rolebot train`."""
    from bot.commands.train import style
    from bot.datasets import dataset_files
    from training.sft import TrainJob, train

    settings = first_run_settings(config)
    print(f"rolebot: {config.character.name} has no adapter yet — preparing the script and "
          f"training the first version ({settings.max_steps or settings.epochs} "
          f"{'steps' if settings.max_steps else 'epochs'}"
          f"{'' if settings is config.training else ', the quick CPU recipe: [training] first_run_steps'}"
          "); serving starts after.", file=sys.stderr, flush=True)
    files = dataset_files(config)
    result = in_child_process(train, TrainJob(
        data=files.train, val=files.val, model=config.model, lora=config.lora, train=settings,
        style=style(config), registry=registry, trigger="first-run",
    ))
    print(f"rolebot: trained {result.version.name} (loss {result.final_loss:.4f}); starting the bot",
          file=sys.stderr, flush=True)
    return result.version


def in_child_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a fresh Python process; its result or its exception comes back.

    Unsloth patches transformers' model classes for the whole process when it loads a model.
    The engine serves on plain transformers (continuous batching needs its own attention), so
    Unsloth only ever runs in a child: here for the first training, in ``rolebot retrain``'s
    subprocess for the others. The child shares the terminal, so its progress bar shows."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def first_run_settings(config: Config) -> TrainSettings:
    """The full recipe on a GPU; without one, a short run of single 512-token rows, so that the
    first `rolebot serve` on a laptop answers within minutes instead of hours."""
    import torch

    steps = config.training.first_run_steps
    if torch.cuda.is_available() or steps == 0:
        return config.training
    return dataclasses.replace(config.training, batch_size=1, grad_accum=1, warmup_steps=0,
                               pack_length=512, max_steps=steps)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a daemon thread: unlike the default executor, Ctrl-C during a long
    training need not wait for it to end before the process can exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, lambda error=exc: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=work, name=f"rolebot-{fn.__name__}", daemon=True).start()
    return await future
