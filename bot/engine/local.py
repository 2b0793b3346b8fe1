"""The local engine: the model in this process, on transformers' continuous batching.

transformers' ``ContinuousBatchingManager`` owns the scheduling: a paged KV cache, one
generation thread, and at every decode step it admits waiting requests (their prefill joins the
step) and drops finished or cancelled ones, freeing their slots and KV blocks. Prompt blocks
that requests share (the persona) are computed once (``[engine] prefix_sharing``). On CUDA its
steps replay as CUDA graphs, and attention runs on PyTorch's flash kernel over the paged cache
(``bot/engine/attention.py``) instead of transformers' masked paged SDPA. rolebot adds what a chat
needs around it: per-request sampling (temperature, top-p and a repetition penalty each row
carries itself, so different settings share a step), streaming through an incremental decoder
and a stop-string filter on the event loop, cancels, errors that fail their rows but not the
engine, and adapter swaps between steps.

A swap keeps every reply on one version. New requests are held; replies in flight finish on the
old version; then, with no step running, the new version's LoRA tensors are copied into the
loaded ones (addresses unchanged, so captured graphs stay valid), the prompt blocks cached under
the old version are forgotten, and the held requests are admitted. A version of another shape
loads as a new PEFT adapter, and the manager is rebuilt (its graphs were captured of the old).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from bot.config import Config, GenerationSettings
from bot.engine.base import EngineStatus, hygiene_for, prompt_budget, reply_filter
from bot.engine.pace import Forecast, Pace, Work, batch_rows
from bot.engine.stream import IncrementalDecoder, ReplyStats, ReplyStream
from bot.engine.swap import LoadAdapter, SwapPlan, apply_swap, plan_swap
from training.hygiene import ReplyFilter
from training.prompts import Sample
from training.registry import Version

log = logging.getLogger(__name__)

# Greedy decoding is sampling at this temperature: the softmax is one-hot at the argmax unless
# two logits lie within ~1e-5 of each other. The engine samples every row (transformers'
# continuous batching chooses greedy or sampling for the whole batch), so greedy and sampled
# requests share a step.
GREEDY_TEMPERATURE = 1e-5
# Tokens of a prompt block: prefix sharing works in whole blocks, and the persona is ~50-100 tokens.
BLOCK_SIZE = {"cpu": 32, "cuda": 64}
# Tokens one step may carry (prefill chunks plus one per decoding row).
MAX_BATCH_TOKENS = {"cpu": 512, "cuda": 4096}
# Without a GPU the KV cache holds this many tokens per row unless [engine] kv_cache_tokens
# says otherwise; on CUDA, max_seq_length per row within this share of the free GPU memory.
KV_TOKENS_PER_ROW = 512
KV_SHARE_OF_FREE_MEMORY = 0.25


@dataclass
class Tuning:
    """How the manager runs, below what ``[engine]`` configures: the shipped values are the
    measured best (README, engine section); ``bench/serve.py --variant`` sets them by name to
    measure the alternatives."""

    # "auto": PyTorch's flash kernel over the paged cache on CUDA (bot/engine/attention.py),
    # transformers' paged SDPA elsewhere; "sdpa": transformers' paged SDPA everywhere.
    attention: str = "auto"
    # transformers' async batching: the host prepares step n+1 while the GPU runs step n.
    # None: on CUDA with graphs unless the repetition penalty is installed (it refills its
    # buffer between steps, so no step may run ahead).
    async_batching: bool | None = None
    max_batch_tokens: int = 0  # 0: MAX_BATCH_TOKENS
    block_size: int = 0  # 0: BLOCK_SIZE
    # With CUDA graphs each step is padded to these many query / cached tokens (one graph per
    # size); 0: transformers' defaults (64 / 16,384).
    q_padding: int = 0
    kv_padding: int = 0
    # With CUDA graphs, a step that carries more (padded) query tokens than this runs eagerly
    # instead of capturing a graph of its own shape: such a step carries a prefill, is bound by
    # compute rather than by kernel launches, and each new shape's capture (two forwards and the
    # capture, ~0.1-0.3 s for an 8B model) would stall every row in the batch. Prompts grow with
    # each user's history, so new shapes keep coming. 0: capture every shape (transformers').
    # Measured (README, the loop): first tokens before and after a retrain went down, during one
    # (training on the same GPU) up; eager steps lose more to a second process than graphs do.
    graph_max_q: int = 256


@dataclass(eq=False)
class _Reply:
    """One request between ``generate`` and its last piece."""

    rid: str
    stream: ReplyStream
    ids: list[int]
    gen: GenerationSettings
    decoder: IncrementalDecoder
    stops: ReplyFilter
    read: int = 0  # generated tokens already consumed from the manager's outputs
    tokens: int = 0
    first_s: float | None = None
    admitted: bool = False
    slot: int = -1  # the cast member's adapter slot (bot/engine/cast.py); -1: the engine's own adapter


class _Finished:
    """A prefill's output when the manager would not take it."""

    error = "not accepted"

    @staticmethod
    def is_finished() -> bool:
        return True


@dataclass
class _Counters:
    replies: int = 0
    tokens: int = 0
    swaps: int = 0
    last_swap_ms: float | None = None
    prefills: int = 0
    prompt_tokens: int = 0
    cached_before: int = 0  # prompt tokens reused by the managers replaced so far


def _cached_tokens(manager) -> int:
    """Prompt tokens a manager has read from cached blocks instead of computing them."""
    processor = manager.batch_processor if manager is not None else None
    return getattr(processor.cache, "_total_prefix_length", 0) if processor is not None else 0


def step_io(runner):
    """The inputs of the step ``runner`` (transformers' ``ModelRunner``) computes now: with async
    batching, the device side of the current IO pair (it keys the CUDA graphs)."""
    io = runner.inputs_and_outputs
    return io.io_pairs[io.current_pair].device_io if hasattr(io, "io_pairs") else io


def _graph_small_steps_only(runner, max_q: int) -> None:
    """Make ``runner`` replay or capture CUDA graphs only for steps of at most ``max_q`` padded
    query tokens; larger steps run eagerly (``Tuning.graph_max_q``)."""
    choose = runner._get_forward_fn

    def forward_fn(use_block_table: bool):
        fn, use_graph = choose(use_block_table)
        return fn, use_graph and step_io(runner).num_q_tokens <= max_q

    runner._get_forward_fn = forward_fn


def _manager_class(graph_max_q: int = 0):
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    class StepGuardedManager(ContinuousBatchingManager):
        """transformers' manager with two guarantees rolebot needs: a step holds ``step_lock``
        (so a swap can run between steps), and a step that raises fails the rows it carried
        instead of stopping the engine (the library treats every step error as fatal)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_lock = threading.Lock()
            self.largest_batch = 0
            self.pace: Pace | None = None  # told every step's time, rows and query tokens
            self._step_size = (0, 0)

        def _create_batch_processor(self):
            processor = super()._create_batch_processor()
            if graph_max_q:
                _graph_small_steps_only(processor.model_runner, graph_max_q)
            return processor

        def _generation_step(self) -> None:
            processor = self.batch_processor
            self._step_size = (len(processor.scheduler.active_requests), step_io(processor.model_runner).num_q_tokens)
            with self.step_lock:
                super()._generation_step()
            self.largest_batch = max(self.largest_batch, len(self.batch_processor.scheduler.active_requests))

        def _generation_loop_body(self, batch_processor, bootstrapping: bool) -> bool:
            steps, started = self.current_batch, time.perf_counter()
            try:
                return super()._generation_loop_body(batch_processor, bootstrapping)
            except Exception as exc:
                log.exception("engine: a generation step failed; its replies end with an error")
                batch_processor.handle_batch_error(exc)
                return True
            finally:
                if self.pace is not None and self.current_batch != steps:  # a step ran, not a wait
                    self.pace.record(time.perf_counter() - started, *self._step_size)

    return StepGuardedManager


class LocalEngine:
    """Hosts the base model and the active adapter; every request joins the running batch."""

    backend = "local"

    def __init__(self, config: Config, version: Version | None, tuning: Tuning | None = None):
        self.config = config
        self.tuning = tuning or Tuning()
        self.max_prompt_tokens = prompt_budget(config)
        self.adapter_version = version.name if version else None
        self.model = self.tokenizer = None
        self._initial = version
        self._style = config.prompt_style()
        self.hygiene = hygiene_for(config)
        self._special = config.prompt_style().fmt != "chat"  # as training tokenises prompts
        self._tokenizer_lock = threading.RLock()  # a fast tokenizer must not be used by two threads at once
        self._swap_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._manager = None
        self._adapter_name: str | None = None
        self._live: dict[str, _Reply] = {}  # admitted to the manager, not finished
        self._warming: set[str] = set()  # prefills (``prefill``) in the manager, not finished
        self._block = BLOCK_SIZE["cpu"]
        self._held: deque[_Reply] = deque()  # waiting for a swap to finish
        self._swapping = False
        self._drained: asyncio.Future | None = None
        self._closing = False
        self._ids = itertools.count(1)
        self._eos: list[int] = []
        self._device = None
        self._penalty = False
        self._weights = ""
        self._attention = ""
        self._kv_tokens = 0
        self.counters = _Counters()
        from training.modeling import device

        self.max_batch_size = batch_rows(config.generation.max_batch_size, device().kind)
        self.pace = Pace(self.max_batch_size)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and start the manager (in a thread: seconds to minutes)."""
        from bot.engine.model import load_serving_model
        from training.modeling import device

        self._loop = asyncio.get_running_loop()
        self.model, self.tokenizer = await asyncio.to_thread(self._load, load_serving_model)
        self._device = device()
        four_bit = any(type(m).__name__ == "Linear4bit" for m in self.model.modules())
        self._weights = "4-bit weights" if four_bit else f"{self.model.dtype} weights".replace("torch.", "")
        eos = self.tokenizer.eos_token_id
        config_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [eos] + (config_eos if isinstance(config_eos, list) else [config_eos])
        self._eos = sorted({i for i in ids if i is not None})
        self._manager = await asyncio.to_thread(self._new_manager)
        log.info("engine: %s on %s, adapter %s, %s", self.config.model.base, self._device.name,
                 self.adapter_version or "none", self._batching())

    def _load(self, load_serving_model):
        """The model and tokenizer, with the first version's adapter (named "default")."""
        loaded = load_serving_model(self.config, str(self._initial.path) if self._initial else None)
        self._adapter_name = "default" if self._initial else None
        return loaded

    def _prepare_manager(self, manager) -> None:
        """Called on every new manager before its warm-up (bot/engine/cast.py routes adapters)."""

    def _may_run_ahead(self) -> bool:
        """Whether a step may be prepared while the one before runs (async batching)."""
        return not self._penalty

    def _new_manager(self):
        """Build, warm up and start transformers' continuous-batching manager."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from bot.engine import attention, penalty

        kind = self._device.kind
        tuning = self.tuning
        rows = self.max_batch_size
        block = self._block = tuning.block_size or BLOCK_SIZE[kind]
        cuda = kind == "cuda"
        kv_tokens = self.config.engine.kv_cache_tokens or self._default_kv_tokens(rows, block, cuda)
        kv_tokens = max(kv_tokens, self.config.model.max_seq_length + block)
        self._kv_tokens = math.ceil(kv_tokens / block) * block
        # Each sampling stage costs every step over the whole vocabulary, so the batch has the
        # stages the configured settings use; requests then set their own values for them.
        # Top-p sorts the vocabulary: only where [generation] top_p < 1 with sampling. The penalty
        # reads each row's history: only where [generation] repetition_penalty != 1.
        gen = self.config.generation
        nucleus = gen.temperature > 0 and gen.top_p < 1.0
        self._penalty = gen.repetition_penalty != 1.0
        generation = GenerationConfig(
            do_sample=True, temperature=0.7, top_p=0.9 if nucleus else 1.0, top_k=None,  # placeholders
            max_new_tokens=self.config.generation.max_new_tokens, eos_token_id=self._eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if cuda and tuning.attention == "auto" and attention.available(inner.device):
            inner.set_attn_implementation(attention.install())
        self._attention = inner.config._attn_implementation
        graphs = cuda and self.config.engine.cuda_graphs
        # transformers' own rule (graphs and no mask to build), which does not know our attention
        run_ahead = tuning.async_batching if tuning.async_batching is not None else graphs and self._attention == attention.NAME
        batching = ContinuousBatchingConfig(
            block_size=block, num_blocks=math.ceil(kv_tokens / block),
            max_batch_tokens=tuning.max_batch_tokens or MAX_BATCH_TOKENS[kind],
            max_requests_per_batch=rows, allow_block_sharing=self.config.engine.prefix_sharing,
            # The penalty's history buffer is refilled between steps: no step may run ahead.
            use_async_batching=run_ahead and self._may_run_ahead(),
            use_cuda_graph=graphs, q_padding_interval_size=tuning.q_padding, kv_padding_interval_size=tuning.kv_padding,
            default_compile_level=self.config.engine.compile_level if cuda else 0,
            per_request_processors=True,
        )
        manager = _manager_class(tuning.graph_max_q if graphs else 0)(inner, generation, batching)
        manager.pace = self.pace
        if self._penalty:
            penalty.install(manager, rows, self.config.model.max_seq_length, inner.device)
        # The paged cache is allocated uninitialised, and warm-up requests read cache blocks that
        # nothing wrote: bit patterns that are NaN in bf16 reach the sampler, whose multinomial
        # then kills the CUDA context with a device-side assert. Zero it once.
        manager.batch_processor = manager._create_batch_processor()
        for layer in manager.batch_processor.cache.key_cache + manager.batch_processor.cache.value_cache:
            layer.zero_()
        self._prepare_manager(manager)
        manager.warmup()  # captures the CUDA graphs of every batch size; nothing to do without them
        manager.start()
        # One tiny reply first, so that the first user does not wait for the first step's set-up.
        manager.add_request(self._eos[:1] * 8, request_id="warmup", max_new_tokens=2)
        if manager.get_result("warmup", timeout=600) is None:
            raise RuntimeError(f"the engine did not start: {manager.background_thread_status.fatal_error}")
        return manager

    def _default_kv_tokens(self, rows: int, block: int, cuda: bool) -> int:
        """On CUDA: room for every row at max_seq_length (chats with some history run near the
        prompt budget, and a full cache holds new chats back until a row ends), within a share of
        the GPU memory still free (a retrain trains on the same GPU). Elsewhere 512 per row."""
        max_seq = self.config.model.max_seq_length
        if not cuda:
            return max(rows * KV_TOKENS_PER_ROW, max_seq)
        import torch

        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.bfloat16
        per_token = 2 * config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.model.device)
        fits = int(free * KV_SHARE_OF_FREE_MEMORY) // per_token // block * block
        wanted = rows * max_seq
        if fits < wanted:
            log.warning("engine: the KV cache holds %d tokens (%.0f%% of the free GPU memory), less than %d rows × "
                        "max_seq_length %d; long chats may wait for room. Set [engine] kv_cache_tokens to choose",
                        fits, KV_SHARE_OF_FREE_MEMORY * 100, rows, max_seq)
        return max(min(wanted, fits), rows * KV_TOKENS_PER_ROW // 4, max_seq + block)

    async def close(self) -> None:
        """Stop: replies waiting or in progress end with "interrupted"; the model is released."""
        if self._manager is None:
            return
        self._closing = True
        for reply in list(self._held) + list(self._live.values()):
            self._end(reply, "interrupted")
        manager, self._manager = self._manager, None
        await asyncio.to_thread(manager.stop, True, 30)
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

    def render(self, sample: Sample, *, history_first: bool | None = None, prefix: bool = False) -> str:
        """The prompt of ``sample`` (``PromptStyle.render``)."""
        with self._tokenizer_lock:
            return self._style.render(sample, self.tokenizer, history_first=history_first, prefix=prefix)

    # -- requests --------------------------------------------------------------------------

    def generate(self, prompt: str, sampling: GenerationSettings | None = None) -> ReplyStream:
        """Submit one reply; it joins the running batch at the next step."""
        return self._submit(prompt, sampling)

    def _submit(self, prompt: str, sampling: GenerationSettings | None, voice=None) -> ReplyStream:
        """``generate`` for the engine's own adapter, or for a cast member's ``voice``."""
        if self._manager is None and not self._closing:
            raise RuntimeError("LocalEngine.generate before start()")
        gen = sampling or self.config.generation
        special = self._special if voice is None else voice.special
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        stream = ReplyStream(len(ids), self.adapter_version if voice is None else voice.adapter_version)
        if self._closing:
            return stream._end_now("interrupted")
        if len(ids) + gen.max_new_tokens > self.config.model.max_seq_length:
            return stream._end_now("error", f"the prompt has {len(ids)} tokens and the reply may take "
                                   f"{gen.max_new_tokens}: more than [model] max_seq_length "
                                   f"{self.config.model.max_seq_length}; keep prompts within max_prompt_tokens")
        reply = _Reply(f"r{next(self._ids)}", stream, ids, gen, IncrementalDecoder(self.tokenizer),
                       reply_filter(self.hygiene if voice is None else voice.hygiene, gen),
                       slot=-1 if voice is None else voice.slot)
        stream._on_cancel = lambda: self._end(reply, "interrupted")
        if self._swapping or (voice is not None and voice.swapping):
            self._held.append(reply)
        else:
            self._admit(reply)
        return stream

    def prefill(self, prompt: str) -> bool:
        return self._prefill(prompt)

    def _prefill(self, prompt: str, voice=None) -> bool:
        """Compute the prompt blocks of ``prompt`` now, with no reply, and keep them cached: the
        start of a chat's next prompt (``PromptStyle.prefix``) when that prompt will not begin
        like the last one, so that its own prefill is only what follows. It takes a row only when
        the batch has room, queued behind the prompts submitted before it, and never during a swap
        (the blocks would be of the old adapter); with prefix sharing off it does nothing. Returns
        whether it was taken."""
        manager = self._manager
        if (manager is None or self._closing or self._swapping or self._held or not self.config.engine.prefix_sharing
                or (voice is not None and voice.swapping)
                or manager.batch_processor is None
                or len(self._live) + len(self._warming) >= self.max_batch_size - 1):
            return False
        with self._tokenizer_lock:
            ids = self.tokenizer(prompt, add_special_tokens=self._special if voice is None else voice.special)["input_ids"]
        if len(ids) < 2 * self._block or len(ids) + 2 > self.config.model.max_seq_length:
            return False  # too short to be worth a row, or too long to be any prompt
        rid = f"p{next(self._ids)}"

        def finished(output) -> None:
            if output.is_finished() or output.error is not None:
                with manager.output_router._lock:
                    manager.output_router.result_handlers.pop(rid, None)
                self._warming.discard(rid)
                self._released(rid)
                if self._drained is not None and not self._live and not self._warming and not self._drained.done():
                    self._drained.set_result(None)

        manager.register_result_handler(rid, finished)
        self._routed(rid, -1 if voice is None else voice.slot)
        self._warming.add(rid)
        self.counters.prefills += 1
        self.counters.prompt_tokens += len(ids)
        # Two tokens, not one: transformers marks a request's computed blocks shareable after the
        # step that ends its prefill, unless that step also finishes it (max_new_tokens = 1).
        if manager.add_request(ids, request_id=rid, max_new_tokens=2, streaming=False, eos_token_id=[],
                               **self._sampling(self.config.generation)) is None:
            finished(_Finished())
            return False
        return True

    def _admit(self, reply: _Reply) -> None:
        manager = self._manager
        if manager.background_thread_status.fatal_error is not None or not manager.is_running():
            reply.stream._end_now("error", f"the engine stopped: {manager.background_thread_status.fatal_error}")
            return
        gen = reply.gen
        manager.register_result_handler(reply.rid, lambda output: self._on_output(reply, output))
        self._routed(reply.rid, reply.slot)
        reply.admitted = True
        self._live[reply.rid] = reply
        self.counters.prompt_tokens += len(reply.ids)
        self.pace.note_prompt(len(reply.ids))
        submitted = manager.add_request(reply.ids, request_id=reply.rid, max_new_tokens=gen.max_new_tokens,
                                        streaming=True, eos_token_id=self._eos, **self._sampling(gen))
        if submitted is None:
            self._end(reply, "error", "the engine is not accepting requests")

    def _sampling(self, gen: GenerationSettings) -> dict[str, float]:
        """A request's own sampling settings, as the manager's per-request processors take them."""
        sampling = {"temperature": float(max(gen.temperature, GREEDY_TEMPERATURE))}
        if "top_p" in self._manager.logit_processor.supported_keys:
            sampling["top_p"] = float(gen.top_p if gen.temperature > 0 else 1.0)
        if self._penalty:
            sampling["repetition_penalty"] = float(gen.repetition_penalty)
        return sampling

    def _on_output(self, reply: _Reply, output) -> None:
        """One step's outputs for one request, on the event loop: decode, filter, stream, finish."""
        if reply.stream.stats is not None:
            return
        done = output.is_finished()  # the manager has let the request go by itself
        if output.error is not None:
            self._end(reply, "error", output.error, done=done)
            return
        new, reply.read = output.generated_tokens[reply.read:], len(output.generated_tokens)
        now = time.perf_counter()
        with self._tokenizer_lock:
            for token in new:
                if token in self._eos:
                    self._end(reply, "stop", done=done)
                    return
                reply.tokens += 1
                piece = reply.stops.feed(reply.decoder.push(token))
                if piece and reply.first_s is None:
                    reply.first_s = now - reply.stream.submitted
                reply.stream._put(piece)
                if reply.stops.done:
                    self._end(reply, "stop", done=done)
                    return
        if done:
            self._end(reply, "length" if reply.tokens >= reply.gen.max_new_tokens else "stop", done=True)

    def _end(self, reply: _Reply, reason: str, error: str | None = None, *, done: bool = False) -> None:
        """Finish a reply (once): release what the decoder and filter hold, and cancel it in the
        manager unless the manager is ``done`` with it already."""
        if reply.stream.stats is not None:
            return
        if reply.admitted and self._live.pop(reply.rid, None) is not None:
            manager = self._manager
            if manager is not None:
                with manager.output_router._lock:
                    manager.output_router.result_handlers.pop(reply.rid, None)
                if not done:
                    manager.cancel_request(reply.rid)
        elif reply in self._held:
            self._held.remove(reply)
        if reason in ("stop", "length"):
            self.pace.note_reply(reply.tokens, reply.gen.max_new_tokens)
            with self._tokenizer_lock:
                tail = reply.stops.feed(reply.decoder.flush()) + reply.stops.flush()
            if tail and reply.first_s is None:
                reply.first_s = time.perf_counter() - reply.stream.submitted
            reply.stream._put(tail)
        self.counters.replies += 1
        self.counters.tokens += reply.tokens
        reply.stream._finish(ReplyStats(len(reply.ids), reply.tokens, reply.first_s,
                                        time.perf_counter() - reply.stream.submitted, reply.stream.adapter_version,
                                        reason), error)
        self._released(reply.rid)
        if self._drained is not None and not self._live and not self._warming and not self._drained.done():
            self._drained.set_result(None)

    def forecast(self, max_new_tokens: int, ahead: Sequence[int] = ()) -> Forecast | None:
        """When a reply of ``max_new_tokens`` submitted now would finish, behind the replies in
        the engine and ``ahead`` more (their max_new_tokens) about to be submitted (``Pace``)."""
        pace, typical = self.pace, self.pace.typical_prompt
        work = [Work(pace.left(r.gen.max_new_tokens, r.tokens), 0 if r.tokens else len(r.ids)) for r in self._live.values()]
        work += [Work(2, typical) for _ in self._warming]
        work += [Work(pace.left(r.gen.max_new_tokens), len(r.ids)) for r in self._held]
        work += [Work(pace.left(tokens), typical) for tokens in ahead]
        return pace.forecast(work, Work(max_new_tokens, typical))

    def _routed(self, rid: str, slot: int) -> None:
        """A request enters the manager with the adapter ``slot`` (bot/engine/cast.py)."""

    def _released(self, rid: str) -> None:
        """A request has left the engine."""

    # -- adapters ----------------------------------------------------------------------------

    async def swap_adapter(self, version: Version | None) -> None:
        """Make ``version`` (None: the base model) serve every request submitted from now on.

        Its files are read and checked first, while generation goes on; a bad version raises
        here and changes nothing. Replies submitted earlier finish on the old adapter.
        """
        async with self._swap_lock:
            if self._manager is None:
                raise RuntimeError("the engine is closing")
            plan = await asyncio.to_thread(plan_swap, self.model, self._adapter_name, version)
            previous = self.adapter_version
            self._swapping = True
            self.adapter_version = version.name if version else None
            try:
                if self._live or self._warming:
                    self._drained = self._loop.create_future()
                    await self._drained
                started = time.perf_counter()
                await asyncio.to_thread(self._apply, plan)
            except BaseException:
                log.exception("engine: swapping to %s failed; keeping %s", self.adapter_version, previous)
                self.adapter_version = previous
                for reply in self._held:
                    reply.stream.adapter_version = previous
                raise
            finally:
                self._drained = None
                self._swapping = False
                held, self._held = list(self._held), deque()
                for reply in held:
                    if self._manager is not None:
                        self._admit(reply)
            self.counters.swaps += 1
            self.counters.last_swap_ms = round((time.perf_counter() - started) * 1000, 1)
            log.info("engine: now serving %s (%s, %.0f ms)", self.adapter_version or "the base model",
                     type(plan).__name__, self.counters.last_swap_ms)

    def _apply(self, plan: SwapPlan) -> None:
        """With no step running: apply the plan and forget the prompt blocks of the old version."""
        import torch

        manager = self._manager
        with manager.step_lock:
            self.model, self._adapter_name = apply_swap(self.model, self._adapter_name, plan, f"v{self.counters.swaps + 1}")
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            processor = manager.batch_processor
            if processor is not None:
                blocks = processor.cache._block_manager
                # Asking for every free block uninitialises the complete ones: their prefix hashes go.
                blocks.has_enough_free_blocks(blocks.num_free_blocks)
        if isinstance(plan, LoadAdapter):  # new layers: the captured graphs are of the old forward
            self.counters.cached_before += _cached_tokens(manager)
            manager.stop(True, 30)
            self._manager = self._new_manager()

    # -- status ------------------------------------------------------------------------------

    def _batching(self) -> str:
        engine = self.config.engine
        cuda = self._device is not None and self._device.kind == "cuda"
        parts = [f"continuous batching (transformers), up to {self.max_batch_size} rows"]
        if engine.prefix_sharing:
            parts.append("shared prompt blocks")
        if cuda and engine.cuda_graphs:
            parts.append("CUDA graphs")
        if self._kv_tokens:
            parts.append(f"KV cache {self._kv_tokens:,} tokens")
        if self._weights:
            parts.append(self._weights)
        if self._attention == "paged|rolebot":
            parts.append("flash attention (PyTorch's kernel)")
        return ", ".join(parts)

    def status(self) -> EngineStatus:
        manager = self._manager
        scheduler = manager.batch_processor.scheduler if manager is not None and manager.batch_processor else None
        waiting = len(self._held) + (manager.input_queue.qsize() if manager is not None else 0)
        waiting += len(scheduler.waiting_requests) if scheduler is not None else 0
        return EngineStatus(
            backend=self.backend,
            device=self._device.name if self._device else "not started",
            model=self.config.model.base,
            adapter_version=self.adapter_version,
            batching=self._batching(),
            queue_depth=waiting,
            generating=len(scheduler.active_requests) if scheduler is not None else 0,
            replies_served=self.counters.replies,
            tokens_generated=self.counters.tokens,
            largest_batch=manager.largest_batch if manager is not None else 0,
            adapter_swaps=self.counters.swaps,
            last_swap_ms=self.counters.last_swap_ms,
            starting=len(self._held) + sum(1 for reply in self._live.values() if reply.tokens == 0),
            prefills=self.counters.prefills,
            prompt_tokens=self.counters.prompt_tokens,
            prompt_tokens_cached=self.counters.cached_before + _cached_tokens(manager),
        )
