"""GLUE format: the original ``train.tsv`` / ``dev.tsv`` files of one GLUE task."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from lrx.data.files import existing_file, int_label, read_delimited, shown, text_label_dataset
from lrx.errors import DataError


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
    path = existing_file(path, "data.train_path / data.eval_path")
    table = read_delimited(
        path, "\t", quoting=csv.QUOTE_NONE, fixed_columns=spec.fixed_columns
    )
    fix = f"check that data.glue_task={spec.name!r} matches this file (original GLUE TSV layout)"
    data: dict[str, list[Any]] = {}
    for key, col in zip(("text_a", "text_b"), spec.text_columns):
        data[key] = table.column(col, fix)
    raw_labels = table.column(spec.label_column, fix)

    labels: list[Any] = []
    for value, line in zip(raw_labels, table.line_nos):
        label = _glue_label(spec, value)
        if label is None:
            raise DataError(
                f"{path}:{line}: bad {spec.label_column!r} value {shown(value)} "
                f"(expected {_expected_labels(spec)}); {fix}"
            )
        labels.append(label)
    data["label"] = labels
    return text_label_dataset(data, regression=spec.regression)


def _glue_label(spec: GlueTask, value: str) -> float | int | None:
    """The label id (or finite score) written as ``value``; None when it is not valid."""
    if spec.regression:
        try:
            score = float(value)
        except ValueError:
            return None
        return score if math.isfinite(score) else None
    if spec.string_labels:
        return spec.label_names.index(value) if value in spec.label_names else None
    label = int_label(value)
    return label if label is not None and 0 <= label < len(spec.label_names) else None


def _expected_labels(spec: GlueTask) -> str:
    """What a valid label of ``spec`` looks like, for error messages."""
    if spec.regression:
        return "a number"
    if spec.string_labels:
        return ", ".join(spec.label_names)
    return f"0..{len(spec.label_names) - 1}"
