"""Shared fixtures: tiny random models, the GLUE folder beside the repo."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lrx.models import tiny_config

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
QUICKSTART = REPO / "configs" / "data" / "quickstart"


def tiny_model(kind: str, vocab: int = 128, seed: int = 0, dtype=torch.float32):
    """A tiny random Llama (causal LM) or BERT (2-label classifier) in eval mode."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab))
    else:
        config = tiny_config("tiny-bert", vocab)
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
    return model.to(dtype).eval()


@pytest.fixture
def glue_dir() -> Path:
    if not GLUE.is_dir():
        pytest.skip(f"GLUE files not found at {GLUE} (../shared/data/glue beside the repo)")
    return GLUE


@pytest.fixture
def clone():
    return copy.deepcopy


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests are skipped (with the reason) where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
