"""Packed rows must behave exactly like separate samples, and only replies carry the loss."""

from __future__ import annotations

import pytest

from training.evaluate import chrf, rouge_l
from training.character import answers_in_character, breaks_character
from training.packing import IGNORE, Collator, Encoded, encode, pack, to_records
from training.prompts import PromptStyle, Sample


def test_first_fit_packing_respects_capacity_and_keeps_every_sample():
    samples = [Encoded(tuple(range(n)), tuple(range(n))) for n in (50, 30, 70, 20, 90, 10)]
    rows = pack(samples, capacity=100, seed=3)
    assert sorted(len(s.input_ids) for row in rows for s in row) == [10, 20, 30, 50, 70, 90]
    assert all(sum(len(s.input_ids) for s in row) <= 100 for row in rows)
    assert len(rows) == 3


def test_block_mask_and_positions_restart_per_sample():
    records = to_records([[Encoded((1, 2, 3), (IGNORE, 2, 3)), Encoded((4, 5), (IGNORE, 5))], [Encoded((6,), (6,))]])
    batch = Collator(pad_id=0)(records)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert mask[0, 0, 3].tolist() == [False, False, False, True, False]  # sample 2 cannot see sample 1
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False]
    assert batch["labels"][1].tolist() == [6, IGNORE, IGNORE, IGNORE, IGNORE]


@pytest.mark.slow
def test_packed_logits_equal_separate_logits_on_the_real_model(builtin_path):
    import torch

    from training.modeling import load_base
    from training.settings import ModelSettings

    model, tokenizer = load_base(ModelSettings(base=builtin_path, max_seq_length=512))
    style = PromptStyle("alpaca", "你是甄嬛。", "甄嬛")
    samples = [Sample("皇上吉祥！", "臣妾给皇上请安。"), Sample("你是谁？", "嫔妾甄嬛，大理寺少卿之女。"), Sample("天冷了", "多谢姐姐挂念。")]
    encoded, _ = encode(samples, tokenizer, style, 512, "truncate")
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in encoded]
        batch = Collator(tokenizer.pad_token_id)(to_records([encoded]))
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]
    start = 0
    for logits in alone:
        n = logits.shape[0]
        assert torch.allclose(packed[start:start + n], logits, atol=2e-3), (packed[start:start + n] - logits).abs().max()
        start += n


@pytest.mark.slow
def test_loss_is_on_the_reply_and_eos_only(builtin_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_path)
    (sample,), _ = encode([Sample("皇上吉祥！", "臣妾给皇上请安。")], tokenizer, PromptStyle(), 512, "truncate")
    target = [t for t in sample.labels if t != IGNORE]
    assert tokenizer.decode(target) == "臣妾给皇上请安。" + tokenizer.eos_token
    assert sample.input_ids[-len(target):] == tuple(target)


def test_text_metrics():
    assert chrf("臣妾给皇上请安", "臣妾给皇上请安") == pytest.approx(100)
    assert chrf("", "臣妾") == 0.0
    assert 0 < chrf("臣妾请安", "臣妾给皇上请安") < 100
    assert rouge_l("臣妾给皇上请安", "臣妾给皇上请安") == pytest.approx(100)
    assert rouge_l("abc", "xyz") == 0.0
    assert rouge_l("臣妾请安", "臣妾给皇上请安") == pytest.approx(100 * 2 * 1.0 * (4 / 7) / (1 + 4 / 7))


def test_character_break_detection():
    assert breaks_character("我是一个AI助手，很高兴为您服务。")
    assert breaks_character("As a language model, I cannot")
    assert not breaks_character("臣妾不敢，皇上折煞臣妾了。")
    assert answers_in_character("嫔妾甄嬛，给皇后娘娘请安。", ("甄嬛",))
    assert not answers_in_character("我是人工智能。", ("甄嬛",))
    assert not answers_in_character("今天天气很好。", ("甄嬛",))


def test_flattened_batches_sort_and_bucket_samples_without_exposing_padding():
    records = to_records([[Encoded((1, 2, 3), (IGNORE, 2, 3)), Encoded((4,) * 17, (IGNORE,) + (4,) * 16)],
                          [Encoded((5, 6), (IGNORE, 6))]])
    batch = Collator(pad_id=0, flatten=True)(records)
    assert batch["packed_seq_lengths"].tolist() == [16, 16, 32]  # sorted, each a multiple of 16
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[:2] == [5, 6] and ids[2:16] == [0] * 14 and ids[16:19] == [1, 2, 3] and ids[32:49] == [4] * 17
    assert labels[2:16] == [IGNORE] * 14  # padding carries no loss
    assert batch["position_ids"][0].tolist()[:18] == list(range(16)) + [0, 1]
    # Every real label survives.
    assert sorted(t for t in labels if t != IGNORE) == sorted([2, 3, 6] + [4] * 16)


@pytest.mark.slow
def test_the_logged_token_count_is_the_real_tokens_of_packed_rows(builtin_path):
    """TRL sums the attention mask for ``num_tokens``; a block mask has ~L²/2 entries per row."""
    from training.modeling import load_base, unsloth
    from training.settings import LoraSettings, ModelSettings, TrainSettings
    from training.sft import add_lora, build_trainer

    model, tokenizer = load_base(ModelSettings(base=builtin_path, max_seq_length=512))
    model = add_lora(unsloth(), model, LoraSettings(), None)
    samples = [Sample("皇上吉祥！", "臣妾给皇上请安。"), Sample("你是谁？", "嫔妾甄嬛，大理寺少卿之女。"),
               Sample("天冷了", "多谢姐姐挂念。"), Sample("这花开得好", "是倚梅园的红梅。")]
    encoded, _ = encode(samples, tokenizer, PromptStyle(), 512, "truncate")
    rows = pack(encoded, capacity=2 * max(len(e.input_ids) for e in encoded), seed=3407)
    assert any(len(row) > 1 for row in rows)
    settings = TrainSettings(max_steps=1, batch_size=len(rows), grad_accum=1, warmup_steps=0, logging_steps=1)
    trainer = build_trainer(model, tokenizer, to_records(rows), settings, True)
    assert not trainer.data_collator.flatten  # the CPU fallback honours the block mask
    trainer.train()
    logged = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    assert logged == [sum(len(e.input_ids) for e in encoded)]
