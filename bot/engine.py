"""The model host: loads the base and the active adapter once and generates replies.

``LocalEngine`` hosts the model in this process and generates the requests that arrive
together as one batch, each with its own token stream; ``OpenAIEngine`` sends each request to an
OpenAI-compatible server (e.g. vLLM with LoRA modules). Both give the service the same
``Engine`` interface, and ``make_engine`` picks one from ``[engine] backend``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from bot.config import Config, GenerationSettings, secret
from training.errors import UserError
from training.packing import PromptStyle
from training.prompts import Sample
from training.registry import Registry, Version

log = logging.getLogger(__name__)


def active_version(config: Config) -> Version | None:
    return Registry(config.adapter_root, config.character.name).active()


def load_model(config: Config, version: Version | None):
    """Base plus the given adapter version, in Unsloth's inference mode."""
    from training.modeling import load_for_inference

    return load_for_inference(config.model, str(version.path) if version else None)


def sampling_kwargs(gen: GenerationSettings, tokenizer) -> dict:
    kwargs = {
        "max_new_tokens": gen.max_new_tokens,
        "repetition_penalty": gen.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if gen.temperature > 0:
        kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:
        kwargs.update(do_sample=False)
    if gen.stop:
        kwargs.update(stop_strings=list(gen.stop), tokenizer=tokenizer)
    return kwargs


class StopFilter:
    """Holds back text that could be the start of a stop string, and ends at one.

    ``generate(stop_strings=...)`` stops the model, but the stop string itself has already
    been produced; the user must never see it.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.done = False

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        self.buffer += text
        for stop in self.stops:
            at = self.buffer.find(stop)
            if at >= 0:
                self.done = True
                out, self.buffer = self.buffer[:at], ""
                return out
        keep = max((k for s in self.stops for k in range(len(s), 0, -1) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.done else self.buffer), ""
        return out


@dataclass(frozen=True)
class ReplyStats:
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None  # seconds from submit to the first text piece
    total_s: float
    adapter_version: str | None  # the version that generated this whole reply
    finish_reason: str  # "stop" | "length" | "interrupted" | "error"


class ReplyStream:
    """One reply: iterate it (``async for piece in stream``) for its text pieces.

    Stop strings are never shown. When iteration ends ``stats`` says why and how fast; a reply
    that failed ends with ``finish_reason == "error"`` and ``error`` set, rather than raising,
    so a front-end can always show what arrived. Leaving the loop early cancels the reply.
    """

    def __init__(self, prompt_tokens: int, adapter_version: str | None, on_cancel: Callable[[], None] = lambda: None):
        self.prompt_tokens = prompt_tokens
        self.adapter_version = adapter_version
        self.stats: ReplyStats | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.cancelled = False  # read by the generation thread, so a plain attribute
        self._on_cancel = on_cancel
        self._pieces: asyncio.Queue[str | ReplyStats] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating this reply (e.g. the user left); it ends with "interrupted"."""
        if self.stats is None and not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._pieces.get()
                if isinstance(item, ReplyStats):
                    return
                yield item
        finally:
            if self.stats is None:
                self.cancel()

    async def text(self) -> str:
        """The whole reply, for callers that do not stream."""
        return "".join([piece async for piece in self])

    # Called on the event loop's thread only.
    def _put(self, piece: str) -> None:
        if self.stats is None and piece:
            self._pieces.put_nowait(piece)

    def _finish(self, stats: ReplyStats, error: str | None = None) -> None:
        if self.stats is None:
            self.stats, self.error = stats, error
            self._pieces.put_nowait(stats)

    def _end_now(self, reason: str, error: str | None = None) -> ReplyStream:
        self._finish(ReplyStats(self.prompt_tokens, 0, None, time.perf_counter() - self.submitted,
                                self.adapter_version, reason), error)
        return self


class Engine(Protocol):
    adapter_version: str | None
    max_prompt_tokens: int

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def count_tokens(self, text: str) -> int: ...
    def render(self, sample: Sample) -> str: ...
    def generate(self, prompt: str, sampling: GenerationSettings | None = None) -> ReplyStream: ...
    async def swap_adapter(self, version: Version | None) -> None: ...
    def status(self) -> dict: ...


def make_engine(config: Config, version: Version | None) -> Engine:
    """The engine ``[engine] backend`` names, serving ``version`` (None: the base model)."""
    if config.engine.backend == "openai":
        return OpenAIEngine(config, version)
    return LocalEngine(config, version)


def prompt_budget(config: Config) -> int:
    budget = config.model.max_seq_length - config.generation.max_new_tokens
    if budget < 16:
        raise UserError(f"[generation] max_new_tokens = {config.generation.max_new_tokens} leaves no room for a "
                        f"prompt in [model] max_seq_length = {config.model.max_seq_length}; lower the first or raise the second")
    return budget


class IncrementalDecoder:
    """Turns one reply's token ids into text pieces without splitting a multi-byte character.

    Byte-level tokenizers spread one character over several tokens; decoding a token alone gives
    U+FFFD. A piece is released only once its text no longer ends in U+FFFD, and each piece is
    decoded together with the tokens before it so that word-boundary spaces come out right.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window decoded with each new token
        self.read = 0  # tokens already turned into released text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):].rstrip("\ufffd")


# --------------------------------------------------------------------------------------------
# The local engine: the model in this process, one generation thread, batches of requests.


# Before starting a batch the generation thread waits until no request has arrived for
# GATHER_QUIET_S, and never longer than GATHER_MAX_S.
GATHER_QUIET_S = 0.004
GATHER_MAX_S = 0.05


def _sampling_key(gen: GenerationSettings) -> tuple:
    """Requests with equal keys can share a batch (max_new_tokens and stops are per row)."""
    if gen.temperature > 0:
        return ("sample", gen.temperature, gen.top_p, gen.repetition_penalty)
    return ("greedy", gen.repetition_penalty)


@dataclass(eq=False)
class _Request:
    stream: ReplyStream
    ids: list[int]
    gen: GenerationSettings
    decoder: IncrementalDecoder
    stops: StopFilter
    tokens: int = 0
    first_s: float | None = None
    finish: str | None = None


@dataclass(eq=False)
class _Swap:
    """A marker in the request queue: everything before it runs on the old adapter."""

    version: Version | None
    plan: tuple
    done: asyncio.Future
    previous: str | None


@dataclass
class _Counters:
    batches: int = 0
    replies: int = 0
    tokens: int = 0
    swaps: int = 0
    largest_batch: int = 0
    last_swap_ms: float | None = None


class LocalEngine:
    """Hosts the base model and the active adapter; batches concurrent requests.

    One thread owns the model. Requests queue in arrival order; the thread takes everything
    waiting (up to ``[generation] max_batch_size``, same sampling settings) and generates it as
    one left-padded ``model.generate`` batch. A stopping criterion sees every step's tokens,
    decodes each row incrementally, pushes the text to that row's stream on the event loop,
    and ends the row at EOS, a stop string, its ``max_new_tokens`` or a cancel; finished rows
    stop streaming while the rest of the batch goes on. On CUDA the decode steps are replayed as
    Unsloth's CUDA graphs.

    Why not transformers' continuous batching: on the CPU it was slower than one padded batch
    (DESIGN.md), and on CUDA Unsloth's loading path replaces the Llama attention and forward
    with its own, which keep their own KV buffers and never consult the paged cache that
    continuous batching passes in.

    A swap is a marker in the same queue: the thread finishes the batch in progress, copies
    the new version's LoRA tensors into the loaded ones (same shapes: in place, so captured
    CUDA graphs stay valid) or loads it as a new PEFT adapter and drops the old one, then goes
    on with the requests that arrived after the swap began.
    """

    backend = "local"

    def __init__(self, config: Config, version: Version | None):
        self.config = config
        self.max_prompt_tokens = prompt_budget(config)
        self.adapter_version = version.name if version else None
        self.model = self.tokenizer = None
        self._initial = version
        self._style = PromptStyle(config.model.prompt_format, config.character.persona, config.character.name)
        self._special = config.model.prompt_format != "chat"  # as training tokenises prompts
        self._queue: deque[_Request | _Swap] = deque()
        self._wake = threading.Condition()
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer must not be used by two threads at once
        self._swap_lock = asyncio.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: list[_Request] = []
        self._closing = False
        self._peft_name: str | None = None
        self._eos: set[int] = set()
        self._device = None
        self.counters = _Counters()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (in a thread: it takes seconds to minutes) and start generating."""
        from training.modeling import device

        self._loop = asyncio.get_running_loop()
        self.model, self.tokenizer = await asyncio.to_thread(load_model, self.config, self._initial)
        self._device = device()
        self._peft_name = "default" if self._initial else None
        # Every batch passes max_new_tokens; a max_length left in the generation config (Unsloth's
        # CUDA loader sets the context size) would only make transformers warn on every batch.
        self.model.generation_config.max_length = None
        eos = self.tokenizer.eos_token_id
        config_eos = getattr(self.model.generation_config, "eos_token_id", None)
        self._eos = {i for i in ([eos] + (config_eos if isinstance(config_eos, list) else [config_eos])) if i is not None}
        self._thread = threading.Thread(target=self._work, name="rolebot-generate", daemon=True)
        self._thread.start()
        log.info("engine: %s on %s, adapter %s", self.config.model.base, self._device.name, self.adapter_version or "none")

    async def close(self) -> None:
        """Stop: replies waiting or in progress end with "interrupted"; the model is released."""
        if self._thread is None:
            return
        with self._wake:
            self._closing = True
            waiting, self._queue = list(self._queue), deque()
            for row in self._running:
                row.stream.cancelled = True
            self._wake.notify()
        for item in waiting:
            if isinstance(item, _Swap):
                _settle(item.done, RuntimeError("the engine closed before the swap"))
            else:
                item.stream._end_now("interrupted")
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self.model = None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- prompts ---------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, sample: Sample) -> str:
        with self._tokenizer_lock:
            return self._style.prompt(sample, self.tokenizer)

    # -- requests --------------------------------------------------------------------------

    def generate(self, prompt: str, sampling: GenerationSettings | None = None) -> ReplyStream:
        """Queue one reply; it is generated with whatever else is waiting when its turn comes."""
        if self._thread is None and not self._closing:
            raise RuntimeError("LocalEngine.generate before start()")
        gen = sampling or self.config.generation
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt, add_special_tokens=self._special)["input_ids"]
        stream = ReplyStream(len(ids), self.adapter_version, self._kick)
        if self._closing:
            return stream._end_now("interrupted")
        if len(ids) + gen.max_new_tokens > self.config.model.max_seq_length:
            return stream._end_now("error", f"the prompt has {len(ids)} tokens and the reply may take "
                                   f"{gen.max_new_tokens}: more than [model] max_seq_length "
                                   f"{self.config.model.max_seq_length}; keep prompts within max_prompt_tokens")
        request = _Request(stream, ids, gen, IncrementalDecoder(self.tokenizer), StopFilter(gen.stop))
        with self._wake:
            self._queue.append(request)
            self._wake.notify()
        return stream

    def _kick(self) -> None:
        """A cancel: wake the thread so a queued request is dropped without waiting its turn."""
        with self._wake:
            self._wake.notify()

    async def swap_adapter(self, version: Version | None) -> None:
        """Make ``version`` (None: the base model) serve every request submitted from now on.

        Its files are read and checked first, while generation goes on; a bad version raises
        here and changes nothing. Replies submitted earlier finish on the old adapter.
        """
        async with self._swap_lock:
            plan = await asyncio.to_thread(self._plan_swap, version)
            swap = _Swap(version, plan, self._loop.create_future(), self.adapter_version)
            with self._wake:
                if self._closing:
                    raise RuntimeError("the engine is closing")
                self._queue.append(swap)
                self.adapter_version = version.name if version else None
                self._wake.notify()
            await swap.done

    def status(self) -> dict:
        with self._wake:
            waiting = sum(isinstance(item, _Request) for item in self._queue)
            running = len(self._running)
        return {
            "backend": self.backend,
            "device": self._device.name if self._device else "not started",
            "model": self.config.model.base,
            "adapter_version": self.adapter_version,
            "batching": "padded batches" + (", CUDA-graph decode" if self._graphs_possible() else ""),
            "queue_depth": waiting,
            "generating": running,
            "batches_served": self.counters.batches,
            "replies_served": self.counters.replies,
            "tokens_generated": self.counters.tokens,
            "largest_batch": self.counters.largest_batch,
            "adapter_swaps": self.counters.swaps,
            "last_swap_ms": self.counters.last_swap_ms,
        }

    # -- the generation thread ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                self._drop_cancelled()
                while not self._queue and not self._closing:
                    self._wake.wait()
                    self._drop_cancelled()
                if self._closing:
                    return
                head = self._queue[0]
                if isinstance(head, _Request):
                    self._gather()
                    head = self._queue[0] if self._queue else None
                if head is None or self._closing:
                    continue
                if isinstance(head, _Swap):
                    self._queue.popleft()
                    batch = None
                else:
                    batch = self._take_batch()
                    self._running = batch
            if batch is None:
                self._apply_swap(head)
            else:
                try:
                    self._generate(batch)
                finally:
                    with self._wake:
                        self._running = []

    def _gather(self) -> None:
        """Wait while requests keep arriving (briefly): messages that arrive together share one
        batch instead of the first starting alone and the rest waiting for it to finish."""
        now = time.perf_counter()
        deadline, quiet = now + GATHER_MAX_S, now + GATHER_QUIET_S
        seen = len(self._queue)
        while seen < self.config.generation.max_batch_size and not self._closing:
            now = time.perf_counter()
            if now >= min(deadline, quiet):
                break
            self._wake.wait(min(deadline, quiet) - now)
            if len(self._queue) != seen:
                seen, quiet = len(self._queue), time.perf_counter() + GATHER_QUIET_S
        self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        keep = deque()
        for item in self._queue:
            if isinstance(item, _Request) and item.stream.cancelled:
                self._deliver([(item.stream, "", self._stats(item, "interrupted"))])
            else:
                keep.append(item)
        self._queue = keep

    def _take_batch(self) -> list[_Request]:
        """The waiting requests up to the next swap marker that share the first one's sampling."""
        key = _sampling_key(self._queue[0].gen)
        batch, rest = [], deque()
        limit = self.config.generation.max_batch_size
        blocked = False
        for item in self._queue:
            blocked = blocked or isinstance(item, _Swap)
            if not blocked and len(batch) < limit and _sampling_key(item.gen) == key:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        return batch

    def _generate(self, batch: list[_Request]) -> None:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(r.ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, width - len(row.ids):] = torch.tensor(row.ids)
            mask[i, width - len(row.ids):] = 1
        kwargs = sampling_kwargs(batch[0].gen, self.tokenizer)
        kwargs.pop("stop_strings", None)
        kwargs.pop("tokenizer", None)
        kwargs["max_new_tokens"] = max(r.gen.max_new_tokens for r in batch)
        rows = _RowStreams(self, batch)
        self.counters.batches += 1
        self.counters.largest_batch = max(self.counters.largest_batch, len(batch))
        try:
            with self._graph_scope():
                self.model.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                    stopping_criteria=[rows], **kwargs)
            rows.end_all("length")
        except Exception as exc:
            log.exception("engine: a batch of %d failed", len(batch))
            rows.end_all("error", f"{type(exc).__name__}: {exc}")

    def _graphs_possible(self) -> bool:
        return self._device is not None and self._device.kind == "cuda"

    def _graph_scope(self):
        """Unsloth replays its decode step as CUDA graphs (bit for bit the eager step) inside this
        scope, on this thread only; UNSLOTH_DECODE_CUDA_GRAPHS=0 still turns it off."""
        import contextlib

        if not self._graphs_possible():
            return contextlib.nullcontext()
        try:
            from unsloth.models import _decode_graphs
        except ImportError:
            return contextlib.nullcontext()
        return _decode_graphs.rl_generation()

    def _stats(self, row: _Request, reason: str) -> ReplyStats:
        return ReplyStats(len(row.ids), row.tokens, row.first_s, time.perf_counter() - row.stream.submitted,
                          row.stream.adapter_version, reason)

    def _deliver(self, items: list[tuple[ReplyStream, str, ReplyStats | None]], error: str | None = None) -> None:
        """Hand one step's pieces to the event loop in one call."""

        def run() -> None:
            for stream, piece, stats in items:
                stream._put(piece)
                if stats is not None:
                    stream._finish(stats, error if stats.finish_reason == "error" else None)

        if items:
            try:
                self._loop.call_soon_threadsafe(run)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                self._closing = True

    # -- adapters ----------------------------------------------------------------------------

    def _plan_swap(self, version: Version | None) -> tuple:
        """Read and check a version without touching the model. Runs beside generation."""
        if version is None:
            return ("off",)
        from peft import PeftConfig, PeftModel
        from peft.utils import load_peft_weights

        try:
            new_config = PeftConfig.from_pretrained(str(version.path))
            weights = load_peft_weights(str(version.path), device="cpu")
        except (OSError, ValueError) as exc:
            raise UserError(f"{version.path}: cannot read adapter version {version.name}: {exc}") from None
        if isinstance(self.model, PeftModel) and self._peft_name:
            old = self.model.peft_config[self._peft_name]
            same = all(getattr(old, k, None) == getattr(new_config, k, None)
                       for k in ("r", "lora_alpha", "use_rslora", "use_dora", "bias", "modules_to_save"))
            same = same and set(old.target_modules or ()) == set(new_config.target_modules or ())
            # Saved keys are the parameter names without the adapter's name.
            tag = f".{self._peft_name}."
            loaded = {name.replace(tag, "."): p for name, p in self.model.named_parameters()
                      if "lora_" in name and tag in name}
            same = same and loaded.keys() == weights.keys() and all(loaded[k].shape == weights[k].shape for k in weights)
            if same:
                # Staged on the model's device now, so that the swap itself is a device copy.
                return ("copy", [(loaded[k], t.to(loaded[k].device, loaded[k].dtype)) for k, t in weights.items()])
        return ("load", str(version.path))

    def _apply_swap(self, swap: _Swap) -> None:
        import torch

        started = time.perf_counter()
        try:
            kind = swap.plan[0]
            with torch.no_grad():
                if kind == "off":
                    self._adapters(False)
                elif kind == "copy":
                    self._copy_weights(swap.plan[1])
                    self._adapters(True)
                else:
                    self._load_adapter(swap.plan[1])
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            log.exception("engine: swapping to %s failed; keeping %s", swap.version and swap.version.name, swap.previous)
            with self._wake:
                self.adapter_version = swap.previous
                for item in self._queue:  # queued behind the marker and not started: they run on the old one
                    if isinstance(item, _Request):
                        item.stream.adapter_version = swap.previous
            self._loop.call_soon_threadsafe(_settle, swap.done, exc)
            return
        self.counters.swaps += 1
        self.counters.last_swap_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info("engine: now serving %s (%s, %.0f ms)", swap.version.name if swap.version else "the base model",
                 kind, self.counters.last_swap_ms)
        self._loop.call_soon_threadsafe(_settle, swap.done, None)

    @staticmethod
    def _copy_weights(pairs: list) -> None:
        """Copy into the loaded tensors: same addresses, so captured CUDA graphs read the new
        values (and the version counters Unsloth's caches key on move on)."""
        for param, value in pairs:
            param.copy_(value)

    def _load_adapter(self, path: str) -> None:
        """A version of another shape: a new PEFT adapter beside the old one, then the old is dropped."""
        from peft import PeftModel

        from training.modeling import attach_adapter, unsloth

        name = f"v{self.counters.swaps + 1}"
        old = self._peft_name
        self.model = attach_adapter(self.model, path, name=name)
        if old is not None and isinstance(self.model, PeftModel):
            self.model.set_adapter(name)
            self.model.delete_adapter(old)
        self._peft_name = name
        self._adapters(True)
        unsloth().for_inference(self.model)

    def _adapters(self, on: bool) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            if on:
                self.model.base_model.enable_adapter_layers()
            else:
                self.model.base_model.disable_adapter_layers()


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _RowStreams:
    """A stopping criterion that is really the per-row streamer of one batch.

    ``generate`` calls it after every step with all the tokens so far; it returns which rows are
    done, so finished rows stop (EOS, stop string, their own max_new_tokens, cancel) while the
    batch goes on.
    """

    def __init__(self, engine: LocalEngine, rows: list[_Request]):
        self.engine = engine
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tokens = input_ids[:, -1].tolist()
        out: list[tuple[ReplyStream, str, ReplyStats | None]] = []
        now = time.perf_counter()
        with self.engine._tokenizer_lock:
            for row, token in zip(self.rows, tokens):
                if row.finish is None:
                    out.extend(self._step(row, token, now))
        self.engine._deliver(out)
        return torch.tensor([row.finish is not None for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _step(self, row: _Request, token: int, now: float) -> list:
        if row.stream.cancelled:
            return [self._end(row, "interrupted")]
        if token in self.engine._eos:
            return [self._end(row, "stop")]
        row.tokens += 1
        piece = row.stops.feed(row.decoder.push(token))
        if piece and row.first_s is None:
            row.first_s = now - row.stream.submitted
        if row.stops.done:
            return [(row.stream, piece, None), self._end(row, "stop")]
        if row.tokens >= row.gen.max_new_tokens:
            return [(row.stream, piece, None), self._end(row, "length")]
        return [(row.stream, piece, None)] if piece else []

    def _end(self, row: _Request, reason: str) -> tuple:
        """Finish a row: release what the decoder and the stop filter still hold."""
        tail = "" if row.stops.done or reason == "interrupted" else row.stops.feed(row.decoder.flush()) + row.stops.flush()
        if tail and row.first_s is None:
            row.first_s = time.perf_counter() - row.stream.submitted
        row.finish = reason
        self.engine.counters.replies += 1
        self.engine.counters.tokens += row.tokens
        return (row.stream, tail, self.engine._stats(row, reason))

    def end_all(self, reason: str, error: str | None = None) -> None:
        """After ``generate`` returns (or fails): finish every row still open."""
        with self.engine._tokenizer_lock:
            out = [self._end(row, reason) for row in self.rows if row.finish is None]
        self.engine._deliver(out, error)


# --------------------------------------------------------------------------------------------
# The OpenAI-compatible backend: a server (e.g. vLLM) does the generating.


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
        self._style = PromptStyle(config.model.prompt_format, config.character.persona, config.character.name)
        self._tasks: set[asyncio.Task] = set()
        self.counters = _Counters()

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
        if self.tokenizer is None and self.config.model.prompt_format == "chat":
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

    def render(self, sample: Sample) -> str:
        return self._style.prompt(sample, self.tokenizer)

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

    async def _complete(self, stream: ReplyStream, prompt: str, gen: GenerationSettings, model: str) -> None:
        import openai

        stops = StopFilter(gen.stop)
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
        self.counters.replies += 1
        self.counters.tokens += tokens or pieces
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

    def status(self) -> dict:
        return {
            "backend": self.backend,
            "device": f"server {self.config.engine.base_url}",
            "model": self.model_name,
            "adapter_version": self.adapter_version,
            "batching": "the server's",
            "queue_depth": 0,
            "generating": len(self._tasks),
            "batches_served": 0,
            "replies_served": self.counters.replies,
            "tokens_generated": self.counters.tokens,
        }


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
