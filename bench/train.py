#!/usr/bin/env python3
"""Training throughput on short role-play samples, in one run on one GPU and one data set.

    PYTHONPATH=/tmp/site:$PWD python3 bench/train.py --out $OUT          # on the CUDA machine
    python bench/train.py --tiny --out /tmp/bench-tiny                   # CPU: checks the script

Three configurations, each in a fresh subprocess (so each one's peak memory is its own):

  tutorial  Unsloth + TRL exactly as the tutorial: batch 2 x accumulation 4, padded rows,
            ``padding_free=False``, the Alpaca text with EOS as the dataset, 8-bit AdamW
  rolebot   ``training.sft.train`` with the default settings, as ``rolebot train`` calls it
            (batch 2 x 4, ``batching = "auto"`` = packed rows of ``pack_length`` 3072 tokens,
            response-only labels, no attention between packed samples, ``offload_embedding``)
  hf        plain transformers + PEFT + bitsandbytes + TRL (no Unsloth) at rolebot's batching:
            the same packed rows, the same collator (4D block-diagonal mask)

The model is a random-weight Llama-3.1-8B-shaped ``LlamaForCausalLM`` saved with
``save_pretrained`` in bf16 (built once, reused from ``--model-dir``) and loaded in 4-bit (nf4,
double quant) by every configuration; LoRA r16 on all seven projections, gradient
checkpointing, bf16. The data are ~4,000 synthetic Alpaca-template role-play samples of 79-161
tokens (mean ~119) under a small byte-level BPE tokenizer trained here (no model hub needed; its
ids are far below Llama's vocabulary, which is all speed needs).

Each configuration runs ``--warmup`` optimizer steps, untimed, then a fixed number of timed
steps; samples and tokens are counted where the collator sees them. Peak memory is
``torch.cuda.max_memory_reserved()`` of the configuration's process.

After its run the rolebot worker also checks packing on the GPU path: the Unsloth-loaded 4-bit
model with a LoRA adapter (non-zero B), three samples packed into one batch exactly as rolebot
collates them, against each sample alone; it reports the largest logit difference in training
and in eval mode, and the same for the plain 4D-mask layout that Unsloth's CUDA forward ignores
while training (to show what the flattened layout is for).

Writes ``results.json`` and ``results.md`` (and each worker's log) to ``--out``.

Measured on the H200 (torch 2.11, transformers 5.17, Unsloth 2026.10.9; 2026-11-28). Runs 1-5
ran before today's defaults, when the default was 2 rows of 2048 with the embedding on the GPU.
Run 1: tutorial 5.85 samples/s at 6.13 GB; rolebot default 52.3 samples/s (8.9x) at 6.94 GB
(1.13x); HF + PEFT at rolebot's batching 48.3 samples/s at 8.70 GB. Run 2, with the flat
layout sorted by length and bucketed to multiples of 16 tokens: tutorial 6.7 samples/s at
6.14 GB; rolebot default 60.0 samples/s (8.9x) at 7.12 GB (1.16x). Packed vs alone, training
mode: rolebot's layout 0.37 max abs logit difference, the same as the first sample's (which no
packing can change: the bf16 floor); the 4D-mask layout 9.64 there (Unsloth drops the mask).
Runs 3 and 4, sweeping rows per micro-batch: tutorial 7.0 / 5.6 samples/s at 6.14 GB; default
(2 rows of 2048) 8.5x / 8.6x at 1.16x; 3 rows 10.5x / 13.3x and pack_length 3072 13.2x, both at
1.24x (7.33 GB allocated); 4 rows 10.5x at 1.30x. Run 4 with training's expandable CUDA segments:
3 rows reserved 7.59 GB with them, 9.15 GB without (7.34 GB allocated either way).
Run 5: tutorial 5.9 samples/s at 6.14 GB; 2 rows of 2048 9.5x at 1.16x; 2 rows of 3072 13.0x at
1.24x, and with ``offload_embedding`` 13.0x at 1.08x (6.65 GB; 6.36 allocated); 3 rows of 2048
with it 12.5x at 1.08x. Run 6, today's defaults (2 rows of 3072, embedding in host RAM):
tutorial 6.7 samples/s at 6.14 GB; rolebot default 73.9 samples/s (11.1x) at 6.65 GB (1.08x);
the old default 61.0 (9.2x) at 7.12 GB (1.16x); HF + PEFT at rolebot's batching 43.6 (6.6x) at
9.69 GB (1.58x); packed vs alone 0.38 for rolebot's layout, 10.06 for the 4D-mask layout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.settings import TrainSettings  # noqa: E402  (no torch: the parent stays light)

DEFAULT_PACK = TrainSettings().pack_length

# Llama-3.1-8B's shape (hub config of meta-llama/Llama-3.1-8B).
LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
TINY = dict(LLAMA_8B, vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_scaling=None)
TARGET_MEMORY_RATIO = 1.2
TARGET_SPEEDUP = 10.0
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "tutorial": ("Unsloth (the tutorial's configuration)", "2 × 4", "padded (`padding_free=False`)"),
    "rolebot": ("rolebot default (`training.sft.train`, Unsloth)", "2 × 4",
                f"packed to {DEFAULT_PACK}, no cross-sample attention"),
    "hf": ("HF + PEFT + bnb + TRL", "2 × 4", f"rolebot's packed rows of {DEFAULT_PACK} + 4D block mask"),
}


# --------------------------------------------------------------------------- data (CPU only)

SYLLABLES = ("an ba chen da di fei gu hua jin ka lan li mei ning pei qin ru shen su tai wan "
             "wei xi yan yu zhao zhen zhi zi huan rong hong qing yun xue").split()
SPEAKERS = ["Emperor", "Empress", "Consort Hua", "Shen Meizhuang", "An Lingrong", "Wen Shichu", "Jinxi"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 1, 2, 2, 3))))


def _line(rng: random.Random, words: int) -> str:
    parts = []
    for i in range(words):
        w = _word(rng)
        parts.append(w.capitalize() if i == 0 else w)
        if i < words - 1 and rng.random() < 0.12:
            parts[-1] += rng.choice((",", ",", ";", " —"))
    return " ".join(parts) + rng.choice((".", ".", "!", "?", "..."))


def build_tokenizer(directory: Path):
    """A byte-level BPE (8,192 ids, Llama-style BOS/EOS) trained on the generator's own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from training.prompts import ALPACA

    rng = random.Random(7)
    corpus = [_line(rng, rng.randint(4, 40)) for _ in range(20000)] + [ALPACA] * 200
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B", special_tokens=[(SPECIALS[0], bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2], model_max_length=131072)
    fast.save_pretrained(directory)
    return fast


def build_samples(tokenizer, n: int, seed: int = 3407) -> list[dict]:
    """Alpaca records whose rolebot encoding (prompt + reply + EOS) is 79-161 tokens, mean ~119."""
    from training.packing import encode
    from training.prompts import PromptStyle, Sample

    rng = random.Random(seed)
    style = PromptStyle("alpaca")
    records, cost = [], {}
    while len(records) < n:
        target = round(rng.triangular(79, 161, 117))
        instruction = f"{rng.choice(SPEAKERS)}: " + _line(rng, rng.randint(3, 18))
        # Byte-level BPE splits at spaces and punctuation, so a reply's length is the sum of its
        # words' lengths (plus "." and EOS); the exact encoding is checked below.
        size = len(style.prompt_ids(Sample(instruction, "x"), tokenizer)) + 2
        words, output = [], ""
        while True:
            word = _word(rng)
            piece = word.capitalize() if not words else " " + word
            if piece not in cost:
                cost[piece] = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
            size += cost[piece]
            words.append(word)
            if size >= target:
                break
            output = " ".join(words).capitalize() + "."
        if not output:
            continue
        (enc,), _ = encode([Sample(instruction, output)], tokenizer, style, 4096, "truncate")
        if 79 <= len(enc.input_ids) <= 161:
            records.append({"instruction": instruction, "input": "", "output": output})
    return records


# --------------------------------------------------------------------------- the model (worker)

def worker_build(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    shape = TINY if spec["tiny"] else dict(LLAMA_8B, num_hidden_layers=spec["layers"])
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16")
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(spec["model_dir"], max_shard_size="5GB")
    return {"build_s": round(time.perf_counter() - started, 1),
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}


# --------------------------------------------------------------------------- timing

class Meter:
    """Counts samples and real tokens where the collator sees them, and stamps optimizer steps."""

    def __init__(self, collator):
        self.collator = collator
        self.samples = 0
        self.tokens = 0
        self.marks: list[tuple[int, float, int, int]] = []

    def __getattr__(self, name):  # the trainer and Unsloth may look at the collator's attributes
        return getattr(self.__dict__["collator"], name)

    def __call__(self, records):
        for record in records:
            self.samples += len(record.get("seq_lengths") or [1])
            self.tokens += len(record["input_ids"])
        return self.collator(records)

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                meter.marks.append((state.global_step, time.perf_counter(), meter.samples, meter.tokens))

        return Clock()

    def result(self, warmup: int) -> dict:
        # Micro-batches are collated just before they run (a fixed look-ahead at most), so the
        # counts between two step ends are the samples of the steps in between.
        first = next(m for m in self.marks if m[0] == warmup)
        last = self.marks[-1]
        seconds = last[1] - first[1]
        samples, tokens = last[2] - first[2], last[3] - first[3]
        return {"timed_steps": last[0] - first[0], "seconds": round(seconds, 3), "samples": samples,
                "tokens": tokens, "samples_per_s": round(samples / seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1), "peak_reserved_gb": peak_gb(),
                "peak_allocated_gb": peak_gb(allocated=True)}


def peak_gb(allocated: bool = False) -> float:
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() if allocated else torch.cuda.max_memory_reserved()
        return round(peak / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def attach(trainer, meter: Meter):
    trainer.data_collator = meter
    trainer.add_callback(meter.callback())
    return trainer


# --------------------------------------------------------------------------- the three configurations

def worker_tutorial(spec: dict) -> dict:
    """The tutorial's cells, with its hyperparameters, on the bench data."""
    from training.modeling import unsloth

    FastLanguageModel = unsloth()
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from training.prompts import ALPACA

    cuda = torch.cuda.is_available()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=2048, dtype=None, load_in_4bit=cuda)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=LORA_TARGETS, lora_alpha=16, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None)
    eos = tokenizer.eos_token
    records = json.loads(Path(spec["data"]).read_text())
    dataset = Dataset.from_list([{"text": ALPACA.format(r["instruction"], r["input"], r["output"]) + eos} for r in records])
    bf16 = cuda and torch.cuda.is_bf16_supported()
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(
            dataset_text_field="text", max_length=2048, dataset_num_proc=2, packing=False, padding_free=False,
            per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
            max_steps=spec["warmup"] + spec["steps"], learning_rate=2e-4, fp16=cuda and not bf16, bf16=bf16,
            logging_steps=1, optim="adamw_8bit" if cuda else "adamw_torch", weight_decay=0.01,
            lr_scheduler_type="linear", seed=3407, output_dir=str(Path(spec["work"]) / "tutorial"),
            report_to="none", save_strategy="no"),
    )
    meter = Meter(trainer.data_collator)
    attach(trainer, meter)
    trainer.train()
    return meter.result(spec["warmup"])


def worker_rolebot(spec: dict) -> dict:
    """``rolebot train`` with the default settings: ``training.sft.train(TrainJob(...))``."""
    import training.sft as sft
    from training.prompts import PromptStyle
    from training.registry import Registry
    from training.settings import LoraSettings, ModelSettings, TrainSettings

    meters, trainers = [], []
    original = sft.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainers.append(trainer)
        meters.append(Meter(trainer.data_collator))
        collator = trainer.data_collator
        attach(trainer, meters[-1])
        meters[-1].layout = "flat rows + packed_seq_lengths" if getattr(collator, "flatten", False) else "4D block mask"
        return trainer

    sft.build_trainer = build_trainer
    overrides = dict(spec.get("overrides", {}))
    if "alloc_conf" in overrides:  # rolebot+alloc_conf=...: the allocator setting rolebot would choose
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = str(overrides.pop("alloc_conf"))
    settings = TrainSettings(max_steps=spec["warmup"] + spec["steps"], **overrides)
    job = sft.TrainJob(
        data=Path(spec["data"]), model=ModelSettings(base=spec["model_dir"]), lora=LoraSettings(),
        train=settings, style=PromptStyle("alpaca"),
        registry=Registry(Path(spec["work"]) / "adapters", "bench"), trigger="bench")
    result = sft.train(job, activate=False)
    out = meters[0].result(spec["warmup"])
    out.update(layout=meters[0].layout, batching=settings.batching, pack_length=settings.pack_length,
               batch_size=settings.batch_size, grad_accum=settings.grad_accum,
               version=result.version.name)
    sft.build_trainer = original
    Path(spec["result"]).write_text(json.dumps(out, indent=1))  # kept should the check fail
    if spec.get("check", True):
        trainer = trainers[0]
        try:  # on the trained model itself (its peak memory is already measured)
            out["packing_check"] = check_packing(spec, trainer.model, trainer.processing_class)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            out["packing_check"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def worker_hf(spec: dict) -> dict:
    """No Unsloth: transformers + PEFT + bitsandbytes 4-bit, the same packed rows and trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from training.dataset import load_samples
    from training.packing import encode, pack, to_records
    from training.prompts import PromptStyle
    from training.settings import TrainSettings
    from training.sft import build_trainer

    if not torch.cuda.is_available():  # plain TRL's loss is a Triton-only kernel (trl/kernels/chunked_logprob.py)
        return {"error": "needs a CUDA GPU (plain TRL's fused log-prob loss is a Triton kernel)"}
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    settings = TrainSettings(max_steps=spec["warmup"] + spec["steps"])
    encoded, _ = encode(load_samples(Path(spec["data"])), tokenizer, PromptStyle("alpaca"), 2048, "truncate")
    rows = pack(encoded, settings.pack_length, settings.seed)
    trainer = build_trainer(model, tokenizer, to_records(rows), settings, True)
    layout = "flat rows + packed_seq_lengths" if trainer.data_collator.flatten else "4D block mask"
    meter = Meter(trainer.data_collator)
    attach(trainer, meter)
    trainer.train()
    out = meter.result(spec["warmup"])
    out.update(layout=layout)
    return out


# --------------------------------------------------------------------------- packing on the GPU path

def check_packing(spec: dict, model, tokenizer) -> dict:
    """Three samples packed as rolebot packs them vs each alone, on the model rolebot trained
    (Unsloth, 4-bit on CUDA, with its LoRA adapter)."""
    import torch

    from training.dataset import load_samples
    from training.packing import Collator, encode, to_records
    from training.prompts import PromptStyle
    from training.sft import drops_training_masks

    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter take part
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    samples = load_samples(Path(spec["data"]))
    encoded, _ = encode(samples[:3], tokenizer, PromptStyle("alpaca"), 2048, "truncate")
    device = next(model.parameters()).device
    flatten = drops_training_masks(model)
    layouts = {"rolebot": Collator(tokenizer.pad_token_id, flatten=flatten),
               "4d-mask-rows": Collator(tokenizer.pad_token_id),
               # plain packing: one row, restarting positions, no mask and no lengths
               "positions-only": lambda recs: {k: v for k, v in Collator(tokenizer.pad_token_id)(recs).items()
                                               if k != "attention_mask"},
               # control: plain packing with running positions, which must show a leak
               "plain-packing": lambda recs: {"input_ids": Collator(tokenizer.pad_token_id)(recs)["input_ids"]}}
    record = to_records([encoded])
    result = {"lengths": [len(e.input_ids) for e in encoded], "rolebot_layout":
              "flat rows + packed_seq_lengths" if flatten else "4D block mask", "backends": backends()}

    def forward(**batch):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            return model(**batch).logits.float()

    os.environ["UNSLOTH_RETURN_LOGITS"] = "1"
    for mode in ("train", "eval"):
        model.train(mode == "train")
        alone = [forward(input_ids=torch.tensor([e.input_ids]), position_ids=torch.arange(len(e.input_ids))[None])[0]
                 for e in encoded]
        scale = max(a.abs().max().item() for a in alone)
        for name, collator in layouts.items():
            try:
                batch = collator(record)
                packed = forward(**batch)[0]
            except Exception as exc:  # e.g. Unsloth refuses a bool 4D mask in eval mode
                result[f"{name}/{mode}"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                continue
            # rolebot's flat layout sorts samples by length and pads each to a bucket: find each
            # sample's slot from packed_seq_lengths (the samples here are already in length order).
            slots = batch["packed_seq_lengths"].tolist() if "packed_seq_lengths" in batch else [len(a) for a in alone]
            diffs, start = [], 0
            for a, slot in zip(sorted(alone, key=len), slots):
                diffs.append(round((packed[start:start + len(a)] - a).abs().max().item(), 5))
                start += slot
            result[f"{name}/{mode}"] = {"max_abs_diff": max(diffs), "per_sample": diffs, "logit_scale": round(scale, 3)}
    os.environ.pop("UNSLOTH_RETURN_LOGITS", None)
    try:
        result["timing_ms"] = time_layouts(model, tokenizer, samples, device)
    except Exception as exc:
        result["timing_ms"] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    return result


def time_layouts(model, tokenizer, samples, device) -> dict:
    """Forward + backward of one default micro-batch (2 packed rows of ``pack_length``) in each layout.

    Outside ``trainer.train()`` Unsloth's gradient checkpointing is not in effect (a 4,096-token
    micro-batch allocated ~16 GB more here, against 1.4 GB in training), so these compare the
    attention layouts with one another; they are not training step times."""
    import torch

    from training.packing import Collator, encode, pack, to_records
    from training.prompts import PromptStyle

    if not torch.cuda.is_available():
        return {}
    encoded, _ = encode(samples[:400], tokenizer, PromptStyle("alpaca"), 2048, "truncate")
    records = to_records(pack(encoded, DEFAULT_PACK, 3407)[:2])
    backbone = next(m for m in model.modules() if hasattr(m, "embed_tokens"))
    model.train()
    out = {}
    for name, flatten, keep in (("flat + packed_seq_lengths", True, False),
                                ("4D mask kept (_unsloth_keep_padding_mask)", False, True),
                                ("4D mask dropped by Unsloth (leaks)", False, False)):
        batch = {k: v.to(device) for k, v in Collator(tokenizer.pad_token_id, flatten=flatten)(records).items()}
        if keep:  # Unsloth takes a kept 4D mask only in the additive float form
            batch["attention_mask"] = torch.zeros(batch["attention_mask"].shape, dtype=torch.bfloat16, device=device
                                                  ).masked_fill(~batch["attention_mask"], torch.finfo(torch.bfloat16).min)
        backbone._unsloth_keep_padding_mask = keep
        times = []
        try:
            for _ in range(3):
                torch.cuda.synchronize()
                started = time.perf_counter()
                model(**batch).loss.backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            out[name] = round(1000 * statistics.median(times[1:]), 1)
        except Exception as exc:
            out[name] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        model.zero_grad(set_to_none=True)
    backbone._unsloth_keep_padding_mask = False
    return out


def backends() -> dict:
    """Which kernels Unsloth's packed attention can use here (read from its loaded module)."""
    ad = sys.modules.get("unsloth.utils.attention_dispatch")
    if ad is None:
        return {"unsloth attention_dispatch": "not loaded"}
    return {"torch_varlen": getattr(ad, "_TORCH_VARLEN_ATTN", None) is not None,
            "flash_attn": bool(getattr(ad, "HAS_FLASH_ATTENTION", False)),
            "xformers": bool(getattr(ad, "HAS_XFORMERS", False))}


# --------------------------------------------------------------------------- driver

WORKERS = {"build": worker_build, "tutorial": worker_tutorial, "rolebot": worker_rolebot, "hf": worker_hf}


def run_worker(name: str, spec: dict, out: Path, timeout: float, label: str | None = None) -> dict:
    label = label or name
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    log = out / f"{safe}.log"
    result_path = Path(spec["work"]) / f"{safe}.json"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with open(log, "w") as handle:
        try:
            # cwd: the scratch folder, where Unsloth may write its compiled cache
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec",
                                   json.dumps(dict(spec, result=str(result_path))), "--result", str(result_path)], stdout=handle,
                                  stderr=subprocess.STDOUT, env=env, timeout=max(timeout, 1), cwd=spec["work"])
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = round(time.perf_counter() - started, 1)
    if result_path.exists():  # a worker that failed after measuring still left its numbers
        result = json.loads(result_path.read_text())
        result["wall_s"] = wall
        if code != 0:
            result["worker_exit"] = code
        print(f"[{label}] {'done' if code == 0 else f'exit {code} after measuring'} in {wall} s", flush=True)
        return result
    tail = log.read_text(errors="replace").splitlines()[-25:]
    print(f"[{label}] FAILED ({code}) after {wall} s; last lines of {log}:\n  " + "\n  ".join(tail), flush=True)
    return {"error": f"exit {code}", "wall_s": wall}


def table(results: dict) -> str:
    base = results.get("tutorial", {})
    lines = ["| config | stack | batch × accum | batching | samples/s | tokens/s | peak reserved GB | "
             "peak allocated GB | samples/s vs tutorial | memory vs tutorial |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        base_name, overrides = parse_config(name)
        if base_name not in CONFIGS or not isinstance(r, dict):
            continue
        stack, batch, batching = CONFIGS[base_name]
        if overrides:
            stack += " with " + ", ".join(f"`{k} = {v}`" for k, v in overrides.items())
            if "samples_per_s" in r:
                batch = f"{r['batch_size']} × {r['grad_accum']}"
                batching = f"packed to {r['pack_length']}, no cross-sample attention"
        if "samples_per_s" not in r:
            lines.append(f"| {name} | {stack} | {batch} | {batching} | {r.get('error')} | | | | | |")
            continue
        speed = mem = ""
        if "samples_per_s" in base:
            speed = f"{r['samples_per_s'] / base['samples_per_s']:.2f}×"
            mem = f"{r['peak_reserved_gb'] / base['peak_reserved_gb']:.2f}×"
        lines.append(f"| {name} | {stack} | {batch} | {batching} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_reserved_gb']:.2f} | {r.get('peak_allocated_gb', 0):.2f} | "
                     f"{speed} | {mem} |")
    return "\n".join(lines)


def parse_config(name: str) -> tuple[str, dict]:
    """``rolebot+batch_size=3+pack_length=4096`` -> ("rolebot", {"batch_size": 3, "pack_length": 4096}):
    rolebot's default settings with some keys of ``[training]`` changed (a sweep, in the same run)."""
    base, *pairs = name.split("+")
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        value = value.strip()
        overrides[key.strip()] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return base.strip(), overrides


def verdict(results: dict) -> str | None:
    base = results.get("tutorial", {})
    lines = []
    for name, ours in results.items():
        if parse_config(name)[0] != "rolebot" or "samples_per_s" not in base or "samples_per_s" not in ours:
            continue
        speed = ours["samples_per_s"] / base["samples_per_s"]
        memory = ours["peak_reserved_gb"] / base["peak_reserved_gb"]
        ok = speed >= TARGET_SPEEDUP and memory <= TARGET_MEMORY_RATIO
        lines.append(f"target ({name} ≥ {TARGET_SPEEDUP:g}× the tutorial's samples/s at ≤ {TARGET_MEMORY_RATIO:g}× "
                     f"its peak memory): {speed:.2f}× at {memory:.2f}× — {'met' if ok else 'NOT met'}")
    return "\n".join(lines) or None


def check_text(check: dict) -> str:
    lines = [f"packing check (Unsloth 4-bit + LoRA, samples of {check.get('lengths')} tokens in one batch vs alone; "
             f"rolebot's layout here: {check.get('rolebot_layout')}; attention backends {check.get('backends')}):",
             "| layout | mode | max abs logit diff | per sample | logit scale |", "|---|---|---|---|---|"]
    for key, value in check.items():
        if "/" in key:
            layout, mode = key.split("/")
            if "error" in value:
                lines.append(f"| {layout} | {mode} | {value['error']} | | |")
            else:
                lines.append(f"| {layout} | {mode} | {value['max_abs_diff']} | {value['per_sample']} | {value['logit_scale']} |")
    if "error" in check:
        lines.append(f"check failed: {check['error']}")
    if check.get("timing_ms"):
        lines.append(f"forward + backward of one default micro-batch (2 packed rows of {DEFAULT_PACK}) on the trained model, "
                     "ms, outside trainer.train() (no gradient checkpointing there: layouts compared, not training steps):")
        lines += [f"- {k}: {v}" for k, v in check["timing_ms"].items()]
    for note in check.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "bench-train"),
                        help="where results.json, results.md and the workers' logs go")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the random-weight model (built there if missing; default /tmp/rolebot-bench/llama-8b-L<layers>)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rolebot-bench/work"), help="scratch folder")
    parser.add_argument("--configs", default="tutorial,rolebot,hf",
                        help="comma-separated subset of tutorial,rolebot,hf; rolebot+KEY=VALUE[+KEY=VALUE] "
                             "adds rolebot with [training] keys changed, e.g. rolebot+batch_size=3")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before timing")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (rolebot, hf)")
    parser.add_argument("--tutorial-steps", type=int, default=12, help="timed optimizer steps of the tutorial's configuration")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 8B shape (fewer: a quick smoke run)")
    parser.add_argument("--no-check", action="store_true", help="skip the packed-vs-alone logits check")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test of this script)")
    parser.add_argument("--budget", type=float, default=560, help="seconds for the whole run; workers get what is left")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        result = WORKERS[args.worker](json.loads(args.spec))
        Path(args.result).write_text(json.dumps(result, indent=1))
        return 0

    deadline = time.perf_counter() + args.budget
    args.work = args.work.resolve()
    tag = "tiny" if args.tiny else f"L{args.layers}"
    model_dir = (args.model_dir or Path(f"/tmp/rolebot-bench/llama-8b-{tag}")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    spec = {"model_dir": str(model_dir), "work": str(args.work), "tiny": args.tiny, "layers": args.layers,
            "warmup": args.warmup, "steps": args.steps, "check": not args.no_check,
            "data": str(args.work / "data.json")}
    results: dict = {"spec": spec}

    started = time.perf_counter()
    if (model_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        tokenizer = build_tokenizer(model_dir)
    records = build_samples(tokenizer, args.samples)
    spec_data = Path(spec["data"])
    spec_data.write_text(json.dumps(records, ensure_ascii=False))
    from training.packing import encode, pack
    from training.prompts import PromptStyle, Sample

    encoded, _ = encode([Sample(r["instruction"], r["output"]) for r in records], tokenizer, PromptStyle(), 4096, "truncate")
    lengths = [len(e.input_ids) for e in encoded]
    rows = pack(encoded, DEFAULT_PACK, 3407)
    results["data"] = {"samples": len(lengths), "min": min(lengths), "mean": round(statistics.mean(lengths), 1),
                       "max": max(lengths), f"packed_rows_{DEFAULT_PACK}": len(rows),
                       "samples_per_row": round(len(lengths) / len(rows), 2), "seconds": round(time.perf_counter() - started, 1)}
    print(f"data: {results['data']}", flush=True)

    if not (model_dir / "config.json").exists() or not any(model_dir.glob("*.safetensors")):
        results["build"] = run_worker("build", spec, args.out, deadline - time.perf_counter())
        if "error" in results["build"]:
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
            return 1
    else:
        results["build"] = {"reused": str(model_dir)}

    for label in [c.strip() for c in args.configs.split(",") if c.strip()]:
        name, overrides = parse_config(label)
        if name not in CONFIGS or (overrides and name != "rolebot"):
            parser.error(f"--configs: unknown configuration {label!r} (tutorial, rolebot, hf; "
                         "rolebot+KEY=VALUE changes a [training] key)")
        worker_spec = dict(spec, steps=args.tutorial_steps if name == "tutorial" else args.steps,
                           overrides=overrides, check=spec["check"] and not overrides)
        results[label] = run_worker(name, worker_spec, args.out, deadline - time.perf_counter(), label)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))

    text = [f"data: {results['data']}", "", table(results)]
    if (line := verdict(results)):
        text += ["", line]
    check = results.get("rolebot", {}).get("packing_check")
    if check:
        text += ["", check_text(check)]
    report = "\n".join(text)
    print("\n" + report, flush=True)
    (args.out / "results.md").write_text(report + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for k, r in results.items() if parse_config(k)[0] in CONFIGS) else 1


if __name__ == "__main__":
    sys.exit(main())
