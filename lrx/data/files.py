"""Reading data files: existence checks and delimited text (GLUE and table formats).

Delimited files are read with Python's ``csv`` module rather than
``datasets.load_dataset("csv")``: pandas turns cells such as ``NA``/``null``/``nan`` into
missing values and infers column types per chunk, and ``load_dataset`` always writes an
Arrow copy into the cache directory.
"""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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

    Raises:
        DataError: One line naming the file (and the line, where there is one): not UTF-8
            text, a NUL byte, a parse error, a wrong field count, no data rows.
    """
    columns = list(fixed_columns) if fixed_columns is not None else None
    rows: list[list[str]] = []
    line_nos: list[int] = []
    for line, row in _records(path, delimiter, quoting):
        if columns is None:
            columns = [c.strip() for c in row]
            continue
        if len(row) != len(columns):
            sep = "tab" if delimiter == "\t" else repr(delimiter)
            raise DataError(
                f"{path}:{line}: expected {len(columns)} {sep}-separated "
                f"fields ({', '.join(columns)}), found {len(row)}; fix that line or "
                "check the file format/delimiter"
            )
        rows.append(row)
        line_nos.append(line)
    if columns is None or not rows:
        raise DataError(
            f"{path}: no data rows found (the file is empty or has only a header); add data rows"
        )
    return Table(path, columns, rows, line_nos)


def _records(path: Path, delimiter: str, quoting: int) -> Iterator[tuple[int, list[str]]]:
    """The non-blank rows of a delimited file, each with the line it ends on."""
    with reading(path), path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a field over csv's 131,072-character limit
                raise DataError(
                    f"{path}:{reader.line_num}: cannot parse as delimited text ({e}); "
                    "check the delimiter and the quotes on that line"
                ) from None
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if any("\x00" in cell for cell in row):
                raise DataError(nul_message(f"{path}:{reader.line_num}"))
            yield reader.line_num, row


def nul_message(where: str) -> str:
    """The error for a NUL byte at ``where`` (``path:line``), which no text file holds."""
    return f"{where}: contains a NUL byte (a binary file?); data files must be UTF-8 text"


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns decoding and OS errors raised while reading ``path`` into one-line DataErrors."""
    try:
        yield
    except UnicodeDecodeError:
        line, where = _first_bad_utf8(path)
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({where}; a binary file?); re-save the file as UTF-8"
        ) from None
    except OSError as e:
        raise DataError(
            f"{path}: cannot read it ({e.strerror or type(e).__name__}); "
            "check the file and its permissions"
        ) from None


def _first_bad_utf8(path: Path) -> tuple[int, str]:
    """The 1-based line holding the first byte that is not UTF-8, and where in the line."""
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return line_no, f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
    return 1, "a byte sequence that is not UTF-8"


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages name a value, never dump a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
