"""``rolebot serve`` as one asyncio process: store → adapter → engine → service → front-ends.

Shutdown runs the other way round. On Ctrl-C or SIGTERM the service stops taking messages,
replies in flight get ``SHUTDOWN_GRACE_S`` seconds to finish and are then cancelled (their rows
marked interrupted), the front-ends stop, the engine and the database close. A second Ctrl-C
ends at once; the next start marks whatever was left generating as interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any

from bot.adapters import Adapters
from bot.canon import ServedCanon
from bot.cast import Cast
from bot.config import Config
from bot.platforms import Frontend, Options, enabled
from bot.service import Service
from bot.store import Store
from training.builtin import concrete
from training.registry import Registry, Version
from training.settings import TrainSettings, recipe_for_device

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
ACTIVE = "active"  # App.start(adapter=ACTIVE): serve the registry's active version


@dataclass
class App:
    """A running bot; ``await App.start(config)``, later ``await app.stop()``."""

    config: Config
    store: Store
    engine: Any  # the one engine: for a cast, the shared base with every character's adapter
    adapters: Adapters  # the default character's (``config.character``), as ``service``
    service: Service
    frontends: list[Frontend]
    _resources: AsyncExitStack
    cast: Cast | None = None

    @classmethod
    async def start(cls, config: Config, *, host: str | None = None, port: int | None = None,
                    train: bool = True, retraining: bool = True, interactive: bool = False,
                    on_quit: Callable[[], None] | None = None, adapter: str | None = ACTIVE,
                    recover: bool = True,
                    frontends: Callable[[Service, Options], list[Frontend]] | None = None) -> App:
        """Open everything; whatever opened before a failure is closed again.

        ``train``: train a first adapter when the character has none (else serve the base).
        ``retraining``: /retrain through the retrainer, and the [scheduler] job.
        ``adapter``: the version to serve: ``ACTIVE`` (the registry's), a version's name
        (served, not activated), or None for the base model alone.
        ``recover``: mark replies a previous run left generating as interrupted; off for a
        process that may run beside the bot (``rolebot chat``), whose replies are not its own.
        ``frontends``: the front-ends to run instead of those config.toml enables.

        A cast ([[cast]]) serves every character at once on one base model. ``train`` trains the
        first adapter of ``config.character`` before serving; the other characters without one
        start on the base model and are trained one after another in the background (each
        hot-swapped in when its training ends). ``adapter`` applies to ``config.character``.
        """
        from bot.engine.base import make_engines

        for choice in config.choices:  # what builtin:auto and prompt_format auto became here
            log.info("%s", choice)
        check_cast(config)
        async with AsyncExitStack() as stack:
            store = await Store.open(config.database)
            stack.push_async_callback(store.close)
            if recover and (interrupted := await store.mark_unfinished_interrupted()):
                log.info("%d replies left generating by the last run marked interrupted", interrupted)
            views = {member.name: config.for_character(member.name) for member in config.members}
            chosen = config.character.name
            registries = {name: Adapters(Registry(config.adapter_root, name), store=store) for name in views}
            versions: dict[str, Version | None] = {}
            for name, view in views.items():
                adapters = registries[name]
                if name != chosen:
                    versions[name] = await serving_version(view, adapters, train=False)
                elif adapter == ACTIVE:
                    versions[name] = await serving_version(view, adapters, train=train)
                else:
                    versions[name] = adapters.registry.get(adapter) if adapter else None
            engine, engines = make_engines(config, versions)
            stack.push_async_callback(engine.close)
            await engine.start()
            lock = asyncio.Lock()  # one training process at a time, whichever character it trains
            services: dict[str, Service] = {}
            retrainers = []
            if retraining:  # a run still 'running' whose process is gone was cut off by a crash or a kill
                await store.fail_unfinished_runs()
            for name, view in views.items():
                adapters, voice = registries[name], engines[name]
                adapters.engine = voice  # from now on every activation hot-swaps
                retrainer = await start_retraining(view, store, adapters, stack, lock) if retraining else None
                retrainers.append(retrainer)
                coming = train and adapter == ACTIVE and versions[name] is None  # trained in the background
                services[name] = Service(view, store, voice, adapters=adapters, retrainer=retrainer,
                                         canon=load_canon(view, adapters, voice, coming=coming))
            cast = Cast(services)
            service = services[chosen]
            if retraining and config.scheduler.enabled:
                from bot.scheduler import RetrainSchedule

                schedule = RetrainSchedule(config.scheduler, retrainers)
                schedule.start()
                stack.callback(schedule.stop)
            if train and adapter == ACTIVE and (untrained := [n for n, v in versions.items() if v is None and n != chosen]):
                task = asyncio.create_task(train_in_background(config, untrained, services, lock))
                stack.push_async_callback(_cancel, task)
            options = Options(host, port, on_quit, interactive)
            running = frontends(service, options) if frontends else enabled(config, service, options)
            for frontend in running:
                await frontend.start()
                stack.push_async_callback(frontend.stop)
            return cls(config, store, engine, registries[chosen], service, running, stack.pop_all(), cast)

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        await (self.cast.close(grace_s) if self.cast is not None else self.service.close(grace_s))
        await self._resources.aclose()  # front-ends, then the engine, then the store

    def describe(self) -> str:
        where = ", ".join(getattr(f, "url", f.name) for f in self.frontends) or "no front-end enabled"
        services = list(self.cast) if self.cast is not None else [self.service]
        who = ", ".join(f"{s.character} ({s.engine.adapter_version or 'base model, no adapter'})" for s in services)
        return f"serving {who}: {where}"


async def run_app(config: Config, **options: Any) -> None:
    """Serve until Ctrl-C, SIGTERM or the console's /quit, then shut down cleanly.
    ``options`` are ``App.start``'s."""
    loop = asyncio.get_running_loop()
    quit = asyncio.Event()
    options.setdefault("interactive", sys.stdin.isatty())
    app = await App.start(config, on_quit=quit.set, **options)
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


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def check_cast(config: Config) -> None:
    """A cast member who never speaks in their script stops the start with one line (a cast of
    one keeps today's message from prepare)."""
    if len(config.members) < 2:
        return
    from bot.config import check_cast_speaks
    from training.screenplay import SAMPLE_SCRIPT, parse_scripts

    scripts: dict[tuple, dict[str, int]] = {}
    for member in config.members:
        files = tuple(config.path(s) for s in member.script) or (SAMPLE_SCRIPT,)
        if files not in scripts:
            counts: dict[str, int] = {}
            for turn in parse_scripts(list(files)):
                counts[turn.speaker] = counts.get(turn.speaker, 0) + 1
            scripts[files] = counts
        check_cast_speaks(member, scripts[files], ", ".join(str(f.name) for f in files))


def load_canon(config: Config, adapters: Adapters, engine, *, coming: bool = False) -> ServedCanon | None:
    """The character's canon (None: off, or not prepared yet; ``coming``: its first training
    will prepare it); its script's speakers join the engine's reply hygiene: a reply ends where
    another speaker of the script would begin."""
    canon = ServedCanon.load(config, adapters.registry, coming=coming)
    if canon is not None:
        speakers = canon.index.speakers(config.character.names)
        engine.hygiene = replace(engine.hygiene, speakers=tuple(dict.fromkeys(engine.hygiene.speakers + speakers)))
    return canon


async def train_in_background(config: Config, names: list[str], services: dict[str, Service],
                              lock: asyncio.Lock) -> None:
    """Train the first adapter of each character in ``names`` while the bot serves, one at a
    time (holding the retrain lock), and hot-swap each in as it is ready, with its canon."""
    for name in names:
        async with lock:
            service = services[name]
            view, adapters = service.config, service.adapters
            if adapters.active() is not None:
                continue
            try:
                # niced like a retrain: the bot is serving the others meanwhile
                trained = await in_thread(train_first_adapter, view, adapters.registry, config.retrain.nice)
                await adapters.activate(trained.name)
                if service.canon is None:  # prepared by this training
                    service.canon = load_canon(view, adapters, service.engine)
            except Exception:
                log.exception("the first training of %s failed; it speaks with the base model until a retrain", name)


async def start_retraining(config: Config, store: Store, adapters: Adapters, stack: AsyncExitStack,
                           lock: asyncio.Lock):
    """A character's retrainer (/retrain, /rollback), sharing the cast's training ``lock``. At
    shutdown a retrain in progress is cancelled (its run recorded as failed, its training
    process killed) before the engine and the store close. The schedule is the cast's (App.start)."""
    from bot.retrain import Retrainer

    retrainer = Retrainer(config, store, adapters, lock=lock)
    await retrainer.load_last_run()

    async def cancel_run() -> None:
        if retrainer.task is not None and not retrainer.task.done():
            retrainer.task.cancel()
            await asyncio.gather(retrainer.task, return_exceptions=True)

    stack.push_async_callback(cancel_run)
    return retrainer


async def serving_version(config: Config, adapters: Adapters, *, train: bool) -> Version | None:
    """The version to serve (logged in the store). A character with no version yet gets one
    trained from its script (or the project's sample script) unless ``train`` is off."""
    version = adapters.active()
    if version is None and (versions := adapters.versions()):
        version = await adapters.activate(versions[-1].name)
        log.info("no active adapter version: activated the newest, %s", version.name)
        return version
    if version is None and train:
        trained = await in_thread(train_first_adapter, config, adapters.registry)
        return await adapters.activate(trained.name)
    await adapters.log_serving(version)
    return version


def train_first_adapter(config: Config, registry: Registry, nice: int = 0) -> Version:
    """Prepare the script and train the first version with the SFT core, as `rolebot train`
    (in a child process at CPU priority ``nice``)."""
    from bot.datasets import dataset_files
    from training.sft import TrainJob, train

    settings = first_run_settings(config)
    amount = f"{settings.max_steps} steps" if settings.max_steps else f"{settings.epochs:g} epochs"
    if settings is not config.training:
        amount += ", the quick CPU recipe: [training] first_run_steps"
        if settings.max_minutes:
            amount += f", at most {settings.max_minutes:g} minutes"
        amount += f", learning rate {settings.learning_rate:g}"
    after = "the others are served meanwhile" if nice else "serving starts after"
    print(f"rolebot: {config.character.name} has no adapter yet — preparing the script and "
          f"training the first version on {concrete(config.model.base)} ({amount}); {after}.",
          file=sys.stderr, flush=True)
    files = dataset_files(config)
    result = in_child_process(train, TrainJob(
        data=files.train, val=files.val, model=config.model, lora=config.lora, train=settings,
        style=config.prompt_style(training=True), registry=registry, trigger="first-run", canon=files.canon,
    ), activate=False, nice=nice)  # the caller activates it, through bot.adapters
    print(f"rolebot: trained {result.version.name} (loss {result.final_loss:.4f}); starting the bot",
          file=sys.stderr, flush=True)
    return result.version


def in_child_process(fn: Callable[..., Any], *args: Any, nice: int = 0, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a fresh Python process; its result or its exception comes back.

    Unsloth patches transformers' model classes for the whole process when it loads a model.
    The engine serves on plain transformers (continuous batching needs its own attention), so
    Unsloth only ever runs in a child: here for the first training, in ``rolebot retrain``'s
    subprocess for the others. The child shares the terminal, so its progress bar shows."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_die_with_parent, initargs=(os.getpid(), nice)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _die_with_parent(parent: int, nice: int = 0) -> None:
    """In the child: exit as soon as the process that started it is gone. A bot stopped
    (SIGTERM, Ctrl-C, kill -9) during its first training would otherwise leave the training
    running on, an orphan holding the CPU for as long as the run takes."""
    if nice:
        os.nice(nice)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="rolebot-parent-watch", daemon=True).start()


def first_run_settings(config: Config) -> TrainSettings:
    """The full recipe on a GPU; without one, a short run of single 512-token rows, so that the
    first `rolebot serve` on a laptop answers within minutes instead of hours."""
    return recipe_for_device(config.training, config.training.first_run_steps, config.training.first_run_minutes,
                             config.training.first_run_learning_rate)


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
