"""What every backend gives the service: the ``Engine`` interface and its typed status."""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Sequence
from typing import Protocol

from bot.config import Config, GenerationSettings
from bot.engine.pace import Forecast
from bot.engine.stream import ReplyStream
from training.errors import UserError
from training.hygiene import Hygiene, ReplyFilter
from training.prompts import USER_SPEAKER, Sample
from training.registry import Registry, Version


@dataclass(frozen=True)
class EngineStatus:
    """What /status and the admin API show of the engine."""

    backend: str  # "local" | "openai"
    device: str
    model: str
    adapter_version: str | None
    batching: str  # how requests share the model, in words
    queue_depth: int  # submitted, not yet generating
    generating: int  # replies being generated now
    replies_served: int
    tokens_generated: int
    largest_batch: int  # most replies generated together so far
    adapter_swaps: int
    last_swap_ms: float | None
    starting: int = 0  # submitted replies without a first token yet (waiting, or in their prefill)
    prefills: int = 0  # chats' next prompt starts computed ahead (``Engine.prefill``)
    prompt_tokens: int = 0  # prompt tokens of the replies submitted so far
    prompt_tokens_cached: int = 0  # of those, read from cached prompt blocks instead of computed


class Engine(Protocol):
    adapter_version: str | None
    max_prompt_tokens: int
    max_batch_size: int  # rows generated together ([generation] max_batch_size, auto settled)
    hygiene: Hygiene  # what every reply is cleaned of (the app adds the script's speakers)

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def count_tokens(self, text: str) -> int: ...
    def render(self, sample: Sample, *, history_first: bool | None = None, prefix: bool = False) -> str: ...
    def prefill(self, prompt: str) -> bool: ...
    def forecast(self, max_new_tokens: int, ahead: Sequence[int] = ()) -> Forecast | None: ...
    def generate(self, prompt: str, sampling: GenerationSettings | None = None) -> ReplyStream: ...
    async def swap_adapter(self, version: Version | None) -> None: ...
    def status(self) -> EngineStatus: ...


def make_engine(config: Config, version: Version | None) -> Engine:
    """The engine ``[engine] backend`` names, serving ``version`` (None: the base model)."""
    if config.engine.backend == "openai":
        from bot.engine.remote import OpenAIEngine

        return OpenAIEngine(config, version)
    from bot.engine.local import LocalEngine

    return LocalEngine(config, version)


def make_engines(config: Config, versions: dict[str, Version | None]) -> tuple[Engine, dict[str, Engine]]:
    """The engine to start and close, and each cast member's engine (by name) serving its
    version. A cast of one is the engine itself; a larger cast shares one base model with an
    adapter per character (bot/engine/cast.py), or asks the OpenAI-compatible server for each
    character's adapter by name."""
    if len(versions) == 1:
        (name, version), = versions.items()
        engine = make_engine(config.for_character(name), version)
        return engine, {name: engine}
    if config.engine.backend == "openai":
        from bot.engine.remote import OpenAIEngine, RemoteCast

        engines = {name: OpenAIEngine(config.for_character(name), version) for name, version in versions.items()}
        return RemoteCast(engines), engines
    from bot.engine.cast import CastEngine

    engine = CastEngine(config, versions)
    return engine, dict(engine.voices)


def hygiene_for(config: Config) -> Hygiene:
    """The character's reply hygiene: [generation] stop, its names, the user's label, the persona.
    The script's other speakers join once the canon index is loaded (``bot.app``)."""
    character = config.character
    return Hygiene(stops=tuple(config.generation.stop), names=(character.name, *character.aliases),
                   speakers=(USER_SPEAKER,), persona=character.persona)


def reply_filter(hygiene: Hygiene, gen: GenerationSettings) -> ReplyFilter:
    """The filter of one reply: the engine's hygiene with this request's stop strings."""
    return ReplyFilter(replace(hygiene, stops=tuple(gen.stop)))


def active_version(config: Config) -> Version | None:
    return Registry(config.adapter_root, config.character.name).active()


def prompt_budget(config: Config) -> int:
    budget = config.model.max_seq_length - config.generation.max_new_tokens
    if budget < 16:
        raise UserError(f"[generation] max_new_tokens = {config.generation.max_new_tokens} leaves no room for a "
                        f"prompt in [model] max_seq_length = {config.model.max_seq_length}; lower the first or raise the second")
    return budget
