"""Every format `rolebot prepare` writes can be trained on."""

from __future__ import annotations

import pytest

from bot.cli import main
from training.dataset import load_samples
from training.errors import UserError
from training.screenplay import SAMPLE_SCRIPT


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "jsonl"])
def test_each_prepared_format_loads_the_same_pairs(tmp_path, fmt):
    out = tmp_path / f"pairs.{fmt}"
    assert main(["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--alias", "莞贵人",
                 "--output", str(out), "--format", fmt, "--history", "2"]) == 0
    samples = load_samples(out, "甄嬛")
    alpaca = tmp_path / "ref.json"
    assert main(["prepare", str(SAMPLE_SCRIPT), "--character", "甄嬛", "--alias", "莞贵人",
                 "--output", str(alpaca), "--history", "2"]) == 0
    reference = load_samples(alpaca)
    assert [s.output for s in samples] == [s.output for s in reference]
    # Conversation formats merge consecutive lines of other speakers into one user turn.
    assert all(s.instruction.endswith(r.instruction) for s, r in zip(samples, reference))
    if fmt != "alpaca":
        assert any(s.history for s in samples)
        assert all(t.speaker in ("甄嬛", "用户") for s in samples for t in s.history)


def test_a_conversation_that_does_not_end_with_the_character_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 1: a conversation must end with a user turn and then an assistant turn"):
        load_samples(bad)
