"""Reading data files: existence checks and delimited text (GLUE and table formats).

Delimited files are read with Python's ``csv`` module rather than
``datasets.load_dataset("csv")``: pandas turns cells such as ``NA``/``null``/``nan`` into
missing values and infers column types per chunk, and ``load_dataset`` always writes an
Arrow copy into the cache directory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets

from lrx.errors import DataError


def existing_file(path: str | Path | None, key: str) -> Path:
    """Checks that ``path`` is set and is an existing file."""
    if not path:
        raise DataError(f"{key} is not set; point it at your data file")
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "file not found"
        raise DataError(f"{p}: {what}; set {key} to an existing data file")
    return p


def head(ds: datasets.Dataset | None, n: int | None) -> datasets.Dataset | None:
    """The first ``n`` rows of ``ds`` (all rows when ``n`` is None)."""
    if ds is None or n is None or n >= len(ds):
        return ds
    return ds.select(range(max(n, 0)), keep_in_memory=True)


def int_label(value: str) -> int | None:
    """Parses an integer label, or None if ``value`` is not an integer."""
    try:
        return int(value.strip())
    except ValueError:
        return None


def text_label_dataset(data: dict[str, list], *, regression: bool) -> datasets.Dataset:
    """Untokenized dataset of string columns ``text_a`` (+ ``text_b``) and ``label``."""
    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in data if k != "label"},
            "label": datasets.Value("float32" if regression else "int64"),
        }
    )
    return datasets.Dataset.from_dict(data, features=features)


@dataclass
class Table:
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


def read_delimited(
    path: Path,
    delimiter: str,
    *,
    quoting: int,
    fixed_columns: Sequence[str] | None = None,
) -> Table:
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
    return Table(path, columns, rows, line_nos)
