"""The conformance matrix: every registered method on tiny Llama and BERT models.

A new method is a new row automatically (parametrised over the registry). Each method must:
keep the base output at init when it promises to, train only its adapter parameters, get
gradients into every adapted layer, give the same output merged and unmerged, round-trip
through save/load, and export a delta (lrx factors and a peft adapter) that equals what its
layers apply.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lrx.adapter import export_peft, load_adapter, save_adapter
from lrx.build import Adapters
from lrx.config import load_config
from lrx.eigenbasis import build_basis
from lrx.export import checked_adapter_config
from lrx.methods import EditingConfig, LocalShards, adapted_layers, available_methods, build_method, get_method_class
from lrx.methods.layer import delta_weight
from tests.conftest import tiny_model

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}
EDITING = [m for m in available_methods() if issubclass(get_method_class(m).config_cls, EditingConfig)]
# Methods that edit their base run with the edits folded and logged; the others keep no edits.
CASES = [(m, k, fuse) for m in available_methods() for k in ("llama", "bert")
         for fuse in (("fold", "log") if m in EDITING else ("none",))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


_BASES: dict[str, str] = {}


def eigenbasis_for(kind: str) -> str:
    """An EigenLoRAx basis for the tiny model, from three random LoRA adapters (built once)."""
    if kind not in _BASES:
        root = Path(tempfile.mkdtemp(prefix=f"lrx-basis-{kind}-"))
        sources = []
        for seed in range(3):
            model = tiny_model(kind)
            cfg = load_config(None, ["method.r=4", "method.target_modules=" + ",".join(TARGETS[kind])]).method
            method = build_method(cfg)
            Adapters(method).adapt(model)
            perturb(model, seed=seed, size=0.5)
            sources.append(export_peft(root / f"src{seed}", model, method))
        build_basis(sources, root / "basis", k=6, augment=2)
        _BASES[kind] = str(root / "basis")
    return _BASES[kind]


def method_overrides(method_name: str, kind: str) -> list[str]:
    """What a method needs beyond the common settings to run on the tiny models."""
    if method_name == "eigenlorax":
        return [f"method.basis={eigenbasis_for(kind)}"]
    return ["method.target_modules=" + ",".join(TARGETS[kind])]


def adapt(method_name: str, kind: str, fuse: str, base=None):
    base = base if base is not None else tiny_model(kind)
    original = copy.deepcopy(base)
    fuse_key = [f"method.fuse={fuse}"] if method_name in EDITING else []
    cfg = load_config(None, ["method.r=4", *fuse_key, *method_overrides(method_name, kind)],
                      method=method_name).method
    method = build_method(cfg)
    torch.manual_seed(0)
    Adapters(method).adapt(base)
    method.attach(base, LocalShards())  # as the trainer does once the model is placed
    return original, base, method


def perturb(model, seed: int = 7, size: float = 0.05) -> None:
    """Give every adapter a non-trivial value, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for p in layer.adapter_params().values():
                p.add_(torch.randn(p.shape, generator=g) * size)


@pytest.mark.parametrize("method_name,kind,fuse", CASES)
def test_output_at_init(method_name, kind, fuse):
    original, model, method = adapt(method_name, kind, fuse)
    if not method.preserves_output_at_init:
        pytest.skip(f"{method_name} does not promise an unchanged output at init")
    batch = inputs()
    assert rel(logits(model, batch), logits(original, batch)) <= 1e-5


@pytest.mark.parametrize("method_name,kind,fuse", CASES)
def test_only_adapters_trainable_and_gradients_reach_them(method_name, kind, fuse):
    _, model, method = adapt(method_name, kind, fuse)
    named = dict(method.trainable_parameters(model))
    requires = {n for n, p in model.named_parameters() if p.requires_grad}
    assert requires == {n for n, p in model.named_parameters() if any(p is q for q in named.values())}
    assert len(requires) == len(named)
    layers = dict(adapted_layers(model))
    assert layers, "nothing was adapted"
    model.train()
    out = model(**inputs())
    out.logits.float().pow(2).mean().backward()
    for name, layer in layers.items():
        grads = [p.grad for p in layer.adapter_params().values()]
        assert all(g is not None for g in grads), name
        assert sum(g.norm() for g in grads) > 0, f"no gradient reaches {name}"
        assert layer.base.weight.grad is None


@pytest.mark.parametrize("method_name,kind,fuse", CASES)
def test_merged_equals_unmerged(method_name, kind, fuse):
    _, model, _ = adapt(method_name, kind, fuse)
    perturb(model)
    batch = inputs()
    before = logits(model, batch)
    for _, layer in adapted_layers(model):
        layer.merge()
    merged = logits(model, batch)
    for _, layer in adapted_layers(model):
        layer.unmerge()
    assert rel(merged, before) <= 1e-5
    assert rel(logits(model, batch), before) <= 1e-5


@pytest.mark.parametrize("method_name,kind,fuse", CASES)
def test_delta_weight_is_what_the_layer_applies(method_name, kind, fuse):
    original, model, method = adapt(method_name, kind, fuse)
    perturb(model)
    for name, layer in adapted_layers(model):
        x = torch.randn(3, 5, layer.in_features)
        W0 = original.get_submodule(name).weight.detach()
        bias = original.get_submodule(name).bias
        delta = delta_weight(layer)
        B, A = method.delta_factors(layer)
        assert rel(B @ A, delta) <= 1e-6
        with torch.no_grad():
            expected = F.linear(x.double(), (W0.double() + delta.double()), None if bias is None else bias.double())
            assert rel(layer(x).double(), expected) <= 1e-5, name


@pytest.mark.parametrize("method_name,kind,fuse", CASES)
def test_save_load_round_trip(method_name, kind, fuse, tmp_path):
    original, model, method = adapt(method_name, kind, fuse)
    perturb(model)
    batch = inputs()
    save_adapter(tmp_path / "adapter", model, method, {"base_model": "tiny"})
    fresh = copy.deepcopy(original)
    loaded = load_adapter(tmp_path / "adapter", fresh)
    assert loaded.name == method.name
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), rtol=0, atol=0)
    for (n1, l1), (n2, l2) in zip(adapted_layers(model), adapted_layers(fresh)):
        assert n1 == n2
        assert torch.equal(l1.base.weight, l2.base.weight), "replayed base differs from the trained one"
        assert torch.equal(l1.edit_log.U, l2.edit_log.U) and torch.equal(l1.lora_A, l2.lora_A)
    for key, value in method.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])


@pytest.mark.parametrize("method_name", [m for m in available_methods() if m not in EDITING and m != "eigenlorax"])
def test_adapters_written_when_every_method_had_fuse_still_load(method_name, tmp_path):
    """Until fuse and edit_log became settings of the editing methods only, every adapter
    config (and run config) held them at "auto": such files still load."""
    original, model, method = adapt(method_name, "llama", "none")
    perturb(model)
    save_adapter(tmp_path / "adapter", model, method, {"base_model": "tiny"})
    file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(file.read_text())
    config["method"].update(fuse="auto", edit_log="auto")
    file.write_text(json.dumps(config))
    fresh = copy.deepcopy(original)
    load_adapter(tmp_path / "adapter", fresh)
    torch.testing.assert_close(logits(fresh, inputs()), logits(model, inputs()), rtol=0, atol=0)
    run_config = load_config(None, ["method.fuse=auto", "method.edit_log=auto"], method=method_name)
    assert not hasattr(run_config.method, "fuse")
    checked_adapter_config(tmp_path / "adapter")  # and the export's check of the file accepts it


@pytest.mark.parametrize("method_name,kind", [(m, k) for m in available_methods() for k in ("llama", "bert")])
def test_peft_export_reproduces_logits(method_name, kind, tmp_path):
    peft = pytest.importorskip("peft")
    original, model, method = adapt(method_name, kind, "fold")
    perturb(model)
    if method.saved_modules:
        with torch.no_grad():
            for p in model.get_submodule(method.saved_modules[0]).parameters():
                p.add_(0.1)
    export_peft(tmp_path / "peft", model, method, base_model_name="tiny")
    restored = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "peft")).eval()
    batch = inputs()
    assert rel(logits(restored, batch), logits(model, batch)) <= 1e-5
