"""A cast on one base model: every character's LoRA adapter loaded at once, chosen per request.

Multi-LoRA servers (vLLM ``--enable-lora``, LoRAX, Punica's SGMV/BGMV kernels) keep one copy of
the base and apply each row's adapter in the same step. peft's own mixed-adapter batches
(``adapter_names=``) split the batch by *row*; transformers' continuous batching runs each step
as one flat row of every request's tokens (prefill chunks and decoding tokens side by side), so
a per-row split cannot tell the requests apart. Here the split is per *token*:

- every character's version is a named PEFT adapter on the one model ("c0", "c1", …);
- before each step, the host writes a mask per adapter slot over the step's tokens (which
  request each token belongs to, which slot that request carries) into a fixed device buffer,
  so a captured CUDA graph reads the new masks at the same address;
- each LoRA layer keeps every slot's A and scaled B stacked, and computes
  ``base(x) + ((x Aᵀ) ⊙ mask) Bᵀ``: one pair of matmuls per layer whatever the cast's size.

A token's own adapter's columns are kept with a mask of 1 and every other adapter's are exact
zeros, so a reply computes the same values in a mixed batch as in a batch of its character
alone. The extra cost per step is the stacked LoRA product (slots × r × (in + out) per token,
against the base's in × out), measured in README (bench/serve.py --cast).

Prompt blocks shared between requests (prefix sharing) are keyed by the tokens they hold; their
keys and values depend on the adapter, so the first block's hash is salted with the slot and its
version: one character never reads another's cached blocks, and a character's new version never
reads its old one's, while every other character's cache stays warm.

Hot swap is per character: a new version of the loaded shape is copied into that slot's tensors
once that character's replies in flight have finished (its new requests wait; everyone else's go
on). A version of another shape (rank, targets), or a character's first adapter, loads as a new
PEFT adapter, which rebuilds the manager once every reply has finished, as the single engine does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.config import Config, GenerationSettings
from bot.engine.base import EngineStatus, hygiene_for, prompt_budget
from bot.engine.local import LocalEngine, Tuning, _cached_tokens
from bot.engine.pace import Forecast
from bot.engine.stream import ReplyStream
from bot.engine.swap import CopyWeights, plan_swap
from training.hygiene import Hygiene
from training.prompts import Sample
from training.registry import Version

log = logging.getLogger(__name__)

SALT = 1_000_003  # the first block's hash of slot s at version generation g starts from (s + 1) * SALT + g


class Router:
    """Which adapter slot each token of a step belongs to, as a column mask on the device.

    Each LoRA layer keeps every slot's A stacked into one ``[slots × rank, in]`` matrix and
    every slot's scaled B into one ``[out, slots × rank]`` (ranks below the largest padded with
    zeros), so its adapters cost one pair of matmuls per step whatever the cast's size. Before
    each step the host writes each token's slot; one comparison on the device turns that into
    the ``[tokens, slots × rank]`` mask that keeps each token's own adapter's columns.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self.names: list[str | None] = [None] * slots  # the PEFT adapter of each slot; None: the base
        self.generation = [0] * slots  # bumped by every swap of the slot: its cached blocks go stale
        self.slot_of: dict[str, int] = {}  # request id -> slot, while the request is in the manager
        self.rank = 1  # the largest rank of the loaded adapters: each slot's width in the stacks
        self.dtype = None  # the stacks' dtype: the model's compute dtype
        self.mask = None  # [tokens, slots × rank] on the model's device
        self.salt: int | None = None  # set while a request's prompt blocks are hashed
        self._host = self._slots = self._columns = self._equal = None

    def allocate(self, tokens: int, device) -> None:
        import torch

        width = self.slots * self.rank
        self.mask = torch.zeros((tokens, width), dtype=self.dtype, device=device)
        self._equal = torch.zeros((tokens, width), dtype=torch.bool, device=device)
        self._columns = torch.arange(self.slots, device=device).repeat_interleave(self.rank)[None, :]
        self._slots = torch.full((tokens, 1), -1, dtype=torch.long, device=device)
        self._host = torch.full((tokens, 1), -1, dtype=torch.long)

    def salt_of(self, request_id: str) -> int | None:
        slot = self.slot_of.get(request_id, -1)
        return None if slot < 0 or self.names[slot] is None else (slot + 1) * SALT + self.generation[slot]

    def prepare(self, requests_in_batch) -> None:
        """Before a step (on the generation thread): the mask of its tokens, in batch order."""
        import torch

        host = self._host
        host.fill_(-1)
        position = 0
        limit = host.shape[0]
        for future in requests_in_batch:
            count = future.query_length
            slot = self.slot_of.get(future.state.request_id, -1)
            if slot >= 0 and self.names[slot] is not None:
                host[position:min(position + count, limit)] = slot
            position += count
        self._slots.copy_(host)
        torch.eq(self._slots, self._columns, out=self._equal)
        self.mask.copy_(self._equal)


def route(model, router: Router) -> int:
    """Make every LoRA layer of ``model`` apply each token's own adapter (``Router``): build the
    layer's stacks of every slot's adapter and route its forward through them; returns how many
    layers. Run again after an adapter is loaded or deleted (it rebuilds the stacks)."""
    import types

    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]
    loaded = [n for n in router.names if n is not None]
    router.rank = max([m.r[n] for m in layers for n in loaded if n in m.r] or [1])
    router.dtype = next(p.dtype for name, p in model.named_parameters()
                        if p.is_floating_point() and "lora_" not in name)
    width = router.slots * router.rank
    for layer in layers:
        base = layer.base_layer
        device = next(iter(layer.lora_A.values())).weight.device
        with torch.no_grad():
            layer._rolebot_a = torch.zeros((width, base.in_features), dtype=router.dtype, device=device)
            layer._rolebot_b = torch.zeros((base.out_features, width), dtype=router.dtype, device=device)
        layer._rolebot_router = router
        for slot in range(router.slots):
            refresh(layer, slot)
        layer.forward = types.MethodType(_routed_forward, layer)
    return len(layers)


def refresh(layer, slot: int) -> None:
    """Copy ``slot``'s adapter (A, and B times its scaling) into the layer's stacks, in place
    (the addresses stay, so captured CUDA graphs read the new values); zeros for no adapter."""
    import torch

    router = layer._rolebot_router
    name, rank = router.names[slot], router.rank
    columns = slice(slot * rank, (slot + 1) * rank)
    with torch.no_grad():
        layer._rolebot_a[columns].zero_()
        layer._rolebot_b[:, columns].zero_()
        if name is not None and name in layer.lora_A:
            r = layer.r[name]
            layer._rolebot_a[slot * rank:slot * rank + r].copy_(layer.lora_A[name].weight)
            layer._rolebot_b[:, slot * rank:slot * rank + r].copy_(layer.lora_B[name].weight * layer.scaling[name])


def _routed_forward(self, x, *args, **kwargs):
    """A LoRA layer's forward with each token's own adapter: base(x) + ((x Aᵀ) ⊙ mask) Bᵀ."""
    import torch.nn.functional as F

    result = self.base_layer(x, *args, **kwargs)
    mask = self._rolebot_router.mask[:x.shape[-2]]
    hidden = F.linear(x.to(self._rolebot_a.dtype), self._rolebot_a) * mask
    return result + F.linear(hidden, self._rolebot_b).to(result.dtype)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "_rolebot_router")]


def _salt_prefix_hashes(cache, router: Router) -> None:
    """Make the cache's prefix-sharing hashes start from each request's slot salt."""
    blocks = cache._block_manager
    compute_hash = blocks.compute_hash
    search = cache.search_prefix_match
    mark = cache.mark_shareable_blocks_as_complete

    def salted_hash(parent_hash, tokens, group_id):
        return compute_hash(router.salt if parent_hash is None else parent_hash, tokens, group_id)

    def salted_search(request_id, prompt_ids):
        router.salt = router.salt_of(request_id)
        try:
            return search(request_id, prompt_ids)
        finally:
            router.salt = None

    def salted_mark(state, num_complete_blocks):
        router.salt = router.salt_of(state.request_id)
        try:
            return mark(state, num_complete_blocks)
        finally:
            router.salt = None

    blocks.compute_hash = salted_hash
    cache.search_prefix_match = salted_search
    cache.mark_shareable_blocks_as_complete = salted_mark


@dataclass(eq=False)
class Voice:
    """One cast member's view of the shared engine: the ``Engine`` interface the service uses,
    with the member's prompts, reply hygiene and adapter version."""

    engine: CastEngine
    slot: int
    config: Config
    adapter_version: str | None
    hygiene: Hygiene = field(init=False)
    swapping: bool = False
    _drained: asyncio.Future | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.hygiene = hygiene_for(self.config)
        self.style = self.config.prompt_style()
        self.special = self.style.fmt != "chat"
        self.max_prompt_tokens = prompt_budget(self.config)

    @property
    def name(self) -> str:
        return self.config.character.name

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def forecast(self, max_new_tokens: int, ahead: Sequence[int] = ()) -> Forecast | None:
        """The shared batch's forecast (``LocalEngine.forecast``): every character's replies share its rows."""
        return self.engine.forecast(max_new_tokens, ahead)

    async def start(self) -> None:  # the shared engine starts and closes once, with the app
        pass

    async def close(self) -> None:
        pass

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def render(self, sample: Sample, *, history_first: bool | None = None, prefix: bool = False) -> str:
        with self.engine._tokenizer_lock:
            return self.style.render(sample, self.engine.tokenizer, history_first=history_first, prefix=prefix)

    def generate(self, prompt: str, sampling: GenerationSettings | None = None) -> ReplyStream:
        return self.engine._submit(prompt, sampling, self)

    def prefill(self, prompt: str) -> bool:
        return self.engine._prefill(prompt, self)

    async def swap_adapter(self, version: Version | None) -> None:
        await self.engine.swap_voice(self, version)

    def status(self) -> EngineStatus:
        status = self.engine.status()
        mine = sum(1 for reply in self.engine._live.values() if reply.slot == self.slot)
        from dataclasses import replace

        return replace(status, adapter_version=self.adapter_version,
                       batching=f"{status.batching}; {len(self.engine.voices)} characters' adapters on one base, "
                                f"{mine} of this character's replies generating")

    def busy(self) -> bool:
        """Replies or prefills of this character still in the manager."""
        slot = self.slot
        return (any(r.slot == slot for r in self.engine._live.values())
                or any(self.engine._router.slot_of.get(rid) == slot for rid in self.engine._warming))


class CastEngine(LocalEngine):
    """The local engine hosting a cast: one base, an adapter slot per character (``Voice``)."""

    def __init__(self, config: Config, versions: dict[str, Version | None], tuning: Tuning | None = None):
        super().__init__(config, None, tuning)
        names = list(versions)
        self._router = Router(len(names))
        self.voices = {name: Voice(self, slot, config.for_character(name), versions[name].name if versions[name] else None)
                       for slot, name in enumerate(names)}
        self._versions = dict(versions)  # what each character starts with
        self._loads = 0

    # -- loading -------------------------------------------------------------------------

    def _load(self, load_serving_model):
        from training.modeling import attach_adapter

        model, tokenizer = load_serving_model(self.config, None)
        for voice in self.voices.values():
            version = self._versions[voice.name]
            if version is not None:
                model = attach_adapter(model, str(version.path), name=self._new_name(voice))
        self._adapter_name = None
        if self._router.names and any(self._router.names):
            route(model, self._router)
            model.eval()
        return model, tokenizer

    def _new_name(self, voice: Voice) -> str:
        self._loads += 1
        name = f"c{voice.slot}_{self._loads}"
        self._router.names[voice.slot] = name
        self._router.generation[voice.slot] += 1
        return name

    def _prepare_manager(self, manager) -> None:
        processor = manager.batch_processor
        io = processor.inputs_and_outputs
        tokens = io.input_ids.numel() if hasattr(io, "input_ids") else io.io_pairs[0].host_io.input_ids.numel()
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self._router.dtype is None:  # no adapter loaded yet: nothing reads the mask
            self._router.dtype = next(p.dtype for p in inner.parameters() if p.dtype.is_floating_point)
        self._router.allocate(tokens, inner.device)
        processors = manager.logit_processor
        prepare = processors.prepare_tensor_args
        router = self._router

        def prepare_with_masks(requests_in_batch, arg_storage):
            router.prepare(requests_in_batch)
            return prepare(requests_in_batch, arg_storage)

        processors.prepare_tensor_args = prepare_with_masks
        if processor.cache.use_prefix_sharing:
            _salt_prefix_hashes(processor.cache, router)

    def _may_run_ahead(self) -> bool:
        return False  # the masks of step n+1 would overwrite those step n still reads

    def _routed(self, rid: str, slot: int) -> None:
        self._router.slot_of[rid] = slot

    def _released(self, rid: str) -> None:
        slot = self._router.slot_of.pop(rid, -1)
        if slot >= 0:
            voice = list(self.voices.values())[slot]
            if voice._drained is not None and not voice._drained.done() and not voice.busy():
                voice._drained.set_result(None)

    # -- per-character hot swap ------------------------------------------------------------

    async def swap_voice(self, voice: Voice, version: Version | None) -> None:
        """Serve ``version`` (None: the base) for ``voice``'s requests from now on; the other
        characters' replies in flight are not touched."""
        async with voice._lock:
            if self._manager is None:
                raise RuntimeError("the engine is closing")
            slot = voice.slot
            current = self._router.names[slot]
            if version is None:
                plan = None
            else:
                plan = await asyncio.to_thread(plan_swap, self.model, current, version)
            if plan is not None and not isinstance(plan, CopyWeights):
                await self._load_voice(voice, version)
                return
            previous = voice.adapter_version
            voice.swapping = True
            voice.adapter_version = version.name if version else None
            try:
                if voice.busy():
                    voice._drained = self._loop.create_future()
                    await voice._drained
                started = time.perf_counter()
                await asyncio.to_thread(self._apply_voice, voice, plan)
            except BaseException:
                log.exception("engine: swapping %s to %s failed; keeping %s", voice.name, voice.adapter_version, previous)
                voice.adapter_version = previous
                raise
            finally:
                voice._drained = None
                voice.swapping = False
                self._admit_held(voice)
            self._swapped(voice, started, "copied")

    def _apply_voice(self, voice: Voice, plan: CopyWeights | None) -> None:
        import torch

        with self._manager.step_lock:
            if plan is None:
                self._router.names[voice.slot] = None  # the base alone: no adapter for this slot
            else:
                with torch.no_grad():
                    for param, value in plan.pairs:
                        param.copy_(value)
            for layer in _lora_layers(self.model):
                refresh(layer, voice.slot)
            self._router.generation[voice.slot] += 1  # its blocks cached under the old version go stale
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()

    async def _load_voice(self, voice: Voice, version: Version) -> None:
        """A new adapter shape for ``voice`` (or its first adapter): load it beside the others,
        then rebuild the manager with every reply finished, as the single engine's LoadAdapter."""
        from training.modeling import attach_adapter

        previous_version = voice.adapter_version
        old = self._router.names[voice.slot]
        self._swapping = True
        voice.adapter_version = version.name
        try:
            if self._live or self._warming:
                self._drained = self._loop.create_future()
                await self._drained
            started = time.perf_counter()

            def load() -> None:
                manager = self._manager
                with manager.step_lock:
                    self.model = attach_adapter(self.model, str(version.path), name=self._new_name(voice))
                    if old is not None:
                        self.model.delete_adapter(old)
                    route(self.model, self._router)
                    self.model.eval()
                self.counters.cached_before += _cached_tokens(manager)
                manager.stop(True, 30)
                self._manager = self._new_manager()

            await asyncio.to_thread(load)
        except BaseException:
            log.exception("engine: loading %s for %s failed; keeping %s", version.name, voice.name, previous_version)
            voice.adapter_version = previous_version
            raise
        finally:
            self._drained = None
            self._swapping = False
            self._admit_held(None)
        self._swapped(voice, started, "loaded")

    def _swapped(self, voice: Voice, started: float, how: str) -> None:
        self.counters.swaps += 1
        self.counters.last_swap_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info("engine: %s now speaks with %s (%s, %.0f ms)", voice.name, voice.adapter_version or "the base model",
                 how, self.counters.last_swap_ms)

    def _admit_held(self, voice: Voice | None) -> None:
        """Admit the replies held for ``voice``'s swap (None: all of them)."""
        keep = []
        for reply in list(self._held):
            if voice is None or reply.slot == voice.slot:
                if reply.slot >= 0:
                    reply.stream.adapter_version = list(self.voices.values())[reply.slot].adapter_version
                if self._manager is not None:
                    self._admit(reply)
            else:
                keep.append(reply)
        self._held.clear()
        self._held.extend(keep)

    async def swap_adapter(self, version: Version | None) -> None:
        raise RuntimeError("a cast engine swaps per character: use its voices' swap_adapter")

    def _batching(self) -> str:
        return f"{super()._batching()}, {len(self.voices)} characters' adapters on one base (per-token LoRA)"
