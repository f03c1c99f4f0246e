"""lrx inside a transformers Trainer: ``lrx.wrap`` + ``lrx.hf.LrxCallback`` trains as
``launch/train.py`` does, its adapter reloads in lrx and (exported) in peft, a resumed Trainer
continues exactly, and misuse is one line.

One lrx run and one Trainer run (6 steps, 2 SRLoRA events, a checkpoint at step 3) are shared
by the checks; the resumed run continues from that checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerState

import lrx
from lrx.cli import main
from lrx.errors import ConfigError, LrxError
from lrx.hf import LrxCallback
from lrx.models import load_tokenizer
from tests.conftest import QUICKSTART, REPO
from tests.hf_common import METHOD, SETTINGS, STEPS, base_model, hf_trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    assert main(["--method", "srlora", *SETTINGS, f"logging.output_dir={tmp / 'lrx'}"]) == 0
    trainer, adapter, _ = hf_trainer(tmp / "hf")
    adapter.save(tmp / "hf_adapter", peft=tmp / "hf_peft")
    return tmp, trainer, adapter


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trainer_with_callback_trains_as_launch_train(runs):
    tmp, trainer, _ = runs
    lrx_losses = [r["loss"] for r in records(tmp / "lrx" / "metrics.jsonl") if r["split"] == "train"]
    assert len(trainer.losses) == STEPS
    assert max(abs(a - b) for a, b in zip(trainer.losses, lrx_losses)) <= 1e-5
    theirs, ours = records(tmp / "lrx" / "method_events.jsonl"), records(tmp / "hf" / "method_events.jsonl")
    assert [r["step"] for r in ours] == [2, 2, 2, 2, 4, 4, 4, 4]  # 2 events x 4 layers
    for a, b in zip(theirs, ours, strict=True):
        assert (a["step"], a["layer"], a["fused_pairs"], a["pointer"]) == (b["step"], b["layer"], b["fused_pairs"], b["pointer"])
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-4, abs=1e-12)
    expected, got = load_file(tmp / "lrx" / "adapter" / "adapter_model.safetensors"), \
        load_file(tmp / "hf_adapter" / "adapter_model.safetensors")
    assert sorted(expected) == sorted(got)
    assert max((expected[k].double() - got[k].double()).abs().max().item() for k in expected if expected[k].numel()) <= 1e-5


def fresh_base():
    return base_model().eval()


def test_saved_adapter_reloads_in_lrx_and_in_peft(runs):
    from peft import PeftModel

    tmp, _, adapter = runs
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = adapter.model.eval()(input_ids=ids).logits
        loaded = lrx.load(tmp / "hf_adapter", fresh_base())
        assert loaded.method.events_done == 2
        assert (loaded.model(input_ids=ids).logits - trained).abs().max().item() <= 1e-5
        peft = PeftModel.from_pretrained(fresh_base(), str(tmp / "hf_peft"))
        assert (peft(input_ids=ids).logits - trained).abs().max().item() <= 1e-5
        merged = loaded.merge()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert (merged(input_ids=ids).logits - trained).abs().max().item() <= 1e-5


def test_wrap_quantize_nf4_round_trips(tmp_path):
    """``lrx.wrap(quantize="nf4")`` quantizes every linear but the head (the adapted layers'
    residual included) and its adapter file says so: ``lrx.load`` quantizes a fresh base the same
    way and gives the same logits."""
    from lrx.methods import LocalShards
    from lrx.quant import QuantizedLinear

    adapter = lrx.wrap(fresh_base(), "srlora", quantize="nf4", **METHOD)
    quantized = [n for n, m in adapter.model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14 and "lm_head" not in quantized  # 7 linears x 2 blocks
    assert sorted(n for n in quantized if n.endswith(".base")) == \
        [f"model.layers.{i}.self_attn.{p}.base" for i in (0, 1) for p in ("q_proj", "v_proj")]
    adapter.method.attach(adapter.model, LocalShards())  # as the callback attaches it on one process
    adapter.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["quantize"]["kind"] == "nf4" and config["model_dtype"] == "float32"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loaded = lrx.load(tmp_path / "adapter", fresh_base())
        assert torch.equal(loaded.model(input_ids=ids).logits, adapter.model.eval()(input_ids=ids).logits)


def test_resume_from_checkpoint_continues_exactly(runs):
    tmp, trainer, adapter = runs
    resumed, again, _ = hf_trainer(tmp / "hf", resume=str(tmp / "hf" / "checkpoint-3"))
    assert resumed.losses == trainer.losses[3:]
    for name, layer in adapter.method.layers.items():
        other = again.method.layers[name]
        assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B), name
        assert torch.equal(layer.base.weight, other.base.weight) and torch.equal(layer.edit_log.U, other.edit_log.U), name
    assert [r["step"] for r in records(tmp / "hf" / "method_events.jsonl")] == [2, 2, 2, 2, 4, 4, 4, 4]


def test_misuse_is_one_line(tmp_path):
    model = fresh_base()
    with pytest.raises(ConfigError, match="has no setting rank; its settings are .*r_target"):
        lrx.wrap(model, "srlora", rank=8)
    adapter = lrx.wrap(model, "srlora", **METHOD)
    model.train()
    with pytest.raises(LrxError, match=r"training without its hooks .*callbacks=\[lrx\.hf\.LrxCallback\(\)\]"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # evaluation needs no hooks
    with pytest.raises(ConfigError, match="already adapted"):
        lrx.wrap(model, "lora")
    with pytest.raises(ConfigError, match="was not adapted by lrx"):
        LrxCallback().on_train_begin(None, None, None, model=fresh_base())
    with pytest.raises(ConfigError, match="takes the lrx.Adapter"):
        LrxCallback(model)
    with pytest.raises(ConfigError, match="quantize='nf5' is not one of none, nf4, fp4, int8"):
        lrx.wrap(fresh_base(), "srlora", quantize="nf5")
    with pytest.raises(ConfigError, match="fuse='fold' cannot fold edits into a nf4 base"):
        lrx.wrap(fresh_base(), "srlora", quantize="nf4", fuse="fold")
    fp32 = lrx.wrap(fresh_base(), "srlora", **METHOD).model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts it
    with pytest.raises(ConfigError, match=r"mixed precision stores this fp32 base in bfloat16 .* fuse='log'\)$"):
        LrxCallback().on_train_begin(None, TrainerState(max_steps=6), None, model=fp32)
    from lrx.distributed.found import check_zero_config

    with pytest.raises(ConfigError, match="zero_hpz_partition_size=2 .* not supported"):
        check_zero_config({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}})
    assert adapter.model is model


def launch(config: str, out) -> list[dict]:
    """``accelerate launch --num_processes 2`` of ``tests/hf_accelerate.py`` with a config of
    ``configs/accelerate/``; every rank's report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
                           str(port), str(REPO / "tests" / "hf_accelerate.py"), str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), proc.stderr


def check_two_processes(report, one_process, tmp) -> None:
    """Losses within 1e-4 of one process, the rows lrx's sampler gives each rank, identical
    events on every rank (and the one process's pairs), the saved adapter close to one process's,
    and a run resumed from its step-3 checkpoint equal to the uninterrupted one."""
    _, trainer, _ = one_process
    assert all(r["rows_as_planned"] for r in report)
    losses = [sum(step) / len(report) for step in zip(*(r["losses"] for r in report))]  # shares of the token mean
    assert max(abs(a - b) for a, b in zip(losses, trainer.losses, strict=True)) <= 1e-4
    assert all(r["events"] == report[0]["events"] and r["digest"] == report[0]["digest"] for r in report)
    assert 0 < max(e["fusion_error"] for e in report[0]["events"]) <= 1e-6  # fp32 base, folded shard by shard
    assert len(report[0]["invariance"]) == 2 and max(report[0]["invariance"]) < 1e-6  # the output kept at each event
    assert [(e["step"], e["layer"], e["fused_pairs"]) for e in report[0]["events"]] == \
        [(e["step"], e["layer"], e["fused_pairs"]) for e in records(one_process[0] / "hf" / "method_events.jsonl")]
    expected = load_file(one_process[0] / "hf_adapter" / "adapter_model.safetensors")
    got = load_file(tmp / "adapter" / "adapter_model.safetensors")
    assert sorted(expected) == sorted(got)
    assert max((expected[k] - got[k]).abs().max().item() for k in expected if expected[k].numel()) <= 1e-4
    # resume_from_checkpoint at step 3 continues as the uninterrupted run
    assert all(r["resumed_losses"] == pytest.approx(r["losses"][3:], abs=1e-6) for r in report)
    resumed = load_file(tmp / "adapter_resumed" / "adapter_model.safetensors")
    assert max((got[k] - resumed[k]).abs().max().item() for k in got if got[k].numel()) <= 1e-6


def check_lower_precision(report) -> None:
    """The bf16 base under accelerate's bf16 mixed precision (DeepSpeed's bf16 engine) and the
    nf4 base (``lrx.wrap(quantize="nf4")``), run in the same launch: every event kept in the
    exact fp32 log (fusion error 0: nothing folded into bf16 or nf4), the output kept at each
    event, the nf4 codes untouched, and every rank bit-identical (events, gathered adapter and
    logs). A model built partitioned is refused for nf4 in one line."""
    for name, precision, base in (("bf16", "bf16", "torch.bfloat16"), ("nf4", "no", "torch.uint8")):
        first = report[0][name]
        assert (first["kind"], first["mixed_precision"], first["base_dtypes"]) == ("zero3", precision, [base]), name
        assert first["logged"] and first["log_dtypes"] == ["torch.float32"] and first["codes_kept"], name
        assert [e["step"] for e in first["events"]] == [2, 2, 2, 2, 4, 4, 4, 4], name
        assert all(e["fusion_error"] == 0.0 for e in first["events"]), name  # the log holds the factors exactly
        assert len(first["invariance"]) == 2 and max(first["invariance"]) < (1e-5 if name == "bf16" else 1e-6), name
        assert all(math.isfinite(x) for x in first["losses"]), name
        for other in report[1:]:
            assert (other[name]["events"], other[name]["digest"]) == (first["events"], first["digest"]), name
    assert all(r["nf4_partitioned"].startswith("quantize='nf4' needs the model whole in each process") for r in report)


@pytest.mark.distributed
def test_accelerate_zero3_trains_the_sharded_model_as_one_process(runs, tmp_path):
    """fp32 (with the checks of ``check_two_processes``), then bf16 and nf4 in the same process group;
    ``merge()`` of the ZeRO-3 sharded model is refused in one line."""
    report, _ = launch("zero3.yaml", tmp_path)
    assert [(r["kind"], r["distributed_type"]) for r in report] == [("zero3", "DistributedType.DEEPSPEED")] * 2
    check_two_processes(report, runs, tmp_path)
    check_lower_precision(report)
    assert all(r["merge"].startswith("merge() needs the whole model in one process, and this one is sharded "
                                     "(zero3, 2 processes); save the adapter") for r in report)


@pytest.mark.distributed
def test_accelerate_fsdp2_shards_the_model_on_cpu(runs, tmp_path):
    """accelerate's own FSDP2 path (``Accelerator.prepare_model`` -> ``fsdp2_prepare_model``:
    ``fully_shard`` per decoder layer with its mixed-precision policy) shards the model on 2 CPU
    gloo processes; the callback finds the shards and every check of ``check_two_processes``
    holds, and no event gathers a whole tensor. Forced: accelerate 1.16 sets
    ``DistributedType.FSDP`` only on GPU-type processes (on CPU its FSDP plugin falls back to
    DDP), so the launched script sets the shared state's type to FSDP (and its plugin, from the
    launch config) before the Trainer prepares the model (``hf_accelerate.force_fsdp``). On GPUs
    no override is needed (``tests/hf_gpu.py``)."""
    report, stderr = launch("fsdp2.yaml", tmp_path)
    assert [(r["kind"], r["distributed_type"], r["param_types"]) for r in report] == \
        [("fsdp2", "DistributedType.FSDP", ["DTensor"])] * 2  # parameters sharded by accelerate's fully_shard
    assert all(r["event_gathers"] == 0 for r in report)  # SRLoRA's events shard-local: no whole tensor gathered
    assert "the model is not sharded" not in stderr
    check_two_processes(report, runs, tmp_path)
    assert all(r["merge"].startswith("merge() needs the whole model in one process, and this one is sharded "
                                     "(fsdp2, 2 processes)") for r in report)


def test_fsdp_asked_but_whole_replicas_are_said(monkeypatch, caplog):
    """accelerate configured for FSDP (or DeepSpeed) whose model came out whole (accelerate's
    CPU fallback to DDP, without the override above): the callback says so, not passing as FSDP2."""
    from lrx.distributed.found import Placement, _whole
    from lrx.hf import _accelerate_checks
    from lrx.methods import LocalShards

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING", logger="lrx.hf"):
        _accelerate_checks(Placement("replicated", LocalShards(), _whole, 0, 2))
    assert "accelerate was configured for FSDP or DeepSpeed but the model is not sharded" in caplog.text
    assert "trains it as 2 whole copies" in caplog.text


@pytest.mark.gpu
def test_accelerate_fsdp2_on_one_gpu(tmp_path):
    """accelerate's FSDP2 plugin really applied on one GPU (DTensor parameters), bf16 mixed
    precision: the events, fusion error, output at each event and losses of one plain process
    (``tests/hf_gpu.py``, which the lead runs as ``python tests/hf_gpu.py OUT``)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hf_gpu.py"), str(tmp_path)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "verdict.json").read_text())["checks"]["fsdp2"]


def test_trl_example_trains_srlora_and_exports(tmp_path, monkeypatch):
    """``examples/sft_srlora.py`` (TRL's SFTTrainer) on a tiny Llama saved as transformers saves
    models: its 4 events on every adapted layer, and its peft export opens as the lrx adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer("tiny-llama")
    tokenizer.eos_token = "[SEP]"  # MiniLM's vocabulary has none; SFTTrainer appends one
    base_model(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["sft_srlora.py", "--model", str(tmp_path / "base"), "--data",
                                      str(QUICKSTART / "train.jsonl"), "--output_dir", str(out), "--max_steps", "5", "--batch_size", "2"])
    runpy.run_path(str(REPO / "examples" / "sft_srlora.py"), run_name="__main__")
    events = records(out / "method_events.jsonl")
    assert sorted({e["event"] for e in events}) == [1, 2, 3, 4] and len(events) == 4 * 14  # all-linear: 7 x 2 blocks
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lrx.load(out / "adapter", AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval())
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(out / "adapter_peft"))
        assert (peft.eval()(input_ids=ids).logits - ours.model(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_fsdp1_is_refused_in_one_line():
    """A model under FSDP1 (one process, gloo): its FlatParameters mix whole blocks."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lrx.distributed.found import find_placement

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = FullyShardedDataParallel(torch.nn.Sequential(torch.nn.Linear(4, 4)), device_id=torch.device("cpu"))
        with pytest.raises(ConfigError, match="FSDP1 .* set fsdp_version: 2"):
            find_placement(model)
    finally:
        dist.destroy_process_group()
