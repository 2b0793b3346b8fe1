#!/usr/bin/env python3
"""Correctness of the engine's attention on CUDA: each greedy reply against the model itself.

For each attention (``Tuning.attention``: ``auto``, PyTorch's flash kernel over the paged cache
on CUDA, and ``sdpa``, transformers' paged SDPA), the engine serves ``--chats`` prompts at once,
greedy, bf16 weights (no 4-bit: the reference must have the same weights). Then a float32 copy
of the same model, plain transformers with SDPA and no cache, reads each prompt + reply in one
forward, and at every reply position the engine's token is compared with the reference's
argmax: the share that match, and the largest gap (reference logit of its argmax minus that of
the engine's token). Attention that read the wrong keys gives gaps of whole logits within a few
tokens; bf16 rounding gives near-ties only. Exit status 1 when ``auto`` is clearly worse.

    PYTHONPATH=/tmp/site:$PWD python3 bench/attention_check.py --tiny --tokenizer bench-tok
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


async def serve(base: str, attention: str, chats: int, new_tokens: int) -> tuple[list[list[int]], list[list[int]], str]:
    import serve as bench

    from bot.engine.local import GREEDY_TEMPERATURE, LocalEngine, Tuning

    config = bench.bench_config(base, new_tokens, chats)
    config = replace(config, model=replace(config.model, load_in_4bit=False))
    engine = LocalEngine(config, None, Tuning(attention=attention))
    await engine.start()
    prompts = bench.make_prompts(engine.render, chats)
    manager = engine._manager
    ids = [engine.tokenizer(p, add_special_tokens=engine._special)["input_ids"] for p in prompts]
    for i, row in enumerate(ids):
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
    return ids, replies, batching


def score(base: str, ids: list[list[int]], replies: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    same = total = 0
    worst = 0.0
    with torch.no_grad():
        for prompt, reply in zip(ids, replies):
            full = torch.tensor([prompt + reply], device=device)
            logits = model(full).logits[0, len(prompt) - 1:len(prompt) - 1 + len(reply)]
            chosen = torch.tensor(reply, device=device)
            best = logits.max(-1).values
            gap = best - logits.gather(1, chosen[:, None])[:, 0]
            same += int((gap == 0).sum())
            total += len(reply)
            worst = max(worst, float(gap.max()))
    del model
    torch.cuda.empty_cache()
    return {"tokens": total, "argmax_share": same / max(total, 1), "largest_gap": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 small layers (default: the 8B shape)")
    parser.add_argument("--tokenizer", help="tokenizer folder for the random model")
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    import serve as bench

    work = Path(tempfile.mkdtemp(prefix="rolebot-attention-check-"))
    base = str(work / "model")
    bench.build_random_llama(Path(base), args.tokenizer, args.tiny, lora=False)
    rows = {}
    for attention in ("auto", "sdpa"):
        ids, replies, batching = asyncio.run(serve(base, attention, args.chats, args.new_tokens))
        rows[attention] = {**score(base, ids, replies), "batching": batching}
    print("| attention | engine | reply tokens | engine token = float32 argmax | largest logit gap |")
    print("|---|---|---|---|---|")
    for attention, r in rows.items():
        print(f"| {attention} | {r['batching']} | {r['tokens']} | {r['argmax_share']:.1%} | {r['largest_gap']:.3f} |")
    auto, sdpa = rows["auto"], rows["sdpa"]
    return 0 if auto["argmax_share"] >= sdpa["argmax_share"] - 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
