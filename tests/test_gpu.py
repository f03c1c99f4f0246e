"""GPU behaviour: bf16 autocast training, bf16 bases with logged SRLoRA edits. Skipped on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lrx.cli import main
from lrx.methods import AdaptedLinear
from tests.test_cli import TINY_LM
from tests.test_srlora import check_offloaded_edit_log, fidelity_run

pytestmark = pytest.mark.gpu


def test_adapted_linear_under_bf16_autocast():
    base = nn.Linear(64, 32).cuda().to(torch.bfloat16)
    layer = AdaptedLinear(base, r=4, scale=2.0).cuda()
    nn.init.normal_(layer.lora_B)
    nn.init.normal_(layer.lora_A)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    ref = x.double() @ (base.weight.double() + layer.adapter_weight().double()).t() + base.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("method", ["lora", "pissa", "srlora"])
def test_bf16_training_run_on_gpu(tmp_path, capsys, method):
    out = tmp_path / "run"
    code = main(["--method", method, *TINY_LM, "train.max_steps=10", "train.device=cuda", "train.bf16=true",
                 "model.dtype=bfloat16", "method.r=4", "method.r_target=8" if method == "srlora" else "method.r=4",
                 f"logging.output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["eval_loss"] < summary["eval_history"][0]["eval_loss"]


def test_srlora_fidelity_on_gpu_bf16_base():
    # Same bound as on CPU; the event arithmetic runs on the CPU copy here, the forward on GPU elsewhere.
    total_err, net_err = fidelity_run(torch.bfloat16, "auto", 1e-4)
    assert total_err <= 1e-3 and net_err <= 1e-3


def test_offloaded_edit_log_on_gpu():
    # The exact log in pinned host memory, its bf16 copy on the GPU: bit-identical training.
    check_offloaded_edit_log("cuda")
