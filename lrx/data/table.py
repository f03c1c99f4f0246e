"""Table format: a generic CSV/TSV with a header, one or two text columns and a label."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import datasets

from lrx.data.files import Table, int_label, read_delimited, text_label_dataset
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
    if all(int_label(v) is not None for v in train_labels):
        ints = [int_label(v) for v in train_labels + eval_labels]
        largest = max((i for i in ints if i is not None), default=0)
        return None, None, largest + 1
    # Sorted so that ids do not depend on row order.
    names = sorted(set(train_labels))
    return {n: i for i, n in enumerate(names)}, names, len(names)


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
        as_int = int_label(value)
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
            cfg, train_raw, eval_parts[1] if eval_parts else []
        )

    def to_dataset(texts: list[list[str]], raw: list[str], table: Table) -> datasets.Dataset:
        data: dict[str, list[Any]] = dict(zip(("text_a", "text_b"), texts))
        data["label"] = _encode_table_labels(cfg, table, raw, mapping, num_labels)
        return text_label_dataset(data, regression=cfg.regression)

    train = to_dataset(train_texts, train_raw, train_table)
    eval_ds = to_dataset(*eval_parts) if eval_parts else None
    return train, eval_ds, names, num_labels
