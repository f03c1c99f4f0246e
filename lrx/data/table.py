"""Table format: a generic CSV/TSV with a header, one or two text columns and a label."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import datasets

from lrx.data.files import Table, int_label, read_delimited, shown, text_label_dataset
from lrx.errors import DataError


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


def _read_table(cfg: Any, path: Path) -> tuple[list[list[str]], list[str], Table]:
    """Reads a table file; returns text columns, raw label strings and the table."""
    delimiter = _table_delimiter(path, cfg.delimiter)
    # TSV files are taken literally (no quoting, like GLUE); CSV uses standard quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    table = read_delimited(path, delimiter, quoting=quoting)
    texts = [
        table.column(c, "set data.text_columns to one or two of the columns found")
        for c in cfg.text_columns
    ]
    labels = table.column(cfg.label_column, "set data.label_column to one of them")
    for value, line in zip(labels, table.line_nos):
        if not value.strip():
            raise DataError(
                f"{path}:{line}: empty {cfg.label_column!r} value; "
                "fill in the label or drop the row"
            )
    return texts, labels, table


def _table_label_mapping(
    cfg: Any, train: tuple[list[str], Table], eval_: tuple[list[str], Table] | None
) -> tuple[dict[str, int] | None, list[str] | None, int]:
    """Decides how table labels map to ids.

    Args:
        cfg: The ``data`` config section.
        train: Raw label strings of the training file and its table.
        eval_: The same for the eval file, or None.

    Returns:
        ``(mapping, label_names, num_labels)``. ``mapping`` is None when labels are
        integer ids used as-is.
    """
    if cfg.label_names:
        names = [str(n) for n in cfg.label_names]
        return {n: i for i, n in enumerate(names)}, names, len(names)
    if all(int_label(v) is not None for v in train[0]):
        return None, None, _integer_label_count([train] + ([eval_] if eval_ else []))
    # Sorted so that ids do not depend on row order.
    names = sorted(set(train[0]))
    return {n: i for i, n in enumerate(names)}, names, len(names)


SPARSE_LABEL_IDS = 64
"""Integer labels are class ids as written, so the head has ``largest + 1`` outputs. Above this
many outputs, ids of which more than half never occur are refused (``{0, 200000}`` would build
a 200,001-class head): the user lists them in ``data.label_names``, which maps them to
``0..N-1`` as string labels are mapped. Renumbering them silently instead would change what
the ids the model predicts mean."""


def _integer_label_count(parts: list[tuple[list[str], Table]]) -> int:
    """Head size for integer labels used as ids: the largest id + 1; refuses sparse ids."""
    first_seen: dict[int, tuple[Path, int]] = {}
    for raw, table in parts:
        for value, line in zip(raw, table.line_nos):
            label = int_label(value)
            if label is not None:
                first_seen.setdefault(label, (table.path, line))
    largest = max(first_seen, default=0)
    size, distinct = largest + 1, len(first_seen)
    if size > SPARSE_LABEL_IDS and size > 2 * distinct:
        path, line = first_seen[largest]
        classes = f"{size:,}" if size < 10**9 else "over a billion"
        raise DataError(
            f"{path}:{line}: integer label {shown(largest)} would build a {classes}-class head "
            f"for {distinct} distinct labels (integer labels are ids 0..N-1); list the labels "
            f"in data.label_names to map them to ids 0..{distinct - 1}"
        )
    return size


def _float_label(cfg: Any, table: Table, value: str, line: int) -> float:
    """A regression label: a finite number, else DataError naming the line."""
    try:
        label = float(value)
    except ValueError:
        raise DataError(
            f"{table.path}:{line}: label {shown(value)} in column {cfg.label_column!r} is not "
            "a number; fix the row or set data.regression to false"
        ) from None
    if not math.isfinite(label):
        raise DataError(
            f"{table.path}:{line}: label {shown(value)} in column {cfg.label_column!r} is not "
            "a finite number (it would make the loss NaN); fix the row"
        )
    return label


def _encode_table_labels(
    cfg: Any,
    table: Table,
    raw: list[str],
    mapping: dict[str, int] | None,
    num_labels: int,
) -> list[Any]:
    """Converts raw label strings to ids (or floats); DataError with the line on failure."""
    out: list[Any] = []
    for value, line in zip(raw, table.line_nos):
        if cfg.regression:
            out.append(_float_label(cfg, table, value, line))
            continue
        if mapping is not None and value in mapping:
            out.append(mapping[value])
            continue
        as_int = int_label(value)
        # Integer labels are ids as-is (also when label_names only name them).
        if as_int is not None and 0 <= as_int < num_labels and (mapping is None or cfg.label_names):
            out.append(as_int)
            continue
        if mapping is None:
            raise DataError(
                f"{table.path}:{line}: label {shown(value)} is not a non-negative integer id "
                "while the training labels are; fix the row or set data.label_names"
            )
        known = ", ".join(list(mapping)[:10])
        if len(mapping) > 10:
            known += f", ... ({len(mapping)} in all)"
        raise DataError(
            f"{table.path}:{line}: label {shown(value)} is not one of the known labels "
            f"({known}); set data.label_names to list every label"
        )
    return out


def load_table(
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
            cfg, (train_raw, train_table), eval_parts[1:] if eval_parts else None
        )

    def to_dataset(texts: list[list[str]], raw: list[str], table: Table) -> datasets.Dataset:
        data: dict[str, list[Any]] = dict(zip(("text_a", "text_b"), texts))
        data["label"] = _encode_table_labels(cfg, table, raw, mapping, num_labels)
        return text_label_dataset(data, regression=cfg.regression)

    train = to_dataset(train_texts, train_raw, train_table)
    eval_ds = to_dataset(*eval_parts) if eval_parts else None
    return train, eval_ds, names, num_labels
