"""Which pairs files to train on: the configured ones, or pairs prepared from the script."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bot.config import Config
from training.canon import canon_path
from training.pairs import Character, PrepareRequest, prepare, validation_path
from training.screenplay import SAMPLE_SCRIPT


@dataclass(frozen=True)
class DatasetFiles:
    train: Path
    val: Path | None

    @property
    def canon(self) -> Path:
        """The canon index ``rolebot prepare`` wrote beside the training pairs."""
        return canon_path(self.train)


def dataset_files(config: Config, *, quiet: bool = False) -> DatasetFiles:
    """``[training] data`` if set; else the character's script (or the project's sample
    script) prepared once into ``data/<character>.json`` (and its canon index) with the last
    episode held out and identity pairs (``training.identity``) from the character's persona."""
    if config.training.data:
        return DatasetFiles(config.path(config.training.data), config.path(config.training.val) if config.training.val else None)
    output = pairs_path(config)
    val = validation_path(output)
    if output.exists() and val.exists() and canon_path(output).exists():
        return DatasetFiles(output, val)
    scripts = tuple(config.path(s) for s in config.character.script) or (SAMPLE_SCRIPT,)
    report = prepare(PrepareRequest(
        scripts=scripts,
        character=Character(config.character.name, tuple(config.character.aliases)),
        output=output,
        val_episodes=1,
        persona=config.character.persona,
    ))
    if not quiet:
        print(report.render("alpaca"))
    return DatasetFiles(output, val)


def pairs_path(config: Config) -> Path:
    """The training pairs file: ``[training] data``, else ``data/<character>.json``."""
    return config.path(config.training.data or f"data/{config.character.name}.json")
