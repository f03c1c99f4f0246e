"""Tests for lrx.metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from lrx.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    spearman,
)


@pytest.mark.parametrize("convert", [list, np.asarray, torch.tensor], ids=["list", "numpy", "torch"])
def test_accuracy_input_types(convert):
    assert accuracy(convert([0, 1, 1, 0]), convert([0, 1, 0, 0])) == 0.75


def test_f1_binary_positive_class_one():
    # tp=2 (idx 0, 3), fp=1 (idx 1), fn=1 (idx 4): F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    assert f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    assert f1([0, 0], [0, 0]) == 0.0  # no positives at all


def test_matthews_binary():
    # tp=2, tn=2, fp=1, fn=1: (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9
    assert matthews_corrcoef([1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]) == pytest.approx(1 / 3)
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)


def test_matthews_constant_prediction_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0
    assert matthews_corrcoef(torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 0, 1, 1])) == 0.0


def test_matthews_multiclass():
    # confusion (true rows, pred cols): [[1,1,0],[0,2,0],[1,0,1]]
    # c=4, s=6, t=(2,2,2), p=(2,3,1): (4*6 - 12) / sqrt((36-14)*(36-12)) = 12/sqrt(528)
    got = matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2])
    assert got == pytest.approx(12 / math.sqrt(528))


def test_pearson():
    # dx=(-1.5,-.5,.5,1.5), dy=(-3,-1,0,4): 11 / sqrt(5 * 26)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson(np.array([1.0, 2.0]), np.array([3.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # undefined for constant input


def test_spearman_with_ties():
    # ranks x = (1, 2.5, 2.5, 4), ranks y = (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # Ties in both inputs, unsorted: ranks x = (3.5, 1, 3.5, 2), y = (3, 1.5, 4, 1.5)
    # dx = (1, -1.5, 1, -.5), dy = (.5, -1, 1.5, -1): 4 / sqrt(4.5 * 4.5)
    assert spearman([5, 1, 5, 2], [7, 0, 9, 0]) == pytest.approx(4 / 4.5)


def test_spearman_monotone_is_one():
    x = torch.tensor([0.1, 0.5, 0.2, 3.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -torch.exp(x)) == pytest.approx(-1.0)


def test_compute_metrics_names_and_logits():
    logits = torch.tensor([[2.0, 0.1], [0.3, 0.9], [0.2, 0.4], [1.0, 0.0]])  # argmax 0,1,1,0
    labels = torch.tensor([0, 1, 0, 0])
    out = compute_metrics(["f1", "accuracy", "matthews"], logits, labels)
    assert list(out) == ["f1", "accuracy", "matthews"]
    assert out["accuracy"] == 0.75
    assert out["f1"] == pytest.approx(2 / 3)  # tp=1, fp=1, fn=0
    assert out["matthews"] == pytest.approx(1 / math.sqrt(3))  # (1*2 - 1*0)/sqrt(2*1*3*2)
    assert all(isinstance(v, float) for v in out.values())

    reg = compute_metrics(["pearson", "spearman"], np.array([[1.0], [2.0], [3.0], [4.0]]), [2, 4, 5, 9])
    assert reg["pearson"] == pytest.approx(11 / math.sqrt(130))
    assert reg["spearman"] == pytest.approx(1.0)
    assert compute_metrics([], [1], [1]) == {}


def test_compute_metrics_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["auc"], [1], [1])
    with pytest.raises(ValueError, match="different lengths"):
        accuracy([1, 0], [1])
