"""Batching: right-padding collation and packing of tokenized examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

IGNORE_INDEX = -100
"""Label value ignored by the loss (PyTorch ``CrossEntropyLoss`` default)."""


def pad_token_id(tokenizer: Any) -> int:
    """Pad id of the tokenizer; falls back to EOS, then 0 (decoder LMs often lack a pad)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass
class Collator:
    """Right-pads a list of tokenized examples to the longest one in the batch.

    A plain class (not a closure) so ``DataLoader`` workers can pickle it.

    Attributes:
        pad_token_id: Id written into padded ``input_ids`` positions.
        task: ``"causal_lm"`` pads per-token ``labels`` with ``IGNORE_INDEX``;
            ``"classification"`` / ``"regression"`` stack scalar labels into a 1-D
            LongTensor / FloatTensor.
    """

    pad_token_id: int
    task: str

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates ``examples`` (dicts with ``input_ids`` and ``labels``) into tensors."""
        ids = [torch.as_tensor(ex["input_ids"], dtype=torch.long).reshape(-1) for ex in examples]
        max_len = max(len(t) for t in ids)
        input_ids = torch.full((len(ids), max_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), max_len), dtype=torch.long)
        for i, t in enumerate(ids):
            input_ids[i, : len(t)] = t
            attention_mask[i, : len(t)] = 1
        if self.task == "causal_lm":
            labels = torch.full((len(ids), max_len), IGNORE_INDEX, dtype=torch.long)
            for i, ex in enumerate(examples):
                lab = torch.as_tensor(ex["labels"], dtype=torch.long).reshape(-1)
                labels[i, : len(lab)] = lab
        else:
            dtype = torch.float32 if self.task == "regression" else torch.long
            labels = torch.as_tensor([ex["labels"] for ex in examples], dtype=dtype).reshape(-1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_sequences(ds: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Concatenates tokenized examples into blocks of exactly ``block_size`` tokens.

    ``input_ids`` and ``labels`` are concatenated in dataset order and cut into blocks;
    labels travel with their tokens, so masked prompt tokens stay masked. The trailing
    partial block is dropped when at least one full block exists (if the whole dataset
    is shorter than one block, that single shorter block is kept).

    Note that packed blocks are attended as one sequence: attention crosses example
    boundaries (no per-example masks or position resets). This is the usual trade-off of
    simple packing; it wastes no compute on padding.

    Args:
        ds: Dataset with list columns ``input_ids`` and ``labels``.
        block_size: Tokens per block (``max_length``).

    Returns:
        Dataset with the same two columns, one row per block.
    """

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        ids = [t for seq in batch["input_ids"] for t in seq]
        labels = [t for seq in batch["labels"] for t in seq]
        n_full = len(ids) // block_size
        ends = [(i + 1) * block_size for i in range(n_full)] if n_full else [len(ids)]
        starts = [e - block_size for e in ends] if n_full else [0]
        return {
            "input_ids": [ids[s:e] for s, e in zip(starts, ends)],
            "labels": [labels[s:e] for s, e in zip(starts, ends)],
        }

    # batch_size=None: one batch, so blocks span the whole dataset, not per-1000-row chunks.
    return ds.map(
        pack,
        batched=True,
        batch_size=None,
        remove_columns=ds.column_names,
        features=ds.features,
        keep_in_memory=True,
        desc="Packing",
    )
