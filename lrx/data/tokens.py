"""Tokenization shared by the formats: batched ``Dataset.map`` into ``input_ids`` + ``labels``.

Tokenised datasets are cached as Arrow files in a folder (``DEFAULT_CACHE_DIR`` unless the
caller gives another, or None for in memory), named by a key over everything the tokens
depend on: the untokenized rows, the tokenizer's full state, the tokenization settings and
the library versions. A second process (or run) with the same inputs memory-maps the file
instead of tokenising again; ``build_datasets``' ``main_process_first`` lets one process
write it while the others wait. Files are written to a temporary name and renamed
(``datasets``' ``Dataset.map``), so a killed run never leaves a partial file behind; the
folder is safe to delete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import pyarrow as pa

logger = logging.getLogger(__name__)

_CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
DEFAULT_CACHE_DIR = _CACHE_HOME / "lrx" / "datasets"
"""Where tokenised datasets are cached unless the caller names another folder."""

TOKENIZATION_VERSION = 1
"""Part of every cache key: bump it when the tokenize functions of lrx.data change."""


@dataclass
class TokenCache:
    """Where tokenised datasets are cached.

    Attributes:
        folder: Cache folder, shared by the processes of a run; None = tokenise in memory.
    """

    folder: Path | None = None
    _tokenizer_states: dict[int, str | None] = field(default_factory=dict, repr=False)
    """Fingerprint by ``id(tokenizer)``: 0.5 s for SmolLM2's, so taken once per build."""

    def map(self, ds: datasets.Dataset, tokenize: Callable, label_feature: Any, tokenizer: Any,
            **settings: Any) -> datasets.Dataset:
        """Batched ``tokenize`` over ``ds`` into ``input_ids`` + ``labels``, cached if it can be.

        Args:
            ds: Untokenized rows.
            tokenize: Batched function of ``ds``'s columns.
            label_feature: ``datasets`` feature of the ``labels`` column.
            tokenizer: The tokenizer ``tokenize`` calls (part of the cache key).
            **settings: Everything else ``tokenize`` depends on (part of the cache key).
        """
        features = datasets.Features(
            {"input_ids": datasets.List(datasets.Value("int64")), "labels": label_feature}
        )
        kwargs = dict(batched=True, remove_columns=ds.column_names, features=features,
                      desc="Tokenizing")
        key = self._key(ds, tokenizer, settings)
        if key is None:
            return ds.map(tokenize, keep_in_memory=True, **kwargs)
        path = self.folder / f"tokenized-{key}.arrow"
        return ds.map(tokenize, cache_file_name=str(path), load_from_cache_file=True,
                      new_fingerprint=key, **kwargs)

    def _key(self, ds: datasets.Dataset, tokenizer: Any, settings: dict[str, Any]) -> str | None:
        """The cache key of tokenising ``ds``; None where the result is not to be cached."""
        if self.folder is None:
            return None
        if id(tokenizer) not in self._tokenizer_states:
            self._tokenizer_states[id(tokenizer)] = tokenizer_fingerprint(tokenizer)
        tokenizer_state = self._tokenizer_states[id(tokenizer)]
        if tokenizer_state is None:
            logger.debug("%s has no fast tokenizer state to key a cache on: tokenising in memory",
                         type(tokenizer).__name__)
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            logger.warning("cannot create the dataset cache folder %s (%s): tokenising in memory",
                           self.folder, e.strerror or type(e).__name__)
            return None
        import tokenizers
        import transformers

        versions = [TOKENIZATION_VERSION, datasets.__version__, tokenizers.__version__,
                    transformers.__version__]
        parts = [content_hash(ds), tokenizer_state, json.dumps(settings, sort_keys=True), versions]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def content_hash(ds: datasets.Dataset) -> str:
    """SHA-256 of the rows of ``ds`` (its Arrow table, schema and features included)."""
    table = ds.with_format("arrow")[:]  # the selected rows only, indices mapping applied
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """SHA-256 of what decides a fast tokenizer's ids; None for a slow (Python) tokenizer.

    The backend's JSON holds normaliser, pre-tokenizer, vocabulary, merges, added tokens and
    the post-processor that adds special tokens; its truncation and padding state is left
    out (set by each call, not by the tokenizer). Slow tokenizers keep behaviour in Python
    attributes that no state covers, so they are never cached.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    init = {k: repr(v) for k, v in sorted(tokenizer.init_kwargs.items())
            if "file" not in k and k != "name_or_path"}  # where it was read from does not matter
    blob = json.dumps([type(tokenizer).__name__, state, init], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_classification(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, regression: bool, cache: TokenCache
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

    label_feature = datasets.Value("float32" if regression else "int64")
    return cache.map(ds, tokenize, label_feature, tokenizer, kind="classification",
                     max_length=max_length, regression=regression)
