"""The canon the bot serves with: the index loaded once at start-up, searched for each message.

A missing or broken index does not stop the bot: it says so in one line (what is wrong with
which file, and what to do) and serves without canon.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from bot.config import Config
from bot.datasets import pairs_path
from training.canon import CanonIndex, canon_path, fit, served_canon
from training.errors import UserError
from training.prompts import Canon
from training.registry import Registry

log = logging.getLogger(__name__)


class ServedCanon:
    """The exchanges a message gets, as many as the served adapter was trained with."""

    def __init__(self, index: CanonIndex, config: Config, registry: Registry):
        self.index = index
        self.config = config
        self.registry = registry
        self._formats: dict[str | None, tuple[int, int]] = {}  # adapter version → (k, max_tokens)

    @classmethod
    def load(cls, config: Config, registry: Registry, *, coming: bool = False) -> ServedCanon | None:
        """The index beside the training pairs; None (canon off) when ``[canon] k`` is 0 or the
        index cannot be used, which is reported on stderr. ``coming``: the character's first
        training is about to prepare it, so an index not there yet needs no report."""
        if config.canon.k == 0:
            return None
        if coming and not canon_path(pairs_path(config)).exists():
            return None
        try:
            index = CanonIndex.load(canon_path(pairs_path(config)))
        except UserError as exc:
            print(f"rolebot: {exc}; serving without canon until then", file=sys.stderr, flush=True)
            return None
        log.info("canon: %d exchanges from %s", len(index), index.path)
        return cls(index, config, registry)

    def format_for(self, version: str | None) -> tuple[int, int]:
        """(k, max_tokens) for a version: what its meta.json says it learned, else the config's."""
        if version not in self._formats:
            try:
                meta = self.registry.get(version).meta if version else None
            except UserError:  # not a version of this store (a remote server's model name)
                meta = None
            self._formats[version] = served_canon(meta, self.config.canon.k, self.config.canon.max_tokens)
        return self._formats[version]

    def lookup(self, text: str, version: str | None, count_tokens: Callable[[str], int]) -> tuple[Canon, ...]:
        """The exchanges most like ``text`` that fit the canon's token share, best first."""
        k, max_tokens = self.format_for(version)
        found = self.index.search(text, k)
        return fit(found, self.config.character.name, max_tokens, count_tokens)
