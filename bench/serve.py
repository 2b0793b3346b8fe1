"""Serving benchmark: N concurrent chats through the engine against the tutorial's chat loop.

One run loads one model (base + a LoRA adapter, through the engine's own loading path) and
measures, on the same prompts and the same number of new tokens, greedy:

  (a) the tutorial's loop: one chat at a time, ``model.generate`` with a streamer
      (Unsloth ``for_inference``), the next chat starting when the last reply ends;
  (b) the engine: all N chats submitted at once, each reading its own token stream.

It prints aggregate generated tokens/s, time to first token and reply latency (p50/p95) as a
table. Usage:

    python bench/serve.py                                    # builtin model on the CPU, 8 chats
    python bench/serve.py --random-llama8b --chats 32        # GPU: Llama-3.1-8B shape, 4-bit + LoRA
    python bench/serve.py --model /models/my-llama --no-lora # a local checkpoint

``--random-llama8b`` builds a Llama-3.1-8B-shaped model with random weights (bf16, saved to
``--work``; about 16 GB) and a LoRA adapter with non-zero weights: right for speed and memory,
meaningless text. Its tokenizer is the builtin model's, widened to Llama 3's 128,256 ids.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

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
    """One reply's measurements."""

    tokens: int
    first_s: float | None
    total_s: float
    text: str


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m", help="base model: builtin name or local path")
    parser.add_argument("--random-llama8b", action="store_true", help="build a random Llama-3.1-8B-shaped model")
    parser.add_argument("--tiny", action="store_true", help="with --random-llama8b: 2 small layers (a smoke test of the path)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random model (default: the builtin model's)")
    parser.add_argument("--chats", type=int, help="concurrent chats (default 32 on CUDA, 8 elsewhere)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per reply (default 128 on CUDA, 32 elsewhere)")
    parser.add_argument("--baseline-chats", type=int, help="chats the one-at-a-time loop runs (default: 6 on CUDA, all elsewhere)")
    parser.add_argument("--no-lora", action="store_true", help="serve the base model without an adapter")
    parser.add_argument("--no-eager", action="store_true", help="on CUDA: skip the engine run without CUDA-graph decode")
    parser.add_argument("--no-swap-check", action="store_true", help="skip the hot-swap check after the timing")
    parser.add_argument("--work", help="folder for the random model and the adapter (default: a temporary one)")
    parser.add_argument("--out", help="also write the table (markdown) and the raw numbers (JSON) here")
    args = parser.parse_args()

    from training.modeling import unsloth

    unsloth()  # first: it patches transformers and PEFT when imported
    import torch

    cuda = torch.cuda.is_available()
    chats = args.chats or (32 if cuda else 8)
    new_tokens = args.new_tokens or (128 if cuda else 32)
    baseline_chats = min(chats, args.baseline_chats or (6 if cuda else chats))
    work = Path(args.work or tempfile.mkdtemp(prefix="rolebot-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    if args.random_llama8b:
        base = str(work / ("llama-tiny" if args.tiny else "llama-8b"))
        adapter = build_random_llama(Path(base), args.tokenizer, args.tiny, lora=not args.no_lora)
    else:
        base = args.model
        adapter = None if args.no_lora else random_adapter_for(base)
    print(f"bench: model ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    version = save_version(work, adapter, base) if adapter else None
    result = asyncio.run(measure(base, version, chats, new_tokens, baseline_chats, cuda and not args.no_eager,
                                 not args.no_swap_check))
    table = render(result)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
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


def bench_config(base: str, new_tokens: int, chats: int):
    from bot.config import parse_config

    text = f"""
[character]
persona = {json.dumps(PERSONA, ensure_ascii=False)}
[model]
base = {json.dumps(base)}
max_seq_length = 2048
[generation]
max_new_tokens = {new_tokens}
temperature = 0.0
repetition_penalty = 1.0
stop = []
max_batch_size = {max(chats, 1)}
"""
    return parse_config(text, Path.cwd() / "bench.toml")


# -- the measurements --------------------------------------------------------------------------


async def measure(base: str, version, chats: int, new_tokens: int, baseline_chats: int, eager_too: bool,
                  check_swap: bool) -> dict:
    import torch

    from bot.engine import make_engine
    from training.modeling import device
    from training.prompts import Sample

    config = bench_config(base, new_tokens, chats)
    engine = make_engine(config, version)
    loaded = time.perf_counter()
    await engine.start()
    print(f"bench: loaded in {time.perf_counter() - loaded:.0f} s: {engine.status()}", file=sys.stderr)
    prompts = [engine.render(Sample(instruction=LINES[i % len(LINES)] + ("" if i < len(LINES) else f"（{i}）")))
               for i in range(chats)]
    lengths = [engine.count_tokens(p) for p in prompts]

    # (a) the tutorial's loop, on the engine's own model while the engine is idle.
    await asyncio.to_thread(tutorial_reply, engine.model, engine.tokenizer, prompts[0], 8)  # warm-up
    loop_runs, loop_wall = [], time.perf_counter()
    for prompt in prompts[:baseline_chats]:
        loop_runs.append(await asyncio.to_thread(tutorial_reply, engine.model, engine.tokenizer, prompt, new_tokens))
    loop_wall = time.perf_counter() - loop_wall
    print(f"bench: tutorial loop done ({baseline_chats} chats, {loop_wall:.1f} s)", file=sys.stderr)

    # (b) the engine: a warm-up pass of the same shape (CUDA graphs are captured per batch size),
    # then the measured pass.
    await concurrent(engine, prompts if torch.cuda.is_available() else prompts[:1])
    before = engine.status()["batches_served"]
    engine_runs, engine_wall = await concurrent(engine, prompts)
    batches = engine.status()["batches_served"] - before
    rows = [summary("tutorial loop: one chat at a time, model.generate", baseline_chats, loop_runs, loop_wall),
            summary(f"engine: {chats} concurrent chats" + (", CUDA-graph decode" if torch.cuda.is_available() else ""),
                    chats, engine_runs, engine_wall, batches)]
    if eager_too:
        os.environ["UNSLOTH_DECODE_CUDA_GRAPHS"] = "0"
        await concurrent(engine, prompts[:2])
        eager_runs, eager_wall = await concurrent(engine, prompts)
        batches = engine.status()["batches_served"] - before - batches - 1
        rows.append(summary(f"engine: {chats} concurrent chats, eager decode", chats, eager_runs, eager_wall, batches))
        del os.environ["UNSLOTH_DECODE_CUDA_GRAPHS"]
    swap = await swap_check(engine, prompts, version, [r.text for r in engine_runs]) if version and check_swap else None
    same = sum(a.text == b.text for a, b in zip(loop_runs, engine_runs))
    # The loop's times are each reply's own; chats that arrive together also wait for the ones
    # before them. Estimated for all N from the mean reply of the loop.
    mean = statistics.mean(r.total_s for r in loop_runs)
    queued = {"last_first_token_s": round((chats - 1) * mean + (loop_runs[-1].first_s or 0), 2),
              "last_reply_s": round(chats * mean, 2)}
    info = {
        "device": device().name,
        "model": base,
        "adapter": version.name if version else None,
        "quantization": "4-bit (bitsandbytes nf4)" if torch.cuda.is_available() and config.model.load_in_4bit else "none",
        "prompt_tokens": f"{min(lengths)}-{max(lengths)}",
        "new_tokens": new_tokens,
        "same_text_as_loop": f"{same}/{len(loop_runs)}",
        "peak_gpu_gb": round(torch.cuda.max_memory_reserved() / 2**30, 1) if torch.cuda.is_available() else None,
        "swap": swap,
        "loop_if_all_arrive_together": queued,
    }
    await engine.close()
    baseline = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / baseline, 1) if baseline else None
    return {"info": info, "rows": rows}


async def swap_check(engine, prompts: list[str], v1, v1_texts: list[str]) -> dict:
    """Hot-swap under load: a second version is swapped in while all chats stream.

    The replies in flight must finish exactly as v1 alone writes them; the next ones must come
    from v2 (their text changes); swapping back must give v1's text again, which shows that the
    in-place copy reaches the captured CUDA graphs too.
    """
    v2 = perturbed_version(v1)
    streams = [engine.generate(p) for p in prompts]
    pieces = aiter(streams[0])
    first = await anext(pieces)  # generation is under way
    started = time.perf_counter()
    swap = asyncio.create_task(engine.swap_adapter(v2))
    rest = await asyncio.gather(*(stream_text(s) for s in streams[1:]))
    in_flight = [first + "".join([piece async for piece in pieces])] + rest
    await swap
    swap_s = time.perf_counter() - started
    v2_runs, _ = await concurrent(engine, prompts)
    await engine.swap_adapter(v1)
    back, _ = await concurrent(engine, prompts)
    return {
        "in_flight_versions": sorted({s.stats.adapter_version for s in streams}),
        "in_flight_identical_to_v1": sum(a == b for a, b in zip(in_flight, v1_texts)),
        "v2_texts_differ": sum(r.text != t for r, t in zip(v2_runs, v1_texts)),
        "back_to_v1_identical": sum(r.text == t for r, t in zip(back, v1_texts)),
        "errors": sum(s.stats.finish_reason == "error" for s in streams),
        "swap_call_s": round(swap_s, 2),  # includes waiting for the batch in flight
        "swap_apply_ms": engine.status().get("last_swap_ms"),
        "chats": len(prompts),
    }


async def stream_text(stream) -> str:
    return "".join([piece async for piece in stream])


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


async def concurrent(engine, prompts: list[str]) -> tuple[list[Run], float]:
    """All chats at once; each reads its own stream. Times are the client's."""

    async def chat(prompt: str) -> Run:
        started = time.perf_counter()
        first = None
        pieces = []
        stream = engine.generate(prompt)
        async for piece in stream:
            if first is None:
                first = time.perf_counter() - started
            pieces.append(piece)
        if stream.stats.finish_reason == "error":
            raise RuntimeError(stream.error)
        return Run(stream.stats.completion_tokens, first, time.perf_counter() - started, "".join(pieces))

    started = time.perf_counter()
    runs = await asyncio.gather(*(chat(p) for p in prompts))
    return list(runs), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q < 100 else values[-1]


def summary(name: str, chats: int, runs: list[Run], wall: float, batches: int | None = None) -> dict:
    tokens = sum(r.tokens for r in runs)
    return {
        "mode": name, "chats": chats, "batches": batches, "tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50": percentile([r.first_s for r in runs], 50), "ttft_p95": percentile([r.first_s for r in runs], 95),
        "latency_p50": percentile([r.total_s for r in runs], 50), "latency_p95": percentile([r.total_s for r in runs], 95),
    }


def render(result: dict) -> str:
    info = result["info"]
    lines = [
        f"device: {info['device']} | model: {info['model']} ({info['quantization']}) + adapter {info['adapter']} | "
        f"prompts {info['prompt_tokens']} tokens | {info['new_tokens']} new tokens, greedy | "
        f"same text as the loop: {info['same_text_as_loop']}"
        + (f" | peak GPU memory reserved {info['peak_gpu_gb']} GB" if info["peak_gpu_gb"] is not None else ""),
        "",
        "| mode | chats | batches | tokens | wall s | tokens/s | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    if info.get("swap"):
        swap = info["swap"]
        lines[0] += (f" | hot-swap under load ({swap['chats']} chats): in flight stayed {swap['in_flight_versions']} and "
                     f"identical to v1 {swap['in_flight_identical_to_v1']}/{swap['chats']}, v2 changed "
                     f"{swap['v2_texts_differ']}/{swap['chats']}, back to v1 identical {swap['back_to_v1_identical']}/"
                     f"{swap['chats']}, errors {swap['errors']}, swap applied in {swap['swap_apply_ms']} ms between batches")
    for row in result["rows"]:
        batches = row["chats"] if row["batches"] is None else row["batches"]
        lines.append(f"| {row['mode']} | {row['chats']} | {batches} | {row['tokens']} | {f(row['wall_s'], 1)} | "
                     f"{f(row['tokens_per_s'], 1)} | {f(row['ttft_p50'])} | {f(row['ttft_p95'])} | "
                     f"{f(row['latency_p50'])} | {f(row['latency_p95'])} | {f(row['speedup'], 1)}× |")
    queued = info["loop_if_all_arrive_together"]
    lines.append(f"\nIf all {result['rows'][1]['chats']} chats arrive together, the one-at-a-time loop gives the last one its "
                 f"first token after ~{queued['last_first_token_s']} s and its whole reply after ~{queued['last_reply_s']} s.")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
