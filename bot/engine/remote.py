"""The OpenAI-compatible backend: a server (e.g. vLLM with LoRA modules) does the generating."""

from __future__ import annotations

import asyncio
import logging
import time

from bot.config import Config, GenerationSettings, secret
from bot.engine.base import EngineStatus, hygiene_for, prompt_budget, reply_filter
from bot.engine.pace import Forecast, batch_rows
from bot.engine.stream import ReplyStats, ReplyStream
from training.errors import UserError
from training.prompts import Sample
from training.registry import Version

log = logging.getLogger(__name__)



class OpenAIEngine:
    """Streams completions from an OpenAI-compatible server with the official ``openai`` client.

    The prompt is rendered here, in the configured format, and sent to ``/v1/completions``. The
    model asked for is ``[engine] model`` if set, else the adapter version's name (vLLM serves
    each LoRA module under its own name: ``--lora-modules v0003=adapters/甄嬛/v0003``), else the
    base model's name. Every request runs on the server as it arrives; batching is the server's.
    """

    backend = "openai"

    def __init__(self, config: Config, version: Version | None):
        self.config = config
        self.max_prompt_tokens = prompt_budget(config)
        self.version = version
        self.tokenizer = None
        self.client = None
        self._style = config.prompt_style()
        self.hygiene = hygiene_for(config)
        self._tasks: set[asyncio.Task] = set()
        self._warming: set[asyncio.Task] = set()  # of those, prefills
        self.replies = 0
        self.prefills = 0
        self.tokens = 0
        self.swaps = 0
        # The server batches as it will; this bounds what rolebot sends it at once.
        self.max_batch_size = batch_rows(config.generation.max_batch_size, "cuda")

    @property
    def adapter_version(self) -> str | None:
        """The version named in requests; None when [engine] model fixes the name."""
        return None if self.config.engine.model else (self.version.name if self.version else None)

    @property
    def model_name(self) -> str:
        return self.config.engine.model or (self.version.name if self.version else self.config.model.base)

    async def start(self) -> None:
        from openai import AsyncOpenAI

        self.tokenizer = await asyncio.to_thread(_local_tokenizer, self.config)
        if self.tokenizer is None and self.config.prompt_style().fmt == "chat":
            raise UserError(f"[model] prompt_format = 'chat' needs the tokenizer of {self.config.model.base!r}, which is "
                            "not on this machine; download it or use prompt_format = 'alpaca'")
        self.client = AsyncOpenAI(
            base_url=self.config.engine.base_url,
            api_key=secret(self.config.engine.api_key_env) or "EMPTY",  # vLLM without --api-key accepts any
            timeout=self.config.engine.timeout,
            max_retries=0,  # a retried stream would repeat text the user already saw
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            # No tokenizer here: over-estimate (a CJK character is often more than one token).
            return len(text.encode("utf-8")) // 2 + 1
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, sample: Sample, *, history_first: bool | None = None, prefix: bool = False) -> str:
        """The prompt of ``sample`` (``PromptStyle.render``)."""
        return self._style.render(sample, self.tokenizer, history_first=history_first, prefix=prefix)

    def generate(self, prompt: str, sampling: GenerationSettings | None = None) -> ReplyStream:
        if self.client is None:
            raise RuntimeError("OpenAIEngine.generate before start()")
        gen = sampling or self.config.generation
        stream = ReplyStream(self.count_tokens(prompt), self.adapter_version)
        task = asyncio.get_running_loop().create_task(self._complete(stream, prompt, gen, self.model_name))
        stream._on_cancel = task.cancel
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before its first step never runs its own handler.
        task.add_done_callback(lambda _: stream._end_now("interrupted"))
        return stream

    def prefill(self, prompt: str) -> bool:
        """Ask the server for one token after ``prompt`` and drop it: a server that caches
        prompt prefixes (vLLM's automatic prefix caching) then holds the start of the chat's
        next prompt. Only with fewer requests in flight than [generation] max_batch_size."""
        if self.client is None or len(self._tasks) >= self.max_batch_size:
            return False
        task = asyncio.get_running_loop().create_task(self._prefill(prompt))
        self._tasks.add(task)
        self._warming.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._warming.discard)
        return True

    async def _prefill(self, prompt: str) -> None:
        try:
            await self.client.completions.create(model=self.model_name, prompt=prompt, max_tokens=1, temperature=0.0)
            self.prefills += 1
        except Exception as exc:  # an optimisation only: the reply itself reports what is wrong
            log.debug("engine: a prefill was not taken: %s", exc)

    async def _complete(self, stream: ReplyStream, prompt: str, gen: GenerationSettings, model: str) -> None:
        import openai

        stops = reply_filter(self.hygiene, gen)
        prompt_tokens, tokens, pieces = stream.prompt_tokens, 0, 0
        first = None
        reason = "error"
        error = None
        try:
            request = {
                "model": model, "prompt": prompt, "max_tokens": gen.max_new_tokens, "stream": True,
                "temperature": gen.temperature, "top_p": gen.top_p,
                "stream_options": {"include_usage": True},
            }
            if gen.stop:
                request["stop"] = list(gen.stop)[:4]  # the OpenAI API takes at most four
            if gen.repetition_penalty != 1.0:
                request["extra_body"] = {"repetition_penalty": gen.repetition_penalty}  # vLLM's extension
            response = await self.client.completions.create(**request)
            reason = "length"
            async for chunk in response:
                if chunk.usage is not None:  # the server's own count, in the last chunk
                    prompt_tokens = chunk.usage.prompt_tokens or prompt_tokens
                    tokens = chunk.usage.completion_tokens or tokens
                for choice in chunk.choices:
                    pieces += 1
                    piece = stops.feed(choice.text or "")
                    if piece and first is None:
                        first = time.perf_counter() - stream.submitted
                    stream._put(piece)
                    if choice.finish_reason:
                        reason = "stop" if choice.finish_reason == "stop" else "length"
                if stops.done:
                    reason = "stop"
                    break
            tail = stops.flush()
            if tail and first is None:
                first = time.perf_counter() - stream.submitted
            stream._put(tail)
        except asyncio.CancelledError:
            reason = "interrupted"
        except openai.OpenAIError as exc:
            reason, error = "error", f"{self.config.engine.base_url}: {exc}"
            log.warning("engine: request to %s failed: %s", self.config.engine.base_url, exc)
        self.replies += 1
        self.tokens += tokens or pieces
        stream._finish(ReplyStats(prompt_tokens, tokens or pieces, first, time.perf_counter() - stream.submitted,
                                  stream.adapter_version, reason), error)

    async def swap_adapter(self, version: Version | None) -> None:
        """Name ``version`` in requests from now on; requests in flight finish on the old name.

        The server must serve it: if ``/v1/models`` does not list it, vLLM's runtime loading
        (``/v1/load_lora_adapter``, enabled by VLLM_ALLOW_RUNTIME_LORA_UPDATING) is asked to load
        it from the version's path, which the server must be able to read.
        """
        import openai

        if self.config.engine.model:
            log.warning("engine: [engine] model = %r is fixed; the server decides which adapter serves it",
                        self.config.engine.model)
        elif version is not None:
            try:
                served = {m.id async for m in self.client.models.list()}
            except openai.OpenAIError as exc:
                log.warning("engine: cannot list the server's models (%s); assuming it serves %s", exc, version.name)
                served = {version.name}
            if version.name not in served:
                try:
                    await self.client.post("/load_lora_adapter", cast_to=str,
                                           body={"lora_name": version.name, "lora_path": str(version.path)})
                except openai.OpenAIError as exc:
                    raise UserError(f"the server at {self.config.engine.base_url} does not serve {version.name} and "
                                    f"could not load it ({exc}); start it with --lora-modules "
                                    f"{version.name}={version.path}") from None
        self.version = version
        self.swaps += 1

    def forecast(self, max_new_tokens: int, ahead=()) -> Forecast | None:
        """None: the server's steps are not seen from here, so every request is admitted."""
        return None

    def status(self) -> EngineStatus:
        return EngineStatus(
            backend=self.backend, device=f"server {self.config.engine.base_url}", model=self.model_name,
            adapter_version=self.adapter_version, batching="the server's", queue_depth=0,
            generating=len(self._tasks) - len(self._warming), replies_served=self.replies, tokens_generated=self.tokens,
            largest_batch=0, adapter_swaps=self.swaps, last_swap_ms=None, prefills=self.prefills,
        )


def _local_tokenizer(config: Config):
    """The base model's tokenizer if this machine has it (for rendering and counting)."""
    from transformers import AutoTokenizer

    from training.builtin import is_builtin, resolve

    try:
        path = resolve(config.model.base, config.model.cache_dir)
        return AutoTokenizer.from_pretrained(path, local_files_only=not is_builtin(config.model.base))
    except (OSError, ValueError, UserError) as exc:
        log.warning("engine: no local tokenizer for %s (%s); token counts are estimates", config.model.base, exc)
        return None


class RemoteCast:
    """A cast on an OpenAI-compatible server: one client per character (each asks for its
    character's adapter by name, as vLLM serves every LoRA module beside the others on one
    base), started and closed together."""

    backend = "openai"

    def __init__(self, engines: dict[str, OpenAIEngine]):
        self.engines = engines

    @property
    def adapter_version(self) -> str | None:
        return next(iter(self.engines.values())).adapter_version

    async def start(self) -> None:
        for engine in self.engines.values():
            await engine.start()

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.close()

    def status(self) -> EngineStatus:
        return next(iter(self.engines.values())).status()
