"""Serving benchmark: rolebot's engine against the tutorial's one-at-a-time loop and, on CUDA,
transformers' own continuous batching on the same model files, in one run.

Each engine runs in a process of its own (a "phase"), on the same model files and prompts:

  loop      the tutorial's chat loop: Unsloth ``for_inference``, ``model.generate`` with a
            streamer, one chat at a time;
  engine    rolebot's engine as ``rolebot serve`` builds it (``bot.engine.make_engine``); one
            phase per ``--variant`` ([engine] overrides, e.g. ``weights=bf16``), and with
            ``--previous PATH`` also the engine of another checkout (``git worktree add``);
  cb        transformers' ``ContinuousBatchingManager`` on a plain transformers + bitsandbytes +
            PEFT load (CUDA graphs, warmed up to 64 rows): the baseline on CUDA.

and measures, greedy, the same number of new tokens per reply:

  all at once   ``--chats`` chats submitted together: aggregate tokens/s, first token, reply time;
  arrivals      ``--arrivals RATE[,RATE…]``: chats arriving at random (Poisson, seeded by rate) for
                ``--duration`` seconds each: first token p50/p95/max, reply p50/p95, tokens/s;
  swap          a second adapter version hot-swapped while all chats stream (in-flight replies
                must stay identical to v1) and, with arrivals, once more in the middle of the
                ``--swap-rate`` schedule (failed replies, first token around the swap).

With ``--cast N`` (N characters, each an adapter with its own non-zero weights) two more phases
run the same chats spread uniformly over the cast:

  cast      rolebot's cast engine (``bot.engine.cast``): one base, every character's adapter
            chosen per token in the same step; also checks that each character's greedy
            replies in the mixed batch equal those of a batch of that character alone;
  naive     the way without it: one engine (one copy of the base) per character.

Each phase runs in its own process, so "peak GPU GB" is what that way of serving takes.

It prints the tables. Usage:

    python bench/serve.py                                              # CPU: builtin model, 8 chats
    python bench/serve.py --arrivals 0.5,1 --previous /tmp/prev        # CPU, against an older engine
    python bench/serve.py --random-llama8b --arrivals 2,4,8,12 --work w  # GPU: Llama-3.1-8B shape, 4-bit + LoRA
    python bench/serve.py --cast 2 --phases engine,cast,naive          # CPU: a cast of two against one character
    python bench/serve.py --random-llama8b --cast 4 --arrivals 8,12 --phases engine,cast,naive  # GPU: a cast of 4

``--phases`` runs some phases only and keeps their results in ``--work``, so that a long GPU run
can be split over several calls; the last call prints every phase found there.
``--random-llama8b`` builds a Llama-3.1-8B-shaped model with random weights (bf16, about 16 GB)
and a LoRA adapter with non-zero weights: right for speed and memory, meaningless text. Its
tokenizer is the builtin model's, widened to Llama 3's 128,256 ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

LLAMA_VOCAB = 128256
# The tutorial's own instruction, as the persona: prompts of about 80-100 tokens.
PERSONA = "现在你要扮演皇帝身边的女人--甄嬛"
LINES = [
    "皇上吉祥！", "你今天怎么样？", "嬛嬛，你可知罪？", "华妃娘娘到！", "今晚月色真美。", "起来吧。",
    "朕听说你病了，可好些了？", "这碎玉轩的梅花开得正好。", "你觉得安陵容如何？", "皇后娘娘召你去景仁宫。",
    "你为何迟迟不肯侍寝？", "温太医又来请平安脉了。", "这是内务府新送来的料子。", "槿汐，外头是谁在哭？",
    "果郡王在外求见。", "你阿玛在前朝立了功。", "这首诗是你写的吗？", "宫里的日子，你可还习惯？",
    "眉姐姐怎么好些日子没来了？", "你可会弹琴？", "朕今日有些乏了。", "年羹尧又打了胜仗。",
    "这碗燕窝是谁送来的？", "你可知道欺君之罪？", "明日要去圆明园避暑。", "你怎么看待后宫争宠？",
    "端妃娘娘身子一向不好。", "浣碧，把那件斗篷拿来。", "祺贵人又在背后议论你。", "太后请你去寿康宫说话。",
    "今年的雪下得格外大。", "你想家吗？",
]


@dataclass
class Run:
    """One reply's measurements, from the client's side."""

    tokens: int
    first_s: float | None
    total_s: float
    text: str
    failed: bool = False
    arrival_s: float = 0.0  # when it was submitted, from the start of its schedule
    version: str | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m", help="base model: builtin name or local path")
    parser.add_argument("--random-llama8b", action="store_true", help="build a random Llama-3.1-8B-shaped model")
    parser.add_argument("--tiny", action="store_true", help="with --random-llama8b: 2 small layers (a smoke test of the path)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random model (default: the builtin model's)")
    parser.add_argument("--chats", type=int, help="chats submitted at once (default 32 on CUDA, 8 elsewhere)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per reply (default 128 on CUDA, 32 elsewhere)")
    parser.add_argument("--baseline-chats", type=int, help="chats the one-at-a-time loop runs (default: 6 on CUDA, all elsewhere)")
    parser.add_argument("--arrivals", default="", help="chats per second, comma-separated: a Poisson schedule for each")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds of arrivals per rate (default 25)")
    parser.add_argument("--swap-rate", type=float, help="also hot-swap mid-way through a schedule at this rate")
    parser.add_argument("--rows", type=int, help="rows of the running batch ([generation] max_batch_size; default 64 on CUDA, 8 elsewhere)")
    parser.add_argument("--variant", action="append", default=[],
                        help="an engine run with [engine] KEY=VALUE overrides, '+'-joined (repeatable; default: the shipped settings)")
    parser.add_argument("--previous", help="also run the engine of this checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--phases", default="loop,engine,cb", help="which phases to run (cb only on CUDA)")
    parser.add_argument("--no-lora", action="store_true", help="serve the base model without an adapter")
    parser.add_argument("--cast", type=int, default=1, metavar="N",
                        help="also serve a cast of N characters (adapters with different weights) on one base "
                             "(phase cast) and with an engine per character (phase naive)")
    parser.add_argument("--no-swap-check", action="store_true", help="skip the hot-swap with all chats in flight")
    parser.add_argument("--work", help="folder for the model, the adapters and each phase's results (default: a temporary one)")
    parser.add_argument("--out", help="also write the tables (markdown) and the raw numbers (JSON) here")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return run_phase(args)

    import torch

    cuda = torch.cuda.is_available()
    args.chats = args.chats or (32 if cuda else 8)
    args.new_tokens = args.new_tokens or (128 if cuda else 32)
    args.rows = args.rows or (64 if cuda else 8)
    args.baseline_chats = min(args.chats, args.baseline_chats or (6 if cuda else args.chats))
    work = Path(args.work or tempfile.mkdtemp(prefix="rolebot-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = json.loads((work / "plan.json").read_text()) if (work / "plan.json").exists() else None
    if plan is None:
        started = time.perf_counter()
        if args.random_llama8b:
            base = str(work / ("llama-tiny" if args.tiny else "llama-8b"))
            adapter = build_random_llama(Path(base), args.tokenizer, args.tiny, lora=not args.no_lora)
        else:
            base = args.model
            adapter = None if args.no_lora else random_adapter_for(base)
        version = save_version(work, adapter, base) if adapter else None
        v2 = perturbed_version(version) if version else None
        plan = {"base": base, "v1": version.name if version else None, "v2": v2.name if v2 else None,
                "cast": cast_versions(version, args.cast) if version and args.cast > 1 else []}
        (work / "plan.json").write_text(json.dumps(plan))
        print(f"bench: model ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    common = ["--work", str(work), "--chats", str(args.chats), "--new-tokens", str(args.new_tokens),
              "--rows", str(args.rows), "--baseline-chats", str(args.baseline_chats), "--arrivals", args.arrivals,
              "--duration", str(args.duration)] + (["--swap-rate", str(args.swap_rate)] if args.swap_rate else []) \
        + (["--no-swap-check"] if args.no_swap_check else [])
    jobs = []
    if "loop" in phases:
        jobs.append(("loop", "tutorial loop", None, []))
    if "engine" in phases:
        for variant in args.variant or [""]:
            label = "rolebot" + (f" ({variant})" if variant else "")
            jobs.append(("engine", label, str(ROOT), ["--variant", variant] if variant else []))
        if args.previous:
            jobs.append(("engine", "previous engine", str(Path(args.previous).resolve()), []))
    if "cb" in phases and cuda:
        jobs.append(("cb", "transformers CB", None, []))
    if plan.get("cast"):
        n = len(plan["cast"])
        if "cast" in phases:
            jobs.append(("cast", f"rolebot, a cast of {n} on one base", str(ROOT), []))
        if "naive" in phases:
            jobs.append(("naive", f"{n} engines, one per character", str(ROOT), []))
    for phase, label, code, extra in jobs:
        command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--label", label, *common, *extra]
        if code:
            command += ["--code", code]
        print(f"bench: phase {label} …", file=sys.stderr, flush=True)
        done = subprocess.run(command)
        if done.returncode != 0:
            print(f"bench: phase {label} failed (exit {done.returncode})", file=sys.stderr)
    results = [json.loads(p.read_text()) for p in sorted(work.glob("result-*.json"))]
    tables = render(results, args)
    print(tables)
    if args.out:
        Path(args.out).write_text(tables + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# -- the model ---------------------------------------------------------------------------------


def build_random_llama(out: Path, tokenizer_dir: str | None, tiny: bool, lora: bool) -> dict | None:
    """Save a Llama-3.1-8B-shaped model with random weights (and return a random LoRA adapter)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.builtin import resolve

    source = tokenizer_dir or resolve("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8)
    if tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shape,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    widen_tokenizer(tokenizer, out)
    adapter = random_adapter(model) if lora else None
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return adapter


def widen_tokenizer(tokenizer, out: Path) -> None:
    """Save the tokenizer with filler ids up to Llama 3's vocabulary, so that every id the random
    model emits decodes to text (a piece per token, as with a real tokenizer)."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    for i in range(LLAMA_VOCAB):
        if i not in taken:
            vocab[f"<x{i}>"] = i
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def random_adapter_for(base: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from training.builtin import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve(base), dtype=torch.float32)
    return random_adapter(model)


def random_adapter(model) -> dict:
    """The tutorial's LoRA (r 16, alpha 16, all seven projections) with non-zero B, as files."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    folder = Path(tempfile.mkdtemp(prefix="rolebot-bench-lora-"))
    peft.save_pretrained(folder)
    return {"folder": folder}


def save_version(work: Path, adapter: dict, base: str):
    from training.registry import Registry

    registry = Registry(work / "adapters", "甄嬛")
    with registry.writing() as draft:
        for item in adapter["folder"].iterdir():
            shutil.copy(item, draft.path / item.name)
        version = draft.commit({"base_model": base, "note": "random weights for bench/serve.py"})
    shutil.rmtree(adapter["folder"], ignore_errors=True)
    return version


# -- the phases (each in a process of its own) -------------------------------------------------


def run_phase(args) -> int:
    if args.code:  # another checkout's engine: its code first on the path
        sys.path.insert(0, args.code)
    work = Path(args.work)
    plan = json.loads((work / "plan.json").read_text())
    from training.registry import Registry

    versions = {v.name: v for v in Registry(work / "adapters", "甄嬛").versions()}
    v1, v2 = versions.get(plan["v1"]), versions.get(plan["v2"])
    if args.phase in ("cast", "naive"):
        members = {name: Registry(work / "adapters", name).get(version) for name, version in plan["cast"]}
        result = asyncio.run(cast_phase(args, plan["base"], members))
    else:
        phase = {"loop": loop_phase, "engine": engine_phase, "cb": cb_phase}[args.phase]
        result = asyncio.run(phase(args, plan["base"], v1, v2))
    result.update(label=args.label, phase=args.phase)
    order = {"loop": 0, "engine": 1, "cast": 2, "naive": 3, "cb": 4}[args.phase]
    slug = "".join(c if c.isalnum() else "-" for c in args.label)
    (work / f"result-{order}-{slug}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def split_variant(overrides: str) -> tuple[dict, dict]:
    """A variant's KEY=VALUE items: ``[engine]`` settings, and the engine's ``Tuning`` fields
    (``bot.engine.local.Tuning``: attention, async_batching, max_batch_tokens, ...)."""
    from dataclasses import fields

    from bot.config import EngineSettings

    try:
        from bot.engine.local import Tuning
        tunable = {f.name for f in fields(Tuning)}
    except ImportError:  # an older checkout (--previous)
        tunable = set()
    settings = {f.name for f in fields(EngineSettings)}
    engine, tuning = {}, {}
    for item in (item for item in overrides.split("+") if item):
        key, value = item.split("=", 1)
        if key in tunable and key not in settings:
            tuning[key] = None if value == "none" else (value == "true") if value in ("true", "false") \
                else int(value) if value.isdigit() else value
        else:
            engine[key] = value
    return engine, tuning


def bench_config(base: str, new_tokens: int, rows: int, overrides: str = "", cast: list[str] = ()):
    from bot.config import parse_config

    engine = "".join(f"{k} = {v if v in ('true', 'false') or v.replace('.', '').isdigit() else json.dumps(v)}\n"
                     for k, v in split_variant(overrides)[0].items())
    persona = json.dumps(PERSONA, ensure_ascii=False)
    characters = "".join(f"[[cast]]\nname = {json.dumps(name, ensure_ascii=False)}\npersona = {persona}\n"
                         for name in cast) or f"[character]\npersona = {persona}\n"
    text = f"""
{characters}
[model]
base = {json.dumps(base)}
max_seq_length = 2048
[generation]
max_new_tokens = {new_tokens}
temperature = 0.0
repetition_penalty = 1.0
stop = []
max_batch_size = {rows}
""" + (f"[engine]\n{engine}" if engine else "")
    return parse_config(text, Path.cwd() / "bench.toml")


def make_prompts(render, n: int) -> list[str]:
    from training.prompts import Sample

    return [render(Sample(instruction=LINES[i % len(LINES)] + ("" if i < len(LINES) else f"（第{i}问）")))
            for i in range(n)]


def device_info(base: str) -> dict:
    import torch

    from training.modeling import device

    return {"device": device().name, "model": base,
            "peak_gpu_gb": round(torch.cuda.max_memory_reserved() / 2**30, 1) if torch.cuda.is_available() else None}


async def loop_phase(args, base: str, v1, v2) -> dict:
    """The tutorial's loop: Unsloth's inference mode, one chat at a time."""
    from training.modeling import load_for_inference
    from training.prompts import PromptStyle
    from training.settings import ModelSettings

    model, tokenizer = load_for_inference(ModelSettings(base=base, max_seq_length=2048), str(v1.path) if v1 else None)
    style = PromptStyle("alpaca", PERSONA, "甄嬛")
    prompts = make_prompts(lambda sample: style.prompt(sample, tokenizer), args.chats)
    tutorial_reply(model, tokenizer, prompts[0], 8)  # warm-up
    runs, started = [], time.perf_counter()
    for prompt in prompts[:args.baseline_chats]:
        runs.append(tutorial_reply(model, tokenizer, prompt, args.new_tokens))
    return {"info": device_info(base), "all_at_once": summary(runs, time.perf_counter() - started),
            "texts": [r.text for r in runs]}


async def engine_phase(args, base: str, v1, v2) -> dict:
    """rolebot's engine as ``rolebot serve`` builds it."""
    from bot.engine import make_engine

    variant = args.variant[0] if args.variant else ""
    config = bench_config(base, args.new_tokens, args.rows, variant)
    engine = make_engine(config, v1)
    tuning = split_variant(variant)[1]
    if tuning:
        engine.tuning = replace(engine.tuning, **tuning)
    loaded = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - loaded
    prompts = make_prompts(engine.render, 256)
    client = lambda prompt: engine_client(engine, prompt)  # noqa: E731
    await concurrent(client, prompts[:args.chats])  # warm-up of the same shape
    runs, wall = await concurrent(client, prompts[:args.chats])
    result = {"info": {**device_info(base), "start_s": round(start_s, 1), "status": _status(engine)},
              "all_at_once": summary(runs, wall), "texts": [r.text for r in runs]}
    if v1 and v2 and not args.no_swap_check:
        result["swap"] = await swap_check(engine, prompts[:args.chats], v1, v2, [r.text for r in runs])
    result["arrivals"] = [{"rate": rate, **summary(*await arrivals(client, prompts, rate, args.duration))}
                          for rate in rates(args)]
    if args.swap_rate and v1 and v2:
        result["swap_under_load"] = await swap_under_load(engine, client, prompts, args.swap_rate, args.duration, v1, v2)
    result["info"]["peak_gpu_gb"] = device_info(base)["peak_gpu_gb"]
    await engine.close()
    return result


def _status(engine) -> dict:
    status = engine.status()
    return status if isinstance(status, dict) else asdict(status)


async def cb_phase(args, base: str, v1, v2) -> dict:
    """transformers' own continuous batching on a plain transformers + bitsandbytes + PEFT load."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from training.prompts import PromptStyle

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    if v1:
        model = PeftModel.from_pretrained(model, str(v1.path))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    generation = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    batching = ContinuousBatchingConfig(block_size=64, num_blocks=1024, max_batch_tokens=4096,
                                        max_requests_per_batch=64, use_cuda_graph=True)
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
    manager.warmup()
    manager.start()
    style = PromptStyle("alpaca", PERSONA, "甄嬛")
    prompts = make_prompts(lambda sample: style.prompt(sample, tokenizer), 256)
    client = cb_client(manager, tokenizer, args.new_tokens)
    for warm in (32, 64):
        await concurrent(client, prompts[:warm])
    runs, wall = await concurrent(client, prompts[:args.chats])
    result = {"info": device_info(base), "all_at_once": summary(runs, wall), "texts": [r.text for r in runs]}
    result["arrivals"] = [{"rate": rate, **summary(*await arrivals(client, prompts, rate, args.duration))}
                          for rate in rates(args)]
    manager.stop(block=True, timeout=30)
    return result


def tutorial_reply(model, tokenizer, prompt: str, new_tokens: int) -> Run:
    """The tutorial's chat step: tokenize, ``generate`` with a TextStreamer, one reply."""
    from transformers import TextStreamer

    class Timed(TextStreamer):
        """The tutorial prints each piece; here the first generated token's time is what counts
        (TextStreamer itself holds text back until a word ends)."""

        first: float | None = None

        def put(self, value) -> None:
            if not self.next_tokens_are_prompt and self.first is None:
                self.first = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pass

    inputs = tokenizer([prompt], return_tensors="pt").to(model.device)
    streamer = Timed(tokenizer, skip_prompt=True, skip_special_tokens=True)
    started = time.perf_counter()
    out = model.generate(**inputs, streamer=streamer, max_new_tokens=new_tokens, do_sample=False,
                         repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    total = time.perf_counter() - started
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    while new and new[-1] in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        new.pop()
    text = tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd")
    return Run(len(new), streamer.first - started if streamer.first else None, total, text)


def perturbed_version(v1):
    """v2: v1's adapter with its B matrices scaled and sign-flipped (same shapes: copied in place)."""
    from safetensors.torch import load_file, save_file

    from training.registry import Registry

    weights = load_file(str(v1.path / "adapter_model.safetensors"))
    weights = {k: (-3 * t if "lora_B" in k else t).contiguous() for k, t in weights.items()}
    with Registry(v1.path.parent.parent, v1.character).writing() as draft:
        shutil.copy(v1.path / "adapter_config.json", draft.path / "adapter_config.json")
        save_file(weights, str(draft.path / "adapter_model.safetensors"))
        return draft.commit({**v1.meta, "parent_version": v1.name})


def cast_versions(v1, n: int) -> list[list[str]]:
    """The cast of ``n``: 甄嬛 with v1, and n - 1 more characters whose adapters are v1's with B
    scaled by a different factor each (different non-zero weights, the same shapes)."""
    from safetensors.torch import load_file, save_file

    from training.registry import Registry

    cast = [[v1.character, v1.name]]
    weights = load_file(str(v1.path / "adapter_model.safetensors"))
    for i in range(1, n):
        scale = (-1) ** i * (1.0 + 0.5 * i)
        scaled = {k: (scale * t if "lora_B" in k else t).contiguous() for k, t in weights.items()}
        with Registry(v1.path.parent.parent, f"角色{i}").writing() as draft:
            shutil.copy(v1.path / "adapter_config.json", draft.path / "adapter_config.json")
            save_file(scaled, str(draft.path / "adapter_model.safetensors"))
            cast.append([f"角色{i}", draft.commit({**v1.meta, "note": f"v1 with B x {scale:g}"}).name])
    return cast


async def cast_phase(args, base: str, members: dict) -> dict:
    """A cast: the chats spread over the characters (chat i to character i mod n), on rolebot's
    cast engine (one base) or, for the naive phase, on one engine per character."""
    from bot.engine import make_engine
    from bot.engine.base import make_engines

    names = list(members)
    config = bench_config(base, args.new_tokens, args.rows, cast=names)
    loaded = time.perf_counter()
    if args.phase == "naive":
        voices = {name: make_engine(config.for_character(name), version) for name, version in members.items()}
        engines = list(voices.values())
    else:
        engine, voices = make_engines(config, members)
        engines = [engine]
    for engine in engines:
        await engine.start()
    start_s = time.perf_counter() - loaded
    texts = make_prompts(lambda sample: sample, 256)
    prompts = [(voices[names[i % len(names)]], voices[names[i % len(names)]].render(sample)) for i, sample in enumerate(texts)]
    client = lambda item: engine_client(item[0], item[1])  # noqa: E731
    await concurrent(client, prompts[:args.chats])  # warm-up of the same shape
    runs, wall = await concurrent(client, prompts[:args.chats])
    # each character's replies in the mixed batch against a batch of that character alone
    same, compared = 0, 0
    for k, name in enumerate(names):
        mine = [i for i in range(args.chats) if i % len(names) == k]
        alone, _ = await concurrent(client, [prompts[i] for i in mine])
        same += sum(a.text == runs[i].text for a, i in zip(alone, mine))
        compared += len(mine)
    result = {"info": {**device_info(base), "start_s": round(start_s, 1), "characters": len(names)},
              "all_at_once": summary(runs, wall), "texts": [r.text for r in runs],
              "mixed_equals_alone": [same, compared],
              "characters_differ": len({r.text for r in await asyncio.gather(
                  *(engine_client(voice, voice.render(texts[0])) for voice in voices.values()))})}
    result["arrivals"] = [{"rate": rate, **summary(*await arrivals(client, prompts, rate, args.duration))}
                          for rate in rates(args)]
    result["info"]["peak_gpu_gb"] = device_info(base)["peak_gpu_gb"]
    for engine in engines:
        await engine.close()
    return result


# -- clients and schedules ---------------------------------------------------------------------


def rates(args) -> list[float]:
    return [float(r) for r in args.arrivals.split(",") if r.strip()]


async def engine_client(engine, prompt: str) -> Run:
    started = time.perf_counter()
    first, pieces = None, []
    stream = engine.generate(prompt)
    async for piece in stream:
        if first is None:
            first = time.perf_counter() - started
        pieces.append(piece)
    return Run(stream.stats.completion_tokens, first, time.perf_counter() - started, "".join(pieces),
               failed=stream.stats.finish_reason == "error", version=stream.stats.adapter_version)


def cb_client(manager, tokenizer, new_tokens: int):
    counter = itertools.count()

    async def client(prompt: str) -> Run:
        ids = tokenizer(prompt)["input_ids"]
        rid = f"b{next(counter)}"
        done = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        first = []

        def on(output) -> None:
            if not first and output.generated_tokens:
                first.append(time.perf_counter() - started)
            if output.is_finished() and not done.done():
                done.set_result(output)

        manager.register_result_handler(rid, on)
        manager.add_request(ids, request_id=rid, max_new_tokens=new_tokens, streaming=True)
        output = await done
        tokens = output.generated_tokens
        return Run(len(tokens), first[0] if first else None, time.perf_counter() - started,
                   tokenizer.decode(tokens, skip_special_tokens=True), failed=output.error is not None)

    return client


async def concurrent(client, prompts: list[str]) -> tuple[list[Run], float]:
    """All chats at once; each reads its own stream."""
    started = time.perf_counter()
    runs = await asyncio.gather(*(client(p) for p in prompts))
    return list(runs), time.perf_counter() - started


def schedule(rate: float, duration: float) -> list[float]:
    """Arrival times of a Poisson process at ``rate`` per second, seeded by the rate."""
    rng = random.Random(int(rate * 1000))
    times, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration:
        times.append(t)
    return times


async def arrivals(client, prompts: list[str], rate: float, duration: float, during=None) -> tuple[list[Run], float]:
    """Chats arriving one by one; returns the replies and the time from the first arrival to the last reply."""
    times = schedule(rate, duration)
    started = time.perf_counter()

    async def one(i: int, at: float) -> Run:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        run = await client(prompts[i % len(prompts)])
        run.arrival_s = at
        return run

    side = asyncio.create_task(during(started)) if during else None
    runs = await asyncio.gather(*(one(i, at) for i, at in enumerate(times)))
    if side:
        await side
    return list(runs), time.perf_counter() - started - (times[0] if times else 0.0)


async def swap_check(engine, prompts: list[str], v1, v2, v1_texts: list[str]) -> dict:
    """Hot-swap while all chats stream: the replies in flight must finish exactly as v1 alone
    writes them, the next ones come from v2 (their text changes), and swapping back gives v1's
    text again (so the in-place copy reaches the captured CUDA graphs too)."""
    streams = [engine.generate(p) for p in prompts]
    pieces = aiter(streams[0])
    first = await anext(pieces)  # generation is under way
    started = time.perf_counter()
    swap = asyncio.create_task(engine.swap_adapter(v2))
    rest = await asyncio.gather(*(stream_text(s) for s in streams[1:]))
    in_flight = [first + "".join([piece async for piece in pieces])] + rest
    await swap
    swap_s = time.perf_counter() - started
    client = lambda prompt: engine_client(engine, prompt)  # noqa: E731
    v2_runs, _ = await concurrent(client, prompts)
    await engine.swap_adapter(v1)
    back, _ = await concurrent(client, prompts)
    return {
        "chats": len(prompts),
        "in_flight_versions": sorted({s.stats.adapter_version for s in streams}),
        "in_flight_identical_to_v1": sum(a == b for a, b in zip(in_flight, v1_texts)),
        "v2_texts_differ": sum(r.text != t for r, t in zip(v2_runs, v1_texts)),
        "back_to_v1_identical": sum(r.text == t for r, t in zip(back, v1_texts)),
        "errors": sum(s.stats.finish_reason == "error" for s in streams),
        "swap_call_s": round(swap_s, 2),  # includes letting the replies in flight finish
        "swap_apply_ms": _status(engine).get("last_swap_ms"),
    }


async def swap_under_load(engine, client, prompts, rate: float, duration: float, v1, v2) -> dict:
    """Arrivals at ``rate`` with a swap to v2 half-way: no reply may fail or mix versions."""
    window = {}

    async def swap(started: float) -> None:
        await asyncio.sleep(duration / 2)
        window["from"] = time.perf_counter() - started
        await engine.swap_adapter(v2)
        window["to"] = time.perf_counter() - started

    runs, wall = await arrivals(client, prompts, rate, duration, during=swap)
    around = [r.first_s for r in runs if window["from"] - 1 <= r.arrival_s <= window["to"] + 1]
    await engine.swap_adapter(v1)
    return {"rate": rate, **summary(runs, wall), "swap_s": round(window["to"] - window["from"], 2),
            "versions": {str(v): sum(r.version == v for r in runs) for v in sorted({str(r.version) for r in runs})},
            "first_token_p95_around_swap": percentile(around, 95), "first_token_max_around_swap": max(around, default=None)}


async def stream_text(stream) -> str:
    return "".join([piece async for piece in stream])


# -- numbers and tables ------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else values[-1]


def summary(runs: list[Run], wall: float) -> dict:
    tokens = sum(r.tokens for r in runs)
    firsts = [r.first_s for r in runs]
    return {
        "chats": len(runs), "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "failed": sum(r.failed for r in runs),
        "first_p50": percentile(firsts, 50), "first_p95": percentile(firsts, 95), "first_max": percentile(firsts, 100),
        "reply_p50": percentile([r.total_s for r in runs], 50), "reply_p95": percentile([r.total_s for r in runs], 95),
    }


def render(results: list[dict], args) -> str:
    def f(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    if not results:
        return "bench: no phase finished"
    info = results[0]["info"]
    loop = next((r for r in results if r["phase"] == "loop"), None)
    baseline = loop["all_at_once"]["tokens_per_s"] if loop else None
    lines = [f"device: {info['device']} | model: {info['model']} | {args.new_tokens} new tokens, greedy", "",
             f"All at once ({args.chats} chats; the loop runs them one after another):", "",
             "| engine | chats | tokens/s | first token p50 / p95 s | reply p50 / p95 s | × loop | peak GPU GB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        a = r["all_at_once"]
        times = f"{f(a['first_p50'])} / {f(a['first_p95'])}"
        lines.append(f"| {r['label']} | {a['chats']} | {f(a['tokens_per_s'], 1)} | {times} | "
                     f"{f(a['reply_p50'])} / {f(a['reply_p95'])} | "
                     f"{f(a['tokens_per_s'] / baseline, 1) + '×' if baseline else '-'} | {f(r['info'].get('peak_gpu_gb'), 1)} |")
    if any(r.get("arrivals") for r in results):
        lines += ["", f"Chats arriving one by one (Poisson, {args.duration:g} s per rate):", "",
                  "| chats/s | engine | first token p50 / p95 / max s | reply p50 / p95 s | tokens/s | replies | failed |",
                  "|---|---|---|---|---|---|---|"]
        for rate in rates(args):
            for r in results:
                for a in r.get("arrivals", []):
                    if a["rate"] == rate:
                        lines.append(f"| {rate:g} | {r['label']} | {f(a['first_p50'])} / {f(a['first_p95'])} / "
                                     f"{f(a['first_max'])} | {f(a['reply_p50'])} / {f(a['reply_p95'])} | "
                                     f"{f(a['tokens_per_s'], 0)} | {a['chats']} | {a['failed']} |")
    for r in results:
        if r.get("swap"):
            s = r["swap"]
            lines.append(f"\n{r['label']}, hot-swap with {s['chats']} chats in flight: they stayed {s['in_flight_versions']}, "
                         f"identical to v1 {s['in_flight_identical_to_v1']}/{s['chats']}; v2 changed "
                         f"{s['v2_texts_differ']}/{s['chats']}; back to v1 identical {s['back_to_v1_identical']}/{s['chats']}; "
                         f"errors {s['errors']}; swap call {s['swap_call_s']} s (the replies in flight finish first), "
                         f"applied in {s['swap_apply_ms']} ms")
        if r.get("swap_under_load"):
            s = r["swap_under_load"]
            lines.append(f"{r['label']}, swap half-way through {s['rate']:g} chats/s: {s['chats']} replies, {s['failed']} failed, "
                         f"versions {s['versions']}; swap took {s['swap_s']} s; first token p95 {f(s['first_p95'])} s "
                         f"overall, {f(s['first_token_p95_around_swap'])} s (max {f(s['first_token_max_around_swap'])}) "
                         f"for chats arriving within 1 s of the swap")
    for r in results:
        if r.get("mixed_equals_alone"):
            same, compared = r["mixed_equals_alone"]
            lines.append(f"\n{r['label']}: each character's greedy reply in the mixed batch equals its reply in a batch "
                         f"of that character alone for {same}/{compared} chats; the same line to each of the "
                         f"{r['info']['characters']} characters gave {r['characters_differ']} different replies")
    if loop:
        same = [sum(a == b for a, b in zip(loop["texts"], r["texts"])) for r in results if r["phase"] == "engine"]
        lines.append(f"\nSame text as the loop (first {len(loop['texts'])} chats): "
                     + ", ".join(f"{r['label']} {n}/{len(loop['texts'])}" for r, n in
                                 zip([r for r in results if r["phase"] == "engine"], same)))
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
