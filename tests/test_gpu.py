"""GPU behaviour: bf16 autocast training, bf16 bases with logged SRLoRA edits. Skipped on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lrx.cli import main
from lrx.methods import AdaptedLinear
from lrx.methods.layer import adapter_weight
from tests.conftest import REPO
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
    ref = x.double() @ (base.weight.double() + adapter_weight(layer).double()).t() + base.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("method,quantize", [("lora", "none"), ("pissa", "none"), ("srlora", "none"),
                                             ("lora", "nf4"), ("srlora", "nf4")])
def test_bf16_training_run_on_gpu(tmp_path, capsys, method, quantize):
    """bf16 training on a bf16 base, or on an nf4 base (QLoRA) kept fp32 elsewhere."""
    out = tmp_path / "run"
    dtype = "bfloat16" if quantize == "none" else "float32"
    code = main(["--method", method, *TINY_LM, "train.max_steps=10", "train.device=cuda", "train.bf16=true",
                 f"model.dtype={dtype}", f"model.quantize={quantize}", "method.r=4",
                 "method.r_target=8" if method == "srlora" else "method.r=4", f"logging.output_dir={out}"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["eval_loss"] < summary["eval_history"][0]["eval_loss"]
    if method == "srlora" and quantize != "none":
        events = [json.loads(x) for x in (out / "method_events.jsonl").read_text().splitlines()]
        assert events and max(e["fusion_error"] for e in events) == 0.0  # kept exactly in the log


def test_srlora_fidelity_on_gpu_bf16_base():
    # Same bound as on CPU; the event arithmetic runs on the CPU copy here, the forward on GPU elsewhere.
    total_err, net_err = fidelity_run(torch.bfloat16, "auto", 1e-4)
    assert total_err <= 1e-3 and net_err <= 1e-3


def test_offloaded_edit_log_on_gpu():
    # The exact log in pinned host memory, its bf16 copy on the GPU: bit-identical training.
    check_offloaded_edit_log("cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one process keeps the log whole)")
def test_a_row_sharded_edit_log_trains_as_the_offloaded_one_under_fsdp2_mixed_precision(tmp_path):
    """FSDP2 with bf16 mixed precision all-gathers the row-sharded fp32 log in bf16, as the
    offloaded log's bf16 copy was: the same losses through all 4 events, the same fp32 log saved."""
    from tests.test_distributed import launch

    out = tmp_path / "report.json"
    run = launch(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torch.cuda.device_count()}",
                  str(REPO / "tests" / "dist_row_log.py"), str(out)], 1)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    plain, rows = report["replicated"], report["rows"]
    assert plain["events"] == rows["events"] == 4 and rows["row_logs"] == 14 and plain["row_logs"] == 0
    assert rows["log_dtype"] == "torch.float32" and rows["edit_rank"] == plain["edit_rank"] == 4 + 4 * 4
    assert rows["losses"] == plain["losses"]
    assert rows["log_sums"] == plain["log_sums"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_zero3_with_deepspeeds_fused_adam_matches_one_gpu_and_resumes_exactly(tmp_path, monkeypatch):
    """A DeepSpeed config naming {"type": "AdamW"} gets DeepSpeed's FusedAdam on GPUs (built over
    lrx's parameter groups, with lrx's learning rate and schedule): fp32 SRLoRA on 2 GPUs trains
    as torch's AdamW does on one, and a run killed after an event resumes to the same losses and
    adapter (FusedAdam's per-group step count is restored from the checkpoint)."""
    pytest.importorskip("deepspeed")
    from lrx import checkpoint
    from tests.test_checkpoint import adapter, args, assert_same_adapter, killed_at, run
    from tests.test_distributed import losses, table

    # DeepSpeed JIT-builds FusedAdam for the listed architectures and cannot parse a suffixed
    # entry such as "9.0a" (which some CUDA images set; lrx refuses it, check_arch_list): name
    # the GPU's own.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability()))
    data = table(tmp_path / "t.tsv")
    config = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    config["optimizer"] = {"type": "AdamW"}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    cuda = ["train.device=cuda", "train.bf16=false", "train.save_every=2"]
    ds = [*cuda, f"distributed.deepspeed_config={tmp_path / 'ds.json'}"]
    single = run(args(data, tmp_path / "single", *cuda))
    assert single.returncode == 0, single.stderr[-3000:]
    full = run(args(data, tmp_path / "full", *ds, batch=4), 2, "zero3")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "zero3: optimizer AdamW built by DeepSpeed" in full.stderr + full.stdout
    assert "built by DeepSpeed (FusedAdam)" in full.stderr + full.stdout
    assert losses(tmp_path / "full") == pytest.approx(losses(tmp_path / "single"), abs=1e-4)
    killed = run(killed_at(7, args(data, tmp_path / "run", *ds, batch=4)), 2, "zero3")
    assert killed.returncode != 0
    assert max(int(p.name.split("-")[1]) for p in checkpoint.checkpoint_dirs(tmp_path / "run")) == 6
    resumed = run(args(data, tmp_path / "run", *ds, "--resume", "auto", batch=4), 2, "zero3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert_same_adapter(adapter(tmp_path / "run"), adapter(tmp_path / "full"), atol=1e-6)


@pytest.mark.parametrize("kind,double_quant,tol", [("nf4", True, 1e-4), ("nf4", False, 0.0), ("int8", False, 1e-6)])
def test_quantized_linear_on_gpu_matches_its_cpu_codes_and_dequantized_weight(kind, double_quant, tol):
    """bitsandbytes' CUDA kernels quantize to the same codes as its CPU backend (what a CPU
    export dequantizes), and the bf16 autocast forward and backward compute with that weight.
    With double quantization the nested block scales differ a little between the backends
    (measured on an H200: 2.3e-5 of the weight's norm); without it nothing; int8's row scales
    differ in the last bits (4.6e-8 of the weight's norm on an H100 with torch 2.11, 0 on an
    H200 with the same bitsandbytes 0.50.2)."""
    from lrx.quant import QuantizedLinear, QuantSettings

    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    cpu = QuantizedLinear.of(linear.weight, QuantSettings(kind, double_quant), linear.bias)
    gpu = QuantizedLinear.of(linear.weight, QuantSettings(kind, double_quant), linear.bias, device=torch.device("cuda"))
    assert torch.equal(gpu.weight.cpu(), cpu.weight)
    W = cpu.dequantize()
    assert ((gpu.dequantize().cpu() - W).norm() / W.norm()).item() <= tol
    # The kernel writes bf16 itself (no fp32 copy): the same rounding as casting its fp32 output.
    assert torch.equal(gpu.dequantize(torch.bfloat16), gpu.dequantize().to(torch.bfloat16))
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = gpu(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ gpu.dequantize().double().t() + linear.bias.double().cuda()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
