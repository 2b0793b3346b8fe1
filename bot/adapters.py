"""Which adapter version serves: the one owner of activation, rollback and hot-swap.

The registry (``training/registry.py``, ``adapters/<character>/active.json``) is the one record
of the active version and of the history rollback walks back through. Every path that changes
it in the bot goes through ``Adapters``: a retrain's promotion, ``/rollback`` on any platform,
the web admin API; ``rolebot adapters activate|rollback`` uses it without an engine. Under one
lock it writes the registry, logs the activation in the store (an event, for the record of what
served when; never read back to decide anything) and swaps the engine between batches.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from training.errors import UserError
from training.registry import Registry, Version

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.store import Store


class Adapters:
    """One character's adapter versions as the bot serves them."""

    def __init__(self, registry: Registry, *, store: Store | None = None, engine: Engine | None = None):
        self.registry = registry
        self.store = store  # None: nothing to log (the CLI)
        self.engine = engine  # None: nothing to hot-swap (`rolebot retrain`, the CLI, start-up)
        self.lock = asyncio.Lock()
        # Set while a retrain runs: its promotion is coming and would undo a rollback made now,
        # so a rollback is refused (not queued: a retrain may run for many minutes).
        self.pending: str | None = None

    @property
    def serving(self) -> str | None:
        """The version answering now: the engine's, or without one the registry's active."""
        if self.engine is not None:
            return self.engine.adapter_version
        active = self.registry.active()
        return active.name if active else None

    def active(self) -> Version | None:
        return self.registry.active()

    def versions(self) -> list[Version]:
        return self.registry.versions()

    async def activate(self, name: str) -> Version:
        """Make version ``name`` active and serve it."""
        self._refuse_while_pending("activate a version")
        return await self._switch(lambda: self.registry.activate(name))

    async def promote(self, name: str) -> Version:
        """A retrain's candidate that passed the gate: active and served from now on."""
        return await self._switch(lambda: self.registry.activate(name))

    async def rollback(self) -> Version:
        """Return to the version active before the current one and serve it."""
        self._refuse_while_pending("roll back")
        return await self._switch(self.registry.rollback)

    async def log_serving(self, version: Version | None) -> None:
        """At start-up: record the version the process serves (which the CLI may have changed
        while no bot ran)."""
        if version is not None and self.store is not None:
            await self.store.log_activation(version.character, version.name, version.meta)

    def _refuse_while_pending(self, what: str) -> None:
        if self.pending is not None:
            raise UserError(f"{self.pending}; {what} after it ends")

    async def _switch(self, change) -> Version:
        async with self.lock:
            version = await asyncio.to_thread(change)
            await self.log_serving(version)
            if self.engine is not None:
                await self.engine.swap_adapter(version)
            return version
