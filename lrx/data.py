"""Dataset loading, tokenization and batching.

Three input formats are supported (``cfg.format``):

* ``"instruct"``: JSONL for causal-LM fine-tuning. Each line is one of
  ``{"prompt", "response"}``, Alpaca ``{"instruction", "input"?, "output"}`` or
  ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's.
* ``"glue"``: the original GLUE ``train.tsv`` / ``dev.tsv`` files of one task.
* ``"table"``: a generic CSV/TSV with a header, one or two text columns and a label.

Everything is built in memory (``datasets.Dataset.from_dict`` plus ``map`` with
``keep_in_memory=True``), so nothing is written to the HF datasets cache.

Delimited files are read with Python's ``csv`` module rather than
``datasets.load_dataset("csv")``: pandas turns cells such as ``NA``/``null``/``nan`` into
missing values and infers column types per chunk, and ``load_dataset`` always writes an
Arrow copy into the cache directory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import torch

from lrx.errors import DataError

__all__ = [
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "PLAIN_PROMPT_TEMPLATE",
    "Collator",
    "DataBundle",
    "GlueTask",
    "build_datasets",
    "load_glue_file",
    "normalize_glue_task",
    "pack_sequences",
    "prompt_add_special_tokens",
    "render_prompt",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value ignored by the loss (PyTorch ``CrossEntropyLoss`` default)."""

PLAIN_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Prompt format used when the tokenizer has no chat template."""

_ROLES = ("system", "user", "assistant")


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


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


def _pad_token_id(tokenizer: Any) -> int:
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


# --------------------------------------------------------------------------------------
# Delimited files (GLUE and table formats)
# --------------------------------------------------------------------------------------


@dataclass
class _Table:
    """Rows of a delimited file with their 1-based physical line numbers."""

    path: Path
    columns: list[str]
    rows: list[list[str]]
    line_nos: list[int]

    def column(self, name: str, fix: str) -> list[str]:
        """Values of column ``name``; DataError naming the columns found otherwise."""
        if name not in self.columns:
            found = ", ".join(repr(c) for c in self.columns)
            raise DataError(
                f"{self.path}: missing required column {name!r} (columns found: {found}); {fix}"
            )
        idx = self.columns.index(name)
        return [row[idx] for row in self.rows]


def _read_delimited(
    path: Path,
    delimiter: str,
    *,
    quoting: int,
    fixed_columns: Sequence[str] | None = None,
) -> _Table:
    """Reads a delimited text file.

    Args:
        path: File to read (UTF-8; a leading BOM is dropped, as in MRPC's header).
        delimiter: Field separator.
        quoting: ``csv`` quoting mode; GLUE needs ``QUOTE_NONE`` (bare ``"`` in text).
        fixed_columns: Column names for a headerless file (CoLA); None = first row is
            the header.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
            columns = list(fixed_columns) if fixed_columns is not None else None
            rows: list[list[str]] = []
            line_nos: list[int] = []
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if columns is None:
                    columns = [c.strip() for c in row]
                    continue
                if len(row) != len(columns):
                    sep = "tab" if delimiter == "\t" else repr(delimiter)
                    raise DataError(
                        f"{path}:{reader.line_num}: expected {len(columns)} {sep}-separated "
                        f"fields ({', '.join(columns)}), found {len(row)}; fix that line or "
                        "check the file format/delimiter"
                    )
                rows.append(row)
                line_nos.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e}); re-save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(
            f"{path}: cannot parse as delimited text ({e}); check the delimiter"
        ) from None
    if columns is None or not rows:
        raise DataError(
            f"{path}: no data rows found (the file is empty or has only a header); add data rows"
        )
    return _Table(path, columns, rows, line_nos)


@dataclass(frozen=True)
class GlueTask:
    """Layout of one GLUE task's TSV files.

    Attributes:
        name: Canonical lower-case name (``"sts-b"``, ``"sst-2"``, ...).
        text_columns: One or two text columns, by header name.
        label_column: Label column name.
        label_names: Class names by id; None for regression.
        string_labels: Labels are written as class names (RTE/QNLI) rather than ids.
        metric_names: Metrics reported for this task.
        fixed_columns: Column names for headerless files (CoLA); None = file has a header.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    string_labels: bool = False
    fixed_columns: tuple[str, ...] | None = None

    @property
    def regression(self) -> bool:
        """True for STS-B (float similarity score)."""
        return self.label_names is None


_NLI = ("entailment", "not_entailment")  # ids as in HF glue/rte and glue/qnli

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("rte", ("sentence1", "sentence2"), "label", _NLI, ("accuracy",), True),
        GlueTask("qnli", ("question", "sentence"), "label", _NLI, ("accuracy",), True),
        GlueTask(
            "wnli",
            ("sentence1", "sentence2"),
            "label",
            ("not_entailment", "entailment"),
            ("accuracy",),
        ),
        GlueTask(
            "mrpc",
            ("#1 String", "#2 String"),
            "Quality",
            ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
        ),
        GlueTask(
            "cola",
            ("sentence",),
            "label",
            ("unacceptable", "acceptable"),
            ("matthews",),
            fixed_columns=("source", "label", "mark", "sentence"),
        ),
        GlueTask("sst-2", ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
        GlueTask("sts-b", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    )
}


def normalize_glue_task(task: str | None) -> GlueTask:
    """Looks up a GLUE task by name, case-insensitively (``"stsb"``/``"sst2"`` accepted).

    Raises:
        DataError: Unknown or missing task name.
    """
    key = (task or "").strip().lower().replace("_", "").replace("-", "")
    for name, spec in GLUE_TASKS.items():
        if name.replace("-", "") == key:
            return spec
    raise DataError(
        f"unknown GLUE task {task!r}; set data.glue_task to one of {', '.join(GLUE_TASKS)}"
    )


def _int_label(value: str) -> int | None:
    """Parses an integer label, or None if ``value`` is not an integer."""
    try:
        return int(value.strip())
    except ValueError:
        return None


def load_glue_file(path: str | Path, task: str | GlueTask) -> datasets.Dataset:
    """Reads one GLUE TSV split into an untokenized dataset.

    Args:
        path: A GLUE ``train.tsv`` / ``dev.tsv`` file.
        task: Task name (see ``normalize_glue_task``) or a ``GlueTask``.

    Returns:
        Dataset with columns ``text_a``, ``text_b`` (pair tasks only) and ``label``
        (int64 class id, or float32 score for STS-B).

    Raises:
        DataError: Missing file, missing column, bad field count or unknown label value.
    """
    spec = task if isinstance(task, GlueTask) else normalize_glue_task(task)
    path = _existing_file(path, "data.train_path / data.eval_path")
    table = _read_delimited(
        path, "\t", quoting=csv.QUOTE_NONE, fixed_columns=spec.fixed_columns
    )
    fix = f"check that data.glue_task={spec.name!r} matches this file (original GLUE TSV layout)"
    data: dict[str, list[Any]] = {}
    for key, col in zip(("text_a", "text_b"), spec.text_columns):
        data[key] = table.column(col, fix)
    raw_labels = table.column(spec.label_column, fix)

    labels: list[Any] = []
    for value, line in zip(raw_labels, table.line_nos):
        label: Any
        if spec.regression:
            try:
                label = float(value)
            except ValueError:
                label = None
            if label is not None and not math.isfinite(label):
                label = None
        elif spec.string_labels:
            label = spec.label_names.index(value) if value in spec.label_names else None
        else:
            label = _int_label(value)
            if label is not None and not 0 <= label < len(spec.label_names):
                label = None
        if label is None:
            expected = (
                "a number" if spec.regression
                else ", ".join(spec.label_names) if spec.string_labels
                else f"0..{len(spec.label_names) - 1}"
            )
            raise DataError(
                f"{path}:{line}: bad {spec.label_column!r} value {value!r} "
                f"(expected {expected}); {fix}"
            )
        labels.append(label)
    data["label"] = labels

    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in data if k != "label"},
            "label": datasets.Value("float32" if spec.regression else "int64"),
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


# --------------------------------------------------------------------------------------
# Table format
# --------------------------------------------------------------------------------------


def _table_delimiter(path: Path, delimiter: str | None) -> str:
    """The configured delimiter, or one inferred from the file extension."""
    if delimiter:
        return delimiter
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "\t"
    if suffix == ".csv":
        return ","
    raise DataError(
        f"{path}: cannot infer the delimiter from extension {suffix!r}; set data.delimiter "
        "(e.g. ',' or '\\t') or use a .csv/.tsv file"
    )


def _read_table(cfg: Any, path: Path) -> tuple[list[list[str]], list[str], _Table]:
    """Reads a table file; returns text columns, raw label strings and the table."""
    delimiter = _table_delimiter(path, cfg.delimiter)
    # TSV files are taken literally (no quoting, like GLUE); CSV uses standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    table = _read_delimited(path, delimiter, quoting=quoting)
    texts = [
        table.column(c, "set data.text_columns to one or two of the columns found")
        for c in cfg.text_columns
    ]
    labels = table.column(cfg.label_column, "set data.label_column to one of them")
    for value, line in zip(labels, table.line_nos):
        if not value.strip():
            raise DataError(
                f"{path}:{line}: empty {cfg.label_column!r} value; fill in the label or drop the row"
            )
    return texts, labels, table


def _table_label_mapping(
    cfg: Any, train_labels: list[str], eval_labels: list[str]
) -> tuple[dict[str, int] | None, list[str] | None, int]:
    """Decides how table labels map to ids.

    Returns:
        ``(mapping, label_names, num_labels)``. ``mapping`` is None when labels are
        integer ids used as-is.
    """
    if cfg.label_names:
        names = [str(n) for n in cfg.label_names]
        return {n: i for i, n in enumerate(names)}, names, len(names)
    if all(_int_label(v) is not None for v in train_labels):
        ints = [_int_label(v) for v in train_labels + eval_labels]
        largest = max((i for i in ints if i is not None), default=0)
        return None, None, largest + 1
    # Sorted so that ids do not depend on row order.
    names = sorted(set(train_labels))
    return {n: i for i, n in enumerate(names)}, names, len(names)


def _encode_table_labels(
    cfg: Any,
    table: _Table,
    raw: list[str],
    mapping: dict[str, int] | None,
    num_labels: int,
) -> list[Any]:
    """Converts raw label strings to ids (or floats); DataError with the line on failure."""
    out: list[Any] = []
    for value, line in zip(raw, table.line_nos):
        if cfg.regression:
            try:
                out.append(float(value))
                continue
            except ValueError:
                raise DataError(
                    f"{table.path}:{line}: label {value!r} in column {cfg.label_column!r} is not "
                    "a number; fix the row or set data.regression to false"
                ) from None
        if mapping is not None and value in mapping:
            out.append(mapping[value])
            continue
        as_int = _int_label(value)
        # Integer labels are ids as-is (also when label_names only name them).
        if as_int is not None and 0 <= as_int < num_labels and (mapping is None or cfg.label_names):
            out.append(as_int)
            continue
        if mapping is None:
            raise DataError(
                f"{table.path}:{line}: label {value!r} is not a non-negative integer id while "
                "the training labels are; fix the row or set data.label_names"
            )
        raise DataError(
            f"{table.path}:{line}: label {value!r} is not one of the known labels "
            f"({', '.join(mapping)}); set data.label_names to list every label"
        )
    return out


def _load_table(
    cfg: Any, train_path: Path, eval_path: Path | None
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str] | None, int]:
    """Loads table-format train/eval files into untokenized datasets."""
    if not 1 <= len(cfg.text_columns or []) <= 2:
        raise DataError(
            f"data.text_columns must name one or two columns, got {list(cfg.text_columns or [])}; "
            "fix the data section of the config"
        )
    train_texts, train_raw, train_table = _read_table(cfg, train_path)
    eval_parts = _read_table(cfg, eval_path) if eval_path else None

    if cfg.regression:
        mapping, names, num_labels = None, None, 1
    else:
        mapping, names, num_labels = _table_label_mapping(
            cfg, train_raw, eval_parts[1] if eval_parts else []
        )

    def to_dataset(texts: list[list[str]], raw: list[str], table: _Table) -> datasets.Dataset:
        data: dict[str, list[Any]] = dict(zip(("text_a", "text_b"), texts))
        data["label"] = _encode_table_labels(cfg, table, raw, mapping, num_labels)
        features = datasets.Features(
            {
                **{k: datasets.Value("string") for k in data if k != "label"},
                "label": datasets.Value("float32" if cfg.regression else "int64"),
            }
        )
        return datasets.Dataset.from_dict(data, features=features)

    train = to_dataset(train_texts, train_raw, train_table)
    eval_ds = to_dataset(*eval_parts) if eval_parts else None
    return train, eval_ds, names, num_labels


def _map_tokenize(ds: datasets.Dataset, tokenize: Callable, label_feature: Any) -> datasets.Dataset:
    """Batched ``tokenize`` over ``ds`` into ``input_ids`` + ``labels``, in memory (no cache files)."""
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")), "labels": label_feature})
    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, features=features,
                  keep_in_memory=True, desc="Tokenizing")


def _tokenize_classification(
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

    return _map_tokenize(ds, tokenize, datasets.Value("float32" if regression else "int64"))


# --------------------------------------------------------------------------------------
# Instruct format
# --------------------------------------------------------------------------------------


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _eos_text(tokenizer: Any) -> str:
    """End-of-sequence marker appended to responses (EOS, else SEP, else nothing)."""
    return tokenizer.eos_token or tokenizer.sep_token or ""


def _render_messages(tokenizer: Any, history: list[dict[str, str]]) -> str:
    """Renders the conversation before the final assistant turn as prompt text."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    if not history:
        text = ""
    elif history[-1]["role"] == "user" and all(m["role"] == "system" for m in history[:-1]):
        # The common single-turn case (optionally with a system message): plain text.
        text = "\n\n".join(m["content"] for m in history)
    else:
        # Multi-turn without a chat template: label each turn so roles stay visible.
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in history)
    return PLAIN_PROMPT_TEMPLATE.format(prompt=text)


def prompt_add_special_tokens(tokenizer: Any) -> bool:
    """Whether rendered prompts are tokenized with the tokenizer's special tokens.

    A chat template already writes the model's special tokens (BOS etc.) into the text,
    so its prompts use ``add_special_tokens=False``; the plain template relies on the
    tokenizer adding them (``True``). Use this when tokenizing ``render_prompt`` output
    so inference sees the same ids as training.
    """
    return not _has_chat_template(tokenizer)


def render_prompt(tokenizer: Any, prompt_text: str) -> str:
    """Renders one user message exactly as training prompts are rendered.

    Tokenize the result with
    ``add_special_tokens=prompt_add_special_tokens(tokenizer)`` to get the training ids.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt_text: The user's message.

    Returns:
        The prompt string, ending where the model's response should begin.
    """
    return _render_messages(tokenizer, [{"role": "user", "content": prompt_text}])


def _parse_instruct_record(obj: Any, path: Path, line: int) -> tuple[list[dict[str, str]], str]:
    """Validates one JSONL record; returns (messages before the answer, answer text)."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object, got {type(obj).__name__}; write one object per line"
        )

    def text(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise DataError(
                f"{where}: {key!r} must be a string, got {type(value).__name__}; fix that line"
            )
        return value

    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(
                f"{where}: 'messages' must be a non-empty list of {{role, content}} objects"
            )
        history = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                got = m.get("role") if isinstance(m, dict) else m
                raise DataError(
                    f"{where}: messages[{i}] needs a 'role' of system/user/assistant "
                    f"(got {got!r}); fix that line"
                )
            content = text(f"messages[{i}].content", m.get("content"))
            history.append({"role": m["role"], "content": content})
        if history[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: the last message must have role 'assistant' "
                f"(got {history[-1]['role']!r}); "
                "it is the training target"
            )
        return history[:-1], history[-1]["content"]
    if "prompt" in obj and "response" in obj:
        prompt = text("prompt", obj["prompt"])
        return [{"role": "user", "content": prompt}], text("response", obj["response"])
    if "instruction" in obj and "output" in obj:
        prompt = text("instruction", obj["instruction"])
        extra = obj.get("input")
        if extra:  # Alpaca's optional context goes after the instruction.
            prompt = f"{prompt}\n\n{text('input', extra)}"
        return [{"role": "user", "content": prompt}], text("output", obj["output"])
    keys = ", ".join(repr(k) for k in obj) or "none"
    raise DataError(
        f"{where}: unrecognised record (keys: {keys}); use 'prompt'+'response', "
        "'instruction'+'output' (Alpaca) or 'messages'"
    )


def _read_instruct(path: Path, tokenizer: Any) -> datasets.Dataset:
    """Reads an instruct JSONL file into rendered ``prompt`` / ``response`` strings."""
    prompts: list[str] = []
    responses: list[str] = []
    eos = _eos_text(tokenizer)
    try:
        with path.open(encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno}); "
                        "each line must be one complete JSON object"
                    ) from None
                history, response = _parse_instruct_record(obj, path, line_no)
                try:
                    prompts.append(_render_messages(tokenizer, history))
                except Exception as e:  # Jinja errors from templates that reject the roles
                    raise DataError(
                        f"{path}:{line_no}: the tokenizer's chat template rejected this "
                        f"conversation ({type(e).__name__}: {e}); fix the messages for this model"
                    ) from None
                responses.append(response + eos)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e}); re-save the file as UTF-8") from None
    if not prompts:
        raise DataError(f"{path}: no examples found; the file is empty or has only blank lines")
    return datasets.Dataset.from_dict({"prompt": prompts, "response": responses})


def _tokenize_instruct(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, mask_prompt: bool, path: Path
) -> datasets.Dataset:
    """Tokenizes prompt and response separately so the label boundary is exact."""
    prompt_special = prompt_add_special_tokens(tokenizer)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        p_ids = tokenizer(batch["prompt"], add_special_tokens=prompt_special)["input_ids"]
        r_ids = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for p, r in zip(p_ids, r_ids):
            if len(p) >= max_length or not r:
                continue  # no response token would survive truncation: nothing to learn
            ids = (list(p) + list(r))[:max_length]  # keep the start
            prompt_labels = [IGNORE_INDEX] * len(p) if mask_prompt else list(p)
            out["input_ids"].append(ids)
            out["labels"].append((prompt_labels + list(r))[:max_length])
        return out

    out = _map_tokenize(ds, tokenize, datasets.List(datasets.Value("int64")))
    dropped = len(ds) - len(out)
    if dropped:
        logger.warning(
            "%s: dropped %d of %d examples whose prompt fills max_length=%d "
            "(no response token left); raise data.max_length or shorten those prompts",
            path, dropped, len(ds), max_length,
        )
    if len(out) == 0:
        raise DataError(
            f"{path}: every example's prompt is at least max_length={max_length} tokens long; "
            "raise data.max_length"
        )
    return out


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


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _existing_file(path: str | Path | None, key: str) -> Path:
    """Checks that ``path`` is set and is an existing file."""
    if not path:
        raise DataError(f"{key} is not set; point it at your data file")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "file not found"
        raise DataError(f"{p}: {what}; set {key} to an existing data file")
    return p


def _head(ds: datasets.Dataset | None, n: int | None) -> datasets.Dataset | None:
    """The first ``n`` rows of ``ds`` (all rows when ``n`` is None)."""
    if ds is None or n is None or n >= len(ds):
        return ds
    return ds.select(range(max(n, 0)), keep_in_memory=True)


def build_datasets(cfg: Any, tokenizer: Any, *, seed: int = 0) -> DataBundle:
    """Loads, tokenizes and (optionally) packs the train/eval data described by ``cfg``.

    Args:
        cfg: The ``data`` config section (``format``, ``train_path``, ``eval_path``,
            ``glue_task``, ``text_columns``, ``label_column``, ``delimiter``,
            ``label_names``, ``regression``, ``max_length``, ``packing``,
            ``mask_prompt``, ``max_train_samples``, ``max_eval_samples``).
        tokenizer: A Hugging Face tokenizer.
        seed: Accepted for API stability. Loading is deterministic and does not shuffle
            (``max_*_samples`` take the first rows; the trainer's sampler shuffles).

    Returns:
        A ``DataBundle``. The eval split is never packed, so eval loss is per example.

    Raises:
        DataError: Missing files, malformed rows, unknown columns or labels.
    """
    del seed  # see docstring
    fmt = (cfg.format or "").strip().lower()
    if fmt not in ("instruct", "glue", "table"):
        raise DataError(
            f"unknown data format {cfg.format!r}; set data.format to instruct, glue or table"
        )
    if not isinstance(cfg.max_length, int) or cfg.max_length <= 0:
        raise DataError(f"data.max_length must be a positive integer, got {cfg.max_length!r}")
    if cfg.packing and fmt != "instruct":
        raise DataError(
            f"data.packing only applies to format 'instruct' (format is {fmt!r}); "
            "set data.packing to false"
        )

    train_path = _existing_file(cfg.train_path, "data.train_path")
    eval_path = _existing_file(cfg.eval_path, "data.eval_path") if cfg.eval_path else None

    if fmt == "instruct":
        def load(path: Path, limit: int | None) -> datasets.Dataset:
            raw = _head(_read_instruct(path, tokenizer), limit)
            return _tokenize_instruct(raw, tokenizer, cfg.max_length, cfg.mask_prompt, path)

        train = load(train_path, cfg.max_train_samples)
        if cfg.packing:
            train = pack_sequences(train, cfg.max_length)
        eval_ds = load(eval_path, cfg.max_eval_samples) if eval_path else None
        return DataBundle(
            train=train,
            eval=eval_ds,
            task="causal_lm",
            num_labels=0,
            label_names=None,
            metric_names=[],
            collate_fn=Collator(_pad_token_id(tokenizer), "causal_lm"),
        )

    if fmt == "glue":
        spec = normalize_glue_task(cfg.glue_task)
        raw_train = load_glue_file(train_path, spec)
        raw_eval = load_glue_file(eval_path, spec) if eval_path else None
        regression = spec.regression
        label_names = list(spec.label_names) if spec.label_names else None
        num_labels = 1 if regression else len(spec.label_names)
        metric_names = list(spec.metric_names)
    else:
        raw_train, raw_eval, label_names, num_labels = _load_table(cfg, train_path, eval_path)
        regression = bool(cfg.regression)
        metric_names = ["pearson", "spearman"] if regression else ["accuracy"]

    raw_train = _head(raw_train, cfg.max_train_samples)
    raw_eval = _head(raw_eval, cfg.max_eval_samples)
    task = "regression" if regression else "classification"
    return DataBundle(
        train=_tokenize_classification(raw_train, tokenizer, cfg.max_length, regression),
        eval=(
            _tokenize_classification(raw_eval, tokenizer, cfg.max_length, regression)
            if raw_eval is not None
            else None
        ),
        task=task,
        num_labels=num_labels,
        label_names=label_names,
        metric_names=metric_names,
        collate_fn=Collator(_pad_token_id(tokenizer), task),
    )
