"""Dataset loading, tokenization and batching.

Three input formats are supported (``cfg.format``), one module each:

* ``"instruct"`` (``lrx.data.instruct``): JSONL for causal-LM fine-tuning. Each line is one
  of ``{"prompt", "response"}``, Alpaca ``{"instruction", "input"?, "output"}`` or
  ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's.
* ``"glue"`` (``lrx.data.glue``): the original GLUE ``train.tsv`` / ``dev.tsv`` files of one
  task.
* ``"table"`` (``lrx.data.table``): a generic CSV/TSV with a header, one or two text columns
  and a label.

Padding and packing live in ``lrx.data.collate``, file reading in ``lrx.data.files``.

Files are parsed in memory (``datasets.Dataset.from_dict``); the tokenised datasets are
cached as Arrow files in lrx's own folder (``lrx.data.tokens``: ``~/.cache/lrx/datasets``
unless the caller names another or None), never in the HF datasets cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import datasets
import torch

from lrx.data.collate import IGNORE_INDEX, Collator, pack_sequences, pad_token_id
from lrx.data.files import existing_file, head
from lrx.data.glue import GLUE_TASKS, GlueTask, load_glue_file, normalize_glue_task
from lrx.data.instruct import (
    PLAIN_PROMPT_TEMPLATE,
    check_tokenized,
    prompt_add_special_tokens,
    read_instruct,
    render_prompt,
    tokenize_instruct,
)
from lrx.data.table import load_table
from lrx.data.tokens import DEFAULT_CACHE_DIR, TokenCache, tokenize_classification
from lrx.errors import DataError

__all__ = [
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "PLAIN_PROMPT_TEMPLATE",
    "Collator",
    "DEFAULT_CACHE_DIR",
    "DataBundle",
    "GlueTask",
    "build_datasets",
    "load_glue_file",
    "normalize_glue_task",
    "pack_sequences",
    "prompt_add_special_tokens",
    "render_prompt",
]


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side.

    Attributes:
        train: Tokenized training set with columns ``input_ids`` and ``labels``.
        eval: Tokenized evaluation set, or None when no eval file was given.
        task: ``"causal_lm"``, ``"classification"`` or ``"regression"``.
        num_labels: Number of classes; 1 for regression, 0 for causal LM.
        label_names: Class names indexed by label id, or None when unknown/not applicable.
        metric_names: Names understood by ``lrx.metrics.compute_metrics``.
        collate_fn: Turns a list of examples into a padded batch of tensors
            (``input_ids``, ``attention_mask``, ``labels``).
    """

    train: datasets.Dataset
    eval: datasets.Dataset | None
    task: str
    num_labels: int
    label_names: list[str] | None
    metric_names: list[str]
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def build_datasets(
    cfg: Any,
    tokenizer: Any,
    *,
    seed: int = 0,
    main_process_first: Callable[[], ContextManager] = contextlib.nullcontext,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
) -> DataBundle:
    """Loads, tokenizes and (optionally) packs the train/eval data described by ``cfg``.

    Every process reads and checks the files; tokenisation, the slow part, runs once. It
    runs under one ``main_process_first()`` context (train and eval together) and writes
    its result into ``cache_dir``, keyed by the rows, the tokenizer and the settings; a
    process that finds the file there memory-maps it instead of tokenising.

    Args:
        cfg: The ``data`` config section (``format``, ``train_path``, ``eval_path``,
            ``glue_task``, ``text_columns``, ``label_column``, ``delimiter``,
            ``label_names``, ``regression``, ``max_length``, ``packing``,
            ``mask_prompt``, ``max_train_samples``, ``max_eval_samples``).
        tokenizer: A Hugging Face tokenizer.
        seed: Accepted for API stability. Loading is deterministic and does not shuffle
            (``max_*_samples`` take the first rows; the trainer's sampler shuffles).
        main_process_first: Factory of the context manager the tokenisation runs in. A
            distributed caller passes one that lets the main process run the body first
            while the others wait at a barrier, then lets them in (they then load its
            cache file). The body raises nothing that depends on the process: every check
            of the data happens before or after it. Default: no waiting.
        cache_dir: Folder for the tokenised Arrow files, shared by all processes of a run
            (on several nodes: on a shared file system, else each node tokenises once).
            Default ``$XDG_CACHE_HOME/lrx/datasets`` (``~/.cache/lrx/datasets``); None
            tokenises in memory and writes nothing. Slow (Python) tokenizers and folders
            that cannot be created are tokenised in memory too.

    Returns:
        A ``DataBundle``. The eval split is never packed, so eval loss is per example.

    Raises:
        DataError: Missing files, malformed rows, unknown columns or labels.
    """
    del seed  # see docstring
    fmt = _check_config(cfg)
    if fmt == "glue" and not cfg.train_path:  # GLUE is not shipped: no default path exists
        raise DataError(
            "data.train_path is not set; point it at your copy of GLUE, e.g. "
            "data.train_path=GLUE_DIR/RTE/train.tsv data.eval_path=GLUE_DIR/RTE/dev.tsv"
        )
    train_path = existing_file(cfg.train_path, "data.train_path")
    eval_path = existing_file(cfg.eval_path, "data.eval_path") if cfg.eval_path else None
    cache = TokenCache(Path(cache_dir).expanduser() if cache_dir is not None else None)
    if fmt == "instruct":
        return _build_instruct(cfg, tokenizer, (train_path, eval_path), main_process_first, cache)
    return _build_classification(
        cfg, fmt, tokenizer, (train_path, eval_path), main_process_first, cache
    )


def _check_config(cfg: Any) -> str:
    """Validates the settings every format shares; returns the normalised format name."""
    fmt = (cfg.format or "").strip().lower()
    if fmt not in ("instruct", "glue", "table"):
        raise DataError(
            f"unknown data format {cfg.format!r}; set data.format to instruct, glue or table"
        )
    if not isinstance(cfg.max_length, int) or cfg.max_length <= 0:
        raise DataError(f"data.max_length must be a positive integer, got {cfg.max_length!r}")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        positive = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if value is not None and not positive:
            raise DataError(
                f"data.{key} must be a positive number of rows or null (all rows), got {value!r}"
            )
    if cfg.packing and fmt != "instruct":
        raise DataError(
            f"data.packing only applies to format 'instruct' (format is {fmt!r}); "
            "set data.packing to false"
        )
    return fmt


def _build_instruct(
    cfg: Any,
    tokenizer: Any,
    paths: tuple[Path, Path | None],
    main_process_first: Callable[[], ContextManager],
    cache: TokenCache,
) -> DataBundle:
    """The causal-LM bundle of an instruct JSONL train (and eval) file."""
    train_path, eval_path = paths
    raw_train = head(read_instruct(train_path, tokenizer), cfg.max_train_samples)
    raw_eval = None
    if eval_path:
        raw_eval = head(read_instruct(eval_path, tokenizer), cfg.max_eval_samples)
    args = (tokenizer, cfg.max_length, cfg.mask_prompt, cache)
    with main_process_first():
        train = tokenize_instruct(raw_train, *args)
        eval_ds = tokenize_instruct(raw_eval, *args) if raw_eval is not None else None
    train = check_tokenized(raw_train, train, train_path, cfg.max_length)
    if eval_ds is not None:
        eval_ds = check_tokenized(raw_eval, eval_ds, eval_path, cfg.max_length)
    if cfg.packing:
        train = pack_sequences(train, cfg.max_length)
    return DataBundle(
        train=train,
        eval=eval_ds,
        task="causal_lm",
        num_labels=0,
        label_names=None,
        metric_names=[],
        collate_fn=Collator(pad_token_id(tokenizer), "causal_lm"),
    )


def _build_classification(
    cfg: Any,
    fmt: str,
    tokenizer: Any,
    paths: tuple[Path, Path | None],
    main_process_first: Callable[[], ContextManager],
    cache: TokenCache,
) -> DataBundle:
    """The classification or regression bundle of GLUE or table files."""
    train_path, eval_path = paths
    if fmt == "glue":
        spec = normalize_glue_task(cfg.glue_task)
        raw_train = load_glue_file(train_path, spec)
        raw_eval = load_glue_file(eval_path, spec) if eval_path else None
        regression = spec.regression
        label_names = list(spec.label_names) if spec.label_names else None
        num_labels = 1 if regression else len(spec.label_names)
        metric_names = list(spec.metric_names)
    else:
        raw_train, raw_eval, label_names, num_labels = load_table(cfg, train_path, eval_path)
        regression = bool(cfg.regression)
        metric_names = ["pearson", "spearman"] if regression else ["accuracy"]

    raw_train = head(raw_train, cfg.max_train_samples)
    raw_eval = head(raw_eval, cfg.max_eval_samples)
    args = (tokenizer, cfg.max_length, regression, cache)
    with main_process_first():
        train = tokenize_classification(raw_train, *args)
        eval_ds = tokenize_classification(raw_eval, *args) if raw_eval is not None else None
    task = "regression" if regression else "classification"
    return DataBundle(
        train=train,
        eval=eval_ds,
        task=task,
        num_labels=num_labels,
        label_names=label_names,
        metric_names=metric_names,
        collate_fn=Collator(pad_token_id(tokenizer), task),
    )
