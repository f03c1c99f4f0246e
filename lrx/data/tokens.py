"""Tokenization shared by the formats: batched ``Dataset.map`` into ``input_ids`` + ``labels``."""

from __future__ import annotations

from typing import Any, Callable

import datasets


def map_tokenize(ds: datasets.Dataset, tokenize: Callable, label_feature: Any) -> datasets.Dataset:
    """Batched ``tokenize`` over ``ds`` into ``input_ids`` + ``labels``, in memory (no cache files)."""
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int64")), "labels": label_feature}
    )
    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, features=features,
                  keep_in_memory=True, desc="Tokenizing")


def tokenize_classification(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, regression: bool
) -> datasets.Dataset:
    """Tokenizes ``text_a`` (+ ``text_b``) and keeps only ``input_ids`` and ``labels``."""
    pair = "text_b" in ds.column_names

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        enc = tokenizer(
            batch["text_a"],
            batch["text_b"] if pair else None,
            truncation=True,
            max_length=max_length,
        )
        return {"input_ids": enc["input_ids"], "labels": batch["label"]}

    return map_tokenize(ds, tokenize, datasets.Value("float32" if regression else "int64"))
