"""Evaluation metrics for classification and regression tasks.

Pure numpy (with torch tensors accepted as input), so the library does not depend on
scikit-learn or scipy. Conventions follow those libraries:

* ``f1`` is binary with positive class 1 and is 0.0 when there are no positives at all.
* ``matthews_corrcoef`` uses the general multiclass formula and is 0.0 when undefined
  (e.g. a constant prediction), as in scikit-learn.
* ``pearson`` / ``spearman`` return NaN when undefined (a constant input), as in scipy:
  a correlation with a constant is not zero, it does not exist.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

__all__ = [
    "METRICS",
    "accuracy",
    "compute_metrics",
    "f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]


def _to_numpy(x: Any) -> np.ndarray:
    """Converts a list, numpy array or torch tensor (any device) to a numpy array."""
    # Duck-typed so this module does not need to import torch.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _as_pair(a: Any, b: Any, *, dtype: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Flattens two inputs to 1-D arrays of equal, non-zero length."""
    a, b = _to_numpy(a).reshape(-1), _to_numpy(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"inputs have different lengths: {a.shape[0]} and {b.shape[0]}")
    if a.size == 0:
        raise ValueError("metrics need at least one example, got empty inputs")
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    return a, b


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of predictions equal to the labels.

    Args:
        preds: Predicted class ids.
        labels: True class ids.

    Returns:
        Accuracy in [0, 1].
    """
    p, y = _as_pair(preds, labels)
    return float(np.mean(p == y))


def f1(preds: Any, labels: Any) -> float:
    """Binary F1 score of the positive class 1.

    Args:
        preds: Predicted class ids (0/1).
        labels: True class ids (0/1).

    Returns:
        ``2 tp / (2 tp + fp + fn)``; 0.0 when there are no true or predicted positives.
    """
    p, y = _as_pair(preds, labels)
    p, y = p == 1, y == 1
    tp = float(np.sum(p & y))
    fp = float(np.sum(p & ~y))
    fn = float(np.sum(~p & y))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation coefficient (binary or multiclass).

    Uses the general K-class formula (Gorodkin 2004), which reduces to the usual
    ``(tp*tn - fp*fn) / sqrt(...)`` for two classes.

    Args:
        preds: Predicted class ids.
        labels: True class ids.

    Returns:
        MCC in [-1, 1]; 0.0 when undefined (e.g. all predictions are the same class).
    """
    p, y = _as_pair(preds, labels)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    y_idx, p_idx = inverse[:n], inverse[n:]
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y_idx, p_idx), 1.0)
    t_k = confusion.sum(axis=1)  # true occurrences of each class
    p_k = confusion.sum(axis=0)  # predicted occurrences of each class
    c = np.trace(confusion)
    s = float(n)
    cov_yp = c * s - float(np.dot(t_k, p_k))
    cov_pp = s * s - float(np.dot(p_k, p_k))
    cov_yy = s * s - float(np.dot(t_k, t_k))
    denom = cov_pp * cov_yy
    if denom == 0:
        return 0.0
    return float(cov_yp / math.sqrt(denom))


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation coefficient.

    Args:
        x: Predictions (any real numbers).
        y: Targets.

    Returns:
        Pearson's r in [-1, 1]; NaN when either input is constant.
    """
    a, b = _as_pair(x, y, dtype=np.float64)
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if denom == 0:
        return float("nan")
    # Clip tiny floating-point excursions beyond +-1.
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def _rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata`` default)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    is_new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(is_new) - 1  # group id of each sorted element
    starts = np.r_[np.flatnonzero(is_new), len(x)]  # group boundaries in sorted order
    # A group occupying sorted positions [lo, hi) has 1-based ranks lo+1..hi; mean (lo+hi+1)/2.
    avg = (starts[:-1] + starts[1:] + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[group]
    return ranks


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson correlation of average-tie ranks.

    Args:
        x: Predictions.
        y: Targets.

    Returns:
        Spearman's rho in [-1, 1]; NaN when either input is constant.
    """
    a, b = _as_pair(x, y, dtype=np.float64)
    return pearson(_rank_average(a), _rank_average(b))


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}

_CLASS_METRICS = {"accuracy", "f1", "matthews"}


def compute_metrics(names: list[str], preds: Any, labels: Any) -> dict[str, float]:
    """Computes the named metrics.

    Args:
        names: Metric names from ``{"accuracy", "f1", "matthews", "pearson", "spearman"}``.
        preds: Predictions. For class metrics either class ids of shape ``(n,)`` or logits
            of shape ``(n, num_classes)`` (argmax is taken); for correlations values of
            shape ``(n,)`` or ``(n, 1)``.
        labels: Targets of shape ``(n,)``.

    Returns:
        ``{name: value}`` in the order of ``names``.

    Raises:
        ValueError: An unknown metric name, or inputs of different lengths.
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    p = _to_numpy(preds)
    y = _to_numpy(labels)
    class_preds = p
    if p.ndim == 2 and p.shape[1] > 1:  # logits -> class ids
        class_preds = p.argmax(axis=-1)
    out: dict[str, float] = {}
    for name in names:
        out[name] = METRICS[name](class_preds if name in _CLASS_METRICS else p, y)
    return out
