"""Tokenised samples, and batches of them with no padding waste and no cross-sample attention.

Short role-play samples leave a GPU idle at the tutorial's batch of 2. Packing many samples
into one row fixes that, but plain packing lets a sample attend to the samples before it in
the row. Here every packed row carries a 4D block-diagonal causal mask and positions that
restart at each sample, so a packed sample sees exactly what it would see alone (the tests
compare the logits).

Unsloth's fast CUDA models drop any attention mask while training (they assume right
padding), so there a 4D mask would be silently ignored and packed samples would attend to
each other. For them the collator flattens the batch into one row and passes the samples'
lengths as ``packed_seq_lengths``, Unsloth's own packed-sequence metadata: its attention then
runs per sample (a varlen kernel where one exists). ``bench/train.py`` checks the logits there.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.prompts import PromptStyle, Sample

if TYPE_CHECKING:  # torch loads only when a batch is built: `rolebot --help` stays quick
    import torch

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE over the prompt: the loss is on the response only


def encode(samples: list[Sample], tokenizer, style: PromptStyle, max_len: int, overlong: str) -> tuple[list[Encoded], Counter]:
    """Tokenise; count what was truncated or skipped for being longer than ``max_len``."""
    encoded, counts = [], Counter()
    for sample in samples:
        prompt = style.prompt_ids(sample, tokenizer)
        reply = tokenizer(sample.output + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids, labels = prompt + reply, [IGNORE] * len(prompt) + reply
        if len(ids) > max_len:
            if overlong == "skip" or len(prompt) >= max_len - 1:
                counts["skipped (longer than max_seq_length)"] += 1
                continue
            counts["truncated to max_seq_length"] += 1
            ids, labels = ids[:max_len], labels[:max_len]
        encoded.append(Encoded(tuple(ids), tuple(labels)))
    return encoded, counts


def pack(samples: list[Encoded], capacity: int, seed: int) -> list[list[Encoded]]:
    """First-fit-decreasing bins of at most ``capacity`` tokens, in a seeded random order."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda s: len(s.input_ids), reverse=True):
        size = len(sample.input_ids)
        for i, free in enumerate(room):
            if size <= free:
                rows[i].append(sample)
                room[i] -= size
                break
        else:
            rows.append([sample])
            room.append(capacity - size)
    random.Random(seed).shuffle(rows)
    return rows


def to_records(rows: list[list[Encoded]]) -> list[dict]:
    """Rows as dataset records: the concatenated tokens plus each sample's length."""
    return [
        {
            "input_ids": [t for s in row for t in s.input_ids],
            "labels": [t for s in row for t in s.labels],
            "seq_lengths": [len(s.input_ids) for s in row],
        }
        for row in rows
    ]


class Collator:
    """Pads rows to the batch's longest; rows holding several samples get a block mask.

    ``flatten=True`` (for Unsloth's CUDA models, see the module's docstring): the batch becomes
    one row of all its samples, with restarting ``position_ids`` and ``packed_seq_lengths``
    instead of a mask, and no padding at all.
    """

    def __init__(self, pad_id: int, *, flatten: bool = False):
        self.pad_id = pad_id
        self.flatten = flatten

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        if self.flatten:
            return flat_batch(records, self.pad_id)
        width = max(len(r["input_ids"]) for r in records)
        ids = torch.full((len(records), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(records), width), dtype=torch.long)
        segments = torch.full((len(records), width), -1, dtype=torch.long)
        for row, record in enumerate(records):
            n = len(record["input_ids"])
            ids[row, :n] = torch.tensor(record["input_ids"])
            labels[row, :n] = torch.tensor(record["labels"])
            start = 0
            for index, length in enumerate(record["seq_lengths"]):
                positions[row, start:start + length] = torch.arange(length)
                segments[row, start:start + length] = index
                start += length
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if all(len(r["seq_lengths"]) == 1 for r in records):
            batch["attention_mask"] = (segments >= 0).long()
        else:
            batch["attention_mask"] = block_causal_mask(segments)
        return batch


def flat_batch(records: list[dict], pad_id: int = 0, bucket: int = 16) -> dict[str, torch.Tensor]:
    """All samples of the batch in one row: (1, tokens) ids, labels and restarting positions,
    plus ``packed_seq_lengths`` (int32), which Unsloth turns into per-sample attention.

    Unsloth launches one attention kernel per run of equal-length samples, so the samples are
    sorted by length and each is padded at its end to a multiple of ``bucket``: a few runs per
    batch instead of one per sample. The padding comes after the sample's last token, so
    causal attention never lets a real token see it, and its labels are ignored.
    """
    import torch

    samples = []
    for record in records:
        start = 0
        for length in record["seq_lengths"]:
            samples.append((record["input_ids"][start:start + length], record["labels"][start:start + length]))
            start += length
    samples.sort(key=lambda s: len(s[0]))
    ids, labels, positions, lengths = [], [], [], []
    for sample_ids, sample_labels in samples:
        padded = -(-len(sample_ids) // bucket) * bucket
        extra = padded - len(sample_ids)
        ids += list(sample_ids) + [pad_id] * extra
        labels += list(sample_labels) + [IGNORE] * extra
        positions += range(padded)
        lengths.append(padded)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "packed_seq_lengths": torch.tensor(lengths, dtype=torch.int32),
    }


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) bool: token i sees token j iff same sample and j <= i.

    Padding (segment -1) sees only itself, so no softmax row is empty (which would be NaN).
    """
    import torch

    width = segments.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    pad_self = (segments[:, :, None] < 0) & torch.eye(width, dtype=torch.bool)
    return ((same & causal & (segments[:, :, None] >= 0)) | pad_self)[:, None]
