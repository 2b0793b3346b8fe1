"""Prompt order: with the history first, a chat's next prompt begins with this one's start."""

from __future__ import annotations

import pytest

from training.prompts import Canon, Exchange, PromptStyle, Sample, served_history_first

PERSONA = "你是甄嬛。"
CANON = (Canon("皇帝", "你叫什么名字？", "臣妾甄嬛。"),)


def chat(turns: int) -> tuple[Exchange, ...]:
    return tuple(Exchange("用户" if i % 2 == 0 else "甄嬛", f"第{i}句话") for i in range(turns))


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_the_next_prompt_begins_with_the_prefix_of_this_history(fmt, builtin_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_path)
    style = PromptStyle(fmt, PERSONA, "甄嬛", canon_k=1)
    history = chat(4)
    now = style.prompt(Sample("今天天气如何？", history=history, canon=CANON), tokenizer)
    start = style.prefix(history + (Exchange("用户", "今天天气如何？"),), tokenizer)
    later = style.prompt(Sample("那明日呢？", canon=(Canon("华妃", "明日如何？", "明日再说。"),),
                                history=history + (Exchange("用户", "今天天气如何？"), Exchange("甄嬛", "晴。"))),
                         tokenizer)
    # The prefix is what the next prompt starts with, whatever its message and canon.
    assert later.startswith(start)
    assert "那明日呢" not in start and "明日再说" not in start and "晴。" not in start
    # This prompt and the next share everything up to the end of this one's history.
    shared = style.prefix(history, tokenizer)
    assert now.startswith(shared) and later.startswith(shared)
    assert "第3句话" in shared
    special = fmt != "chat"
    ids_now = tokenizer(now, add_special_tokens=special)["input_ids"]
    ids_later = tokenizer(later, add_special_tokens=special)["input_ids"]
    ids_shared = tokenizer(shared, add_special_tokens=special)["input_ids"]
    assert common(ids_now, ids_later) >= len(ids_shared) - 1  # tokens too, but for the joint


def test_the_tutorial_order_puts_the_message_first_and_has_no_prefix():
    style = PromptStyle("alpaca", PERSONA, "甄嬛", history_first=False)
    prompt = style.prompt(Sample("皇上吉祥", history=chat(2)), None)
    assert prompt.index("### Instruction:\n皇上吉祥") < prompt.index("### Input:\n用户：第0句话\n甄嬛：第1句话")
    assert style.prefix(chat(2), None) == ""
    first = PromptStyle("alpaca", PERSONA, "甄嬛").prompt(Sample("皇上吉祥", history=chat(2)), None)
    assert first.index("### Input:\n用户：第0句话\n甄嬛：第1句话") < first.index("### Instruction:\n皇上吉祥")
    # The same template words and the same reply slot in both orders.
    assert first.endswith("### Response:\n") and prompt.endswith("### Response:\n")


def test_an_adapter_is_served_in_the_order_it_learned():
    assert served_history_first({"config": {"prompt": {"fmt": "alpaca", "history_first": True}}}, False) is True
    # An adapter from before the order was recorded learned the tutorial's.
    assert served_history_first({"config": {"prompt": {"fmt": "alpaca", "canon_k": 0}}}, True) is False
    assert served_history_first({}, True) is True  # no record: the base model, the config's order
    assert served_history_first(None, False) is False
