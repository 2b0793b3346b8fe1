"""The model host, as a package of small parts (one idea per module):

- ``base``: the ``Engine`` interface every backend gives the service, ``EngineStatus``, ``make_engine``;
- ``stream``: one reply as a stream of text pieces, its incremental decoding and stop strings;
- ``local``: the model in this process on transformers' continuous batching;
- ``model``: loading the serving copy of the model (plain transformers + bitsandbytes + PEFT);
- ``penalty``: the per-request repetition penalty continuous batching lacks;
- ``swap``: adapter hot-swap, planned beside generation and applied between steps;
- ``remote``: the OpenAI-compatible backend (e.g. vLLM with LoRA modules).
"""

from bot.engine.base import Engine, EngineStatus, active_version, make_engine, prompt_budget
from bot.engine.stream import IncrementalDecoder, ReplyStats, ReplyStream

__all__ = ["Engine", "EngineStatus", "IncrementalDecoder", "ReplyStats", "ReplyStream",
           "active_version", "make_engine", "prompt_budget"]
