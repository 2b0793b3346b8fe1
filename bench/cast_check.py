#!/usr/bin/env python3
"""Correctness of the cast engine on CUDA: each character's greedy reply in a mixed batch
against that character's model itself.

A cast of ``--cast`` characters (random LoRA adapters with different non-zero weights on a
random Llama-shaped model, bf16 weights, no 4-bit: the reference must have the same weights)
serves ``--chats`` prompts at once, chat i to character i mod n, so every step mixes the
characters' tokens. Then a float32 copy of the model with peft's own LoRA, plain transformers
with SDPA and no cache, reads each prompt + reply in one forward with the adapter of the
character that wrote it, and at every reply position the engine's token is compared with the
reference's argmax (as ``bench/attention_check.py`` does for the attention): the share that
match and the largest gap (reference logit of its argmax minus that of the engine's token). A
token routed to another character's adapter gives gaps of whole logits; bf16 rounding gives
near-ties only. The same check of one character served alone by the single-adapter engine is
the baseline in the same run. Exit status 1 when the cast is clearly worse than the baseline.

    PYTHONPATH=/tmp/site:$PWD python3 bench/cast_check.py --tiny --tokenizer .bench-tok
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


async def serve(base: str, members: dict, chats: int, new_tokens: int, alone: bool):
    """Greedy replies (token ids) of ``chats`` prompts; with ``alone``, the first character on
    the single-adapter engine, else the whole cast on the cast engine, mixed."""
    import serve as bench

    from bot.engine.base import make_engines
    from bot.engine.local import GREEDY_TEMPERATURE, LocalEngine

    names = list(members)
    config = bench.bench_config(base, new_tokens, chats, cast=[] if alone else names)
    config = replace(config, model=replace(config.model, load_in_4bit=False))
    if alone:
        engine = LocalEngine(config, members[names[0]])
        voices = {names[0]: engine}
    else:
        engine, voices = make_engines(config, members)
    await engine.start()
    who = [names[0] if alone else names[i % len(names)] for i in range(chats)]
    prompts = bench.make_prompts(lambda sample: sample, chats)
    ids = []
    manager = engine._manager
    for i, (name, sample) in enumerate(zip(who, prompts)):
        voice = voices[name]
        text = voice.render(sample)
        row = engine.tokenizer(text, add_special_tokens=engine._special)["input_ids"]
        ids.append(row)
        if not alone:
            engine._routed(f"check{i}", voice.slot)
        manager.add_request(row, request_id=f"check{i}", max_new_tokens=new_tokens,
                            temperature=GREEDY_TEMPERATURE, eos_token_id=engine._eos)
    done = {}
    while len(done) < chats:
        result = manager.get_result(timeout=300)
        if result is None:
            raise RuntimeError(f"the engine stopped: {manager.background_thread_status.fatal_error}")
        if result.request_id.startswith("check"):
            done[result.request_id] = result.generated_tokens
    replies = [done[f"check{i}"] for i in range(chats)]
    batching = engine.status().batching
    await engine.close()
    return ids, replies, who, batching


def score(base: str, members: dict, ids, replies, who) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").to(device)
    names = list(members)
    model = PeftModel.from_pretrained(model, str(members[names[0]].path), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(members[name].path), adapter_name=name)
    model.eval()
    same = total = 0
    worst = 0.0
    with torch.no_grad():
        for prompt, reply, name in zip(ids, replies, who):
            model.set_adapter(name)
            full = torch.tensor([prompt + reply], device=device)
            logits = model(full).logits[0, len(prompt) - 1:len(prompt) - 1 + len(reply)].float()
            chosen = torch.tensor(reply, device=device)
            gap = logits.max(-1).values - logits.gather(1, chosen[:, None])[:, 0]
            same += int((gap == 0).sum())
            total += len(reply)
            worst = max(worst, float(gap.max()))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens": total, "argmax_share": same / max(total, 1), "largest_gap": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 small layers (default: the 8B shape)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random model")
    parser.add_argument("--cast", type=int, default=4, help="characters (default 4)")
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import serve as bench

    from training.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="rolebot-cast-check-"))
    base = str(work / "model")
    adapter = bench.build_random_llama(Path(base), args.tokenizer, args.tiny, lora=True)
    v1 = bench.save_version(work, adapter, base)
    members = {name: Registry(work / "adapters", name).get(version)
               for name, version in bench.cast_versions(v1, args.cast)}
    rows = {}
    for label, alone in (("one character, single-adapter engine", True), (f"a cast of {args.cast}, mixed", False)):
        ids, replies, who, batching = asyncio.run(serve(base, members, args.chats, args.new_tokens, alone))
        rows[label] = {**score(base, members, ids, replies, who), "batching": batching}
    print("| served | engine | reply tokens | engine token = float32 argmax (peft, its character's adapter) | largest logit gap |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['batching']} | {r['tokens']} | {r['argmax_share']:.1%} | {r['largest_gap']:.3f} |")
    alone, cast = rows.values()
    return 0 if cast["argmax_share"] >= alone["argmax_share"] - 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
