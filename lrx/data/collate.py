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
        """Collates ``examples`` (dicts with ``input_ids`` and ``labels``) into tensors. Packed
        rows (with ``position_ids``) get their ``position_ids`` and no ``attention_mask``:
        transformers then masks attention between the examples of a row (below)."""
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
        if "position_ids" in examples[0]:
            # Padding (only a dataset shorter than one block has a shorter row) is one more
            # sequence, from position 0, that no real token attends to.
            positions = torch.arange(max_len).repeat(len(ids), 1)
            for i, ex in enumerate(examples):
                positions[i, : len(ids[i])] = torch.as_tensor(ex["position_ids"], dtype=torch.long)
            return {"input_ids": input_ids, "position_ids": positions, "labels": labels}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The real (not padding) tokens of a collated batch; packed rows are all real tokens."""
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def pack_sequences(ds: datasets.Dataset, block_size: int) -> datasets.Dataset:
    """Concatenates tokenized examples into blocks of exactly ``block_size`` tokens, with the
    ``position_ids`` of each token within its example.

    ``input_ids`` and ``labels`` are concatenated in dataset order and cut into blocks;
    labels travel with their tokens, so masked prompt tokens stay masked, and the first token
    of every example is masked too (what precedes it belongs to another example). The trailing
    partial block is dropped when at least one full block exists (if the whole dataset is
    shorter than one block, that single shorter block is kept).

    Examples do not attend to each other: positions restart at 0 with every example, and
    without an ``attention_mask`` transformers (>= 4.53, ``masking_utils.find_packed_sequence_indices``)
    masks attention to the tokens of the same example (padding-free packing: every token is
    real, none attends across). A block that starts inside an example keeps that example's
    positions and sees only its own part of it.

    Args:
        ds: Dataset with list columns ``input_ids`` and ``labels``.
        block_size: Tokens per block (``max_length``).

    Returns:
        Dataset with ``input_ids``, ``labels`` and ``position_ids``, one row per block.
    """

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        ids = [t for seq in batch["input_ids"] for t in seq]
        labels = [t for seq in batch["labels"] for t in [IGNORE_INDEX, *seq[1:]][: len(seq)]]
        positions = [p for seq in batch["input_ids"] for p in range(len(seq))]
        n_full = len(ids) // block_size
        ends = [(i + 1) * block_size for i in range(n_full)] if n_full else [len(ids)]
        starts = [e - block_size for e in ends] if n_full else [0]
        return {key: [values[s:e] for s, e in zip(starts, ends)]
                for key, values in (("input_ids", ids), ("labels", labels), ("position_ids", positions))}

    features = datasets.Features({**ds.features, "position_ids": datasets.List(datasets.Value("int64"))})
    # batch_size=None: one batch, so blocks span the whole dataset, not per-1000-row chunks.
    return ds.map(
        pack,
        batched=True,
        batch_size=None,
        remove_columns=ds.column_names,
        features=features,
        keep_in_memory=True,
        desc="Packing",
    )
