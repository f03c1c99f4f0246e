"""Quantized fused MoE experts (``model.quantize=nf4|int8``, ``lrx.quant.QuantizedExperts``): the
adapted experts are stored quantized per expert (codes + statistics, a quarter or half of the
bf16 bytes), compute with their dequantized weight plus the adapter, train with lora, pissa and
srlora (SRLoRA's events in the exact log), and merge into the dequantized weight, on one process
and over several (FSDP2, ZeRO-3: their codes sharded, each rank's piece that of one process); an
adapter that recorded its experts unquantized rebuilds them so (one warning)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from lrx.adapter import load_adapter, save_adapter
from lrx.build import Adapters
from lrx.config import load_config
from lrx.errors import ConfigError
from lrx.merge import merge_into_linears
from lrx.methods import LocalShards, build_method
from lrx.methods.experts import AdaptedExperts
from lrx.methods.seam import PieceShards
from lrx.quant import QuantizedExperts, QuantizedLinear, Quantizer, QuantSettings, bitsandbytes
from tests.test_experts import SMALL, batch, logits, perturb, srlora_train, tiny_moe, train

pytest.importorskip("bitsandbytes")


def quantized_moe(kind: str, method_name: str = "lora", family: str = "qwen3_moe", **extra):
    """A tiny MoE adapted on q_proj, v_proj and its experts, built as a run builds it (``Adapters``
    with a quantizer), attached for one process."""
    model = tiny_moe(family)
    original = copy.deepcopy(model)
    overrides = ["method.target_modules=[q_proj,v_proj,experts]", "method.r=4", *(f"method.{k}={v}" for k, v in extra.items())]
    method = build_method(load_config(None, overrides, method=method_name).method)
    torch.manual_seed(1)
    Adapters(method, quantizer=Quantizer(QuantSettings(kind))).adapt(model)
    method.attach(model, LocalShards())
    return original, model, method


def experts_of(method) -> dict[str, AdaptedExperts]:
    return {n: lay for n, lay in method.layers.items() if isinstance(lay, AdaptedExperts)}


@pytest.mark.parametrize("kind,family", [("nf4", "qwen3_moe"), ("int8", "qwen3_moe"), ("nf4", "gpt_oss")])
def test_quantized_experts_are_stored_per_expert_and_compute_with_their_dequantized_weight(kind, family):
    """Each expert's codes are those of that expert quantized alone, half (int8) or a quarter
    (nf4) of bf16's bytes, plus their per-block or per-row statistics; the model computes what the plain
    model with ``dequantized W_e + scale B_e A_e`` in each expert computes."""
    original, model, method = quantized_moe(kind, family=family)
    experts = experts_of(method)
    assert len(experts) == 4 and all(isinstance(lay.base, QuantizedExperts) for lay in experts.values())
    settings = QuantSettings(kind)
    for name, layer in experts.items():
        W = original.get_parameter(name).detach()  # experts x rows x cols, as stored
        E, rows, cols = W.shape
        codes = layer.base.weight
        code_bytes = codes.numel() * codes.element_size()
        assert code_bytes == E * settings.code_bytes(rows, cols) == E * rows * cols * (1 if kind == "int8" else 0.5)
        # Per-block (row) statistics, besides the code books and packed settings, which do not grow with size.
        stats = sum(b.numel() * b.element_size() for n, b in layer.base.named_buffers() if "quant_" not in n)
        assert stats == settings.stat_bytes(E * rows, cols) == E * (4 * rows if kind == "int8" else rows * cols / 64) + \
            (0 if kind == "int8" else 4)  # int8: an fp32 scale a row; nf4: a byte a block of 64, one fp32 per 256 blocks
        per_expert = torch.cat([QuantizedLinear.of(w, settings).weight.reshape(-1) for w in W])
        assert torch.equal(codes.reshape(-1), per_expert)  # no block or row scale spans two experts
        error = (layer.base.dequantize() - W).norm() / W.norm()
        assert 0 < error < (0.02 if kind == "int8" else 0.15), error
    perturb(method)
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in experts.items():
            delta = torch.bmm(layer.lora_B, layer.lora_A) * layer.scale
            reference.get_parameter(name).copy_(layer.base.dequantize() + layer.base.stored(delta))
        for name, module in model.named_modules():  # the other linears: quantized, maybe adapted
            if type(module) is QuantizedLinear:
                name = name.removesuffix(".base")
                change = method.layers[name].scale * method.layers[name].lora_B @ method.layers[name].lora_A \
                    if name in method.layers else 0
                reference.get_submodule(name).weight.copy_(module.dequantize() + change)
    ids = batch()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method_name,kind", [("lora", "nf4"), ("pissa", "int8")])
def test_quantized_experts_train_round_trip_and_merge(method_name, kind, tmp_path):
    """Training moves the loss; the adapter reloads onto a freshly quantized base bit for bit;
    the merged model (experts dequantized plus the change) gives the trained logits."""
    original, model, method = quantized_moe(kind, method_name)
    losses = train(model, method, steps=6)
    assert losses[-1] < losses[0] - 0.2, losses
    ids = batch()
    trained = logits(model, ids)
    save_adapter(tmp_path / "adapter", model, method, {"base_model": "tiny", "quantize": QuantSettings(kind).to_dict(),
                                                       "model_dtype": "float32"})
    resumed = copy.deepcopy(original)
    load_adapter(tmp_path / "adapter", resumed)
    assert any(isinstance(m, QuantizedExperts) for m in resumed.modules())
    torch.testing.assert_close(logits(resumed, ids), trained, rtol=0, atol=0)
    merge_into_linears(model)
    assert not any(isinstance(m, (AdaptedExperts, QuantizedLinear)) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), trained, rtol=0, atol=1e-5)


def test_srlora_events_on_quantized_experts_stay_in_the_exact_log(tmp_path):
    """SRLoRA's per-expert events on an nf4 base keep the output (<= 1e-5) and never touch the
    codes: the fused pairs and the new directions' residuals are log columns after the baked
    ones (the init's residual, which the codes contain); the adapter rebuilds the trained model
    on a fresh base (the baked columns quantized, the rest replayed into the log)."""
    original, model, method = quantized_moe("nf4", "srlora", interval=3, r_target=8)
    layer = method.layers["model.layers.0.mlp.experts.gate_up_proj"]
    codes = layer.base.weight.detach().clone()
    assert layer.edit_log.baked == layer.edit_log.rank == 4 and not layer.fold_edits
    opt = torch.optim.Adam([p for _, p in method.trainable_parameters(model)], lr=1e-2)
    method.on_train_start(model, opt, 7)
    losses, _ = srlora_train(model, method, 2, opt=opt)
    ids = batch()
    before = logits(model, ids)
    records = method.recompose(opt, 3)
    assert method.events_done == 1 and any("expert_fusion_errors" in rec for rec in records)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    assert torch.equal(layer.base.weight, codes) and layer.edit_log.rank == 4 + 2 * method.config.swap
    assert layer.edit_log.baked == 4
    more, _ = srlora_train(model, method, 4, start=3, opt=opt)
    assert (losses + more)[-1] < losses[0] - 0.2, losses + more
    trained = logits(model, ids)
    save_adapter(tmp_path / "adapter", model, method, {"base_model": "tiny", "quantize": QuantSettings("nf4").to_dict(),
                                                       "model_dtype": "float32"})
    resumed = copy.deepcopy(original)
    load_adapter(tmp_path / "adapter", resumed)
    torch.testing.assert_close(logits(resumed, ids), trained, rtol=0, atol=0)
    merge_into_linears(model)
    torch.testing.assert_close(logits(model, ids), trained, rtol=0, atol=1e-5)


def test_quantized_experts_attach_over_several_processes():
    """Refused before (one process only): quantized experts now attach as a backend of 2 processes
    attaches them, their base still the ``QuantizedExperts``."""
    bitsandbytes()
    _, model, method = quantized_moe("int8")
    method.attach(model, PieceShards(0, 2))  # as a backend of 2 processes would: no refusal
    assert all(isinstance(lay.base, QuantizedExperts) for lay in experts_of(method).values())


def test_a_run_over_several_processes_quantizes_the_experts_and_an_old_adapter_rebuilds_them_unquantized(caplog):
    """FSDP2/ZeRO-3 (``quant_settings`` of 2 processes) quantize the adapted experts as one process
    does (no warning), the layers attach over 2 processes, and the adapter's ``quantize`` records
    it; an adapter saved before experts were quantized (no ``experts`` key) or that recorded them
    unquantized keeps them ``ExpertWeights`` in model.dtype (named in one warning), the other linears
    quantized, so a load rebuilds the model as that run held it."""
    from lrx.adapter import quantizer_of
    from lrx.methods.experts import ExpertWeights
    from lrx.runner import quant_settings

    config = load_config(None, ["model.quantize=nf4", "method.target_modules=[q_proj,v_proj,experts]", "method.r=4"])
    assert quant_settings(config, 1).experts and quant_settings(config, 1).to_dict()["experts"] is True
    settings = quant_settings(config, 2)
    assert settings == quant_settings(config, 1) and settings.to_dict()["experts"] is True
    assert QuantSettings.from_dict(settings.to_dict()) == settings
    # an adapter saved before experts were quantized records no "experts": its experts ran unquantized
    old = QuantSettings.from_dict({"kind": "nf4", "double_quant": True, "blocksize": 64})
    assert not old.experts and old.to_dict()["experts"] is False
    model, method = tiny_moe("qwen3_moe"), build_method(config.method)
    with caplog.at_level("WARNING", logger="lrx.quant"):
        Adapters(method, quantizer=Quantizer(settings)).adapt(model)
    assert not [r for r in caplog.records if "stay in the model's dtype" in r.getMessage()]
    assert len(experts_of(method)) == 4 and all(isinstance(lay.base, QuantizedExperts) for lay in experts_of(method).values())
    method.attach(model, PieceShards(0, 2))  # as a backend of 2 processes would: no refusal
    unquantized, plain = tiny_moe("qwen3_moe"), build_method(config.method)
    with caplog.at_level("WARNING", logger="lrx.quant"):
        Adapters(plain, quantizer=Quantizer(old)).adapt(unquantized)
    experts = experts_of(plain)
    assert len(experts) == 4 and all(type(lay.base) is ExpertWeights and lay.base.weight.dtype == torch.float32
                                     for lay in experts.values())
    assert not any(isinstance(m, QuantizedExperts) for m in unquantized.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in unquantized.modules()) == 8  # q, k, v, o_proj of 2 layers
    warnings = [r.getMessage() for r in caplog.records if "stay in the model's dtype" in r.getMessage()]
    assert len(warnings) == 1 and "the 4 adapted fused experts weights" in warnings[0], warnings
    plain.attach(unquantized, PieceShards(0, 2))
    for recorded, built in ((old, unquantized), (settings, model)):
        again = tiny_moe("qwen3_moe")
        replanned = build_method(config.method)
        replanned.wrap(again)
        planned = quantizer_of({"quantize": recorded.to_dict()}, again, replanned).targets.values()
        assert sorted(planned) == sorted(n for n, m in built.named_modules() if isinstance(m, QuantizedLinear))


def test_the_memory_plan_counts_the_experts_quantized_over_several_processes():
    """lrx/plan.py's base bytes of 2 processes count the adapted experts as their nf4 codes (at most
    an eighth of their fp32 bytes) and statistics, as for one process (before: in model.dtype)."""
    from lrx.plan import _base_bytes

    config = load_config(None, ["model.quantize=nf4", "method.target_modules=[q_proj,v_proj,experts]", "method.r=4"])
    model, method = tiny_moe("qwen3_moe"), build_method(config.method)
    method.wrap(model)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    experts = sum(lay.base.weight.numel() * 4 for lay in experts_of(method).values())
    assert len(experts_of(method)) == 4
    one, two = _base_bytes(model, config, method, 1), _base_bytes(model, config, method, 2)
    assert two == one and one[0] <= frozen - experts + experts / 8 and one[1] > 0


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_srlora_on_quantized_experts_equals_one_process(srlora_reports, backend):
    """SRLoRA on a tiny Qwen3-MoE of 3 experts with an nf4 base, experts stored as ``QuantizedExperts``
    (tests/dist_srlora.py's ``moe log nf4`` job, in the 2-process launch of its other jobs): 2 processes
    equal one process (losses, event choices, the output kept at each event, every edit in the exact
    log beside the codes), each rank's piece of every experts weight's codes is that piece of one
    process's codes bit for bit (the pieces cut experts: dequantized only where gathered whole), the
    ranks together hold all of them, and the saved adapter merged onto a fresh model is the
    one-process merged model and the trained one."""
    single, sharded = srlora_reports("single", 1, "moe", "log", "nf4"), srlora_reports(backend, 2, "moe", "log", "nf4")
    assert len(sharded["events"]) == 3 and sharded["events"] == single["events"]  # events at steps 3, 6, 9
    experts = [pairs for event in sharded["events"] for name, pairs in event if ".experts." in name]
    assert len(experts) == 3 * 4 and all(len(pairs) == 3 for pairs in experts)  # each expert's own pairs
    assert max(sharded["invariance"]) < 1e-6
    assert sharded["losses"] == pytest.approx(single["losses"], abs=1e-5)
    # the log: 4 baked columns (QPiSSA's init), then 3 events x (2 fused + 2 loaded pairs), none folded
    assert sharded["expert_logs"] == single["expert_logs"] and len(single["expert_logs"]) == 4
    assert all(rank == baked + 3 * 4 and baked == 4 for rank, baked in single["expert_logs"].values())
    first, other = sharded["per_rank"]
    shared = [k for k in first if ".pool_" not in k]
    assert any(".experts." in k and ".edit_U" in k for k in shared)
    assert {k: first[k] for k in shared} == {k: other[k] for k in shared}
    (whole,) = single["expert_codes"]
    assert len(whole) == 4 and len(sharded["expert_codes"]) == 2
    for name, (_, _, codes) in whole.items():
        spans = []
        for pieces in sharded["expert_codes"]:
            start, end, piece = pieces[name]
            assert piece == codes[start:end], (name, start, end)
            spans.append((start, end))
        assert spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == len(codes), spans
        assert spans[0][1] % (len(codes) // 3), spans  # the boundary cuts an expert's codes
    merged, trained = torch.tensor(sharded["merged_logits"]), torch.tensor(sharded["trained_logits"])
    torch.testing.assert_close(merged, torch.tensor(single["merged_logits"]), rtol=0, atol=1e-5)
    assert ((merged - trained).norm() / trained.norm()).item() < 1e-5
    assert sharded["merged_modules"] == single["merged_modules"] == []  # plain transformers modules


def test_experts_whose_4bit_blocks_would_span_two_experts_refuse_in_one_line():
    """down_proj of 32 x 17 per expert: 544 values, not a multiple of the block size 64."""
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=17,
                                                            num_experts=4, **SMALL))
    method = build_method(load_config(None, ["method.target_modules=[experts]", "method.r=4"]).method)
    with pytest.raises(ConfigError, match="experts of 32x17 are not a multiple of the nf4 block size 64") as err:
        Adapters(method, quantizer=Quantizer(QuantSettings("nf4"))).adapt(model)
    assert "\n" not in str(err.value)


def test_experts_left_out_of_the_targets_stay_unquantized_and_are_named_in_one_warning(caplog):
    model = tiny_moe("qwen3_moe")
    method = build_method(load_config(None, ["method.target_modules=[q_proj,experts.gate_up_proj]", "method.r=4"]).method)
    with caplog.at_level("WARNING", logger="lrx.quant"):
        Adapters(method, quantizer=Quantizer(QuantSettings("nf4"))).adapt(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedExperts)]
    assert quantized == [f"model.layers.{i}.mlp.experts.gate_up_proj.base" for i in range(2)]
    assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.float32
    warnings = [r.getMessage() for r in caplog.records if "stay in the model's dtype" in r.getMessage()]
    assert len(warnings) == 1 and "2 fused experts weights" in warnings[0] and "experts.down_proj" in warnings[0]


def test_pissa_quantizes_the_residual_of_transposed_experts_whichever_way_its_edit_was_kept():
    """gpt-oss (experts x in x out): the base holds W - scale B A quantized (QPiSSA), whether the
    init's edit was folded (fp32) or kept in the log and added in the stored layout when the base
    is quantized (``fuse=log``); its error is below quantizing W itself."""
    effective = {}
    for fuse in ("auto", "log"):
        original, _, method = quantized_moe("int8", "pissa", family="gpt_oss", fuse=fuse)
        for name, layer in experts_of(method).items():
            assert layer.base.transposed and layer.edit_log.baked == 4
            effective[fuse, name] = layer.base.dequantize() + layer.base.stored(torch.bmm(layer.lora_B, layer.lora_A) * layer.scale)
    for (_, name), eff in effective.items():
        W = original.get_parameter(name).detach()
        direct = QuantizedExperts.of_experts(W, QuantSettings("int8"), True, W.dtype).dequantize()
        assert (eff - W).norm() < 0.9 * (direct - W).norm(), name  # a random W: its top 4 directions hold little
        torch.testing.assert_close(eff, effective["auto", name], rtol=0, atol=1e-6)
