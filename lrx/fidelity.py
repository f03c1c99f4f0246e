"""Fusion fidelity of SRLoRA events per base dtype and edit mode, against float64 references.

One d x d layer (weights N(0, 0.02)) goes through ``events`` recompositions; before each, the
adapter moves by ``relative_update * ||W0||``. ``fusion_fidelity`` returns the error of the
applied edits against the intended total edit, and against the net training update (stricter:
the big PiSSA subtractions cancel out of it), plus the edit log's size against the adapter's.
``tools/bench_fusion.py`` tabulates it; the tests bound it.
"""

from __future__ import annotations

import torch
from torch import nn

from lrx.build import Adapters
from lrx.config import load_config
from lrx.methods import LocalShards, adapted_layers, build_method
from lrx.quant import Quantizer, QuantSettings


def _srlora_layer(dtype: torch.dtype, fuse: str, events: int, d: int, r: int, quantize: str):
    """A d x d SRLoRA layer with a pool for ``events`` events: (model, method, layer, W0, codes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.02)
    model = model.to(dtype)
    W0, codes = model[0].weight.detach().double().clone(), None
    cfg = load_config(None, [f"method.r={r}", f"method.r_target={r + r // 2 * events}", "method.target_modules=0",
                             f"method.fuse={fuse}", "method.svd=randomized"], method="srlora").method
    method = build_method(cfg)
    quantizer = Quantizer(QuantSettings(quantize)) if quantize != "none" else None
    Adapters(method, quantizer=quantizer).adapt(model)  # PiSSA's init, then the base quantized, as a run builds it
    layer = dict(adapted_layers(model))["0"]
    if quantizer is not None:
        W0 = layer.base.dequantize().double()  # the quantized residual: what training starts from
        codes = layer.base.weight.detach().clone()
    return model, method, layer, W0, codes


def fusion_fidelity(dtype: torch.dtype, fuse: str, relative_update: float, events: int, d: int, r: int,
                    quantize: str = "none") -> dict:
    """One row; ``quantize`` (nf4, fp4, int8): the base is quantized after the PiSSA init, as
    ``model.quantize`` does, and W0 is then the dequantized base training starts from."""
    model, method, layer, W0, codes = _srlora_layer(dtype, fuse, events, d, r, quantize)
    method.attach(model, LocalShards())
    g = torch.Generator().manual_seed(1)
    net = torch.zeros(d, d, dtype=torch.float64)

    def adapter64() -> torch.Tensor:  # s * B @ A in float64: the reference must not round
        return (layer.lora_B.detach().double() @ layer.lora_A.detach().double()) * layer.scale

    # The effective weight training starts from is W0 (the PiSSA pairs cancel their residual
    # edit), or on a quantized base the dequantized residual plus the initial pairs.
    start = adapter64() if quantize != "none" else 0

    for step in range(1, events + 1):
        with torch.no_grad():
            before = adapter64()
            direction = torch.randn(layer.lora_B.shape, generator=g)
            change = (direction @ layer.lora_A.detach()).double() * layer.scale
            layer.lora_B.add_(direction * (relative_update * W0.norm() / change.norm()).item())
            net += adapter64() - before
        for value in method.importance.pieces["0"].values():
            value.uniform_(0, 1, generator=g)
        method.recompose(None, step)
    U, V = layer.edit_log.factors()
    U, V = U[:, layer.edit_log.baked :], V[layer.edit_log.baked :]  # the edits of the events (a quantized base holds the rest)
    intended = U.double() @ V.double()
    base_now = layer.base.dequantize() if layer.quantized else layer.base.weight
    applied = base_now.double() - W0 + (0 if layer.fold_edits else intended)
    effective = W0 + applied + adapter64() - start
    if layer.quantized and not torch.equal(layer.base.weight, codes):
        raise AssertionError("an event changed the quantized base")
    log_bytes = sum(t.numel() for t in layer.edit_log.held()) * 4
    adapter_bytes = (layer.lora_A.numel() + layer.lora_B.numel()) * 4
    return {
        "dtype": str(dtype).removeprefix("torch.") if quantize == "none" else quantize, "fuse": fuse, "mode": "fold" if layer.fold_edits else "log",
        "relative_update": relative_update,
        "error_vs_total_edit": ((applied - intended).norm() / intended.norm()).item(),
        "error_vs_net_update": ((effective - W0 - net).norm() / net.norm()).item(),
        "edit_rank": layer.edit_log.rank, "edit_log_bytes": log_bytes, "adapter_bytes": adapter_bytes,
        # Log mode applies the edit rank beside the adapter: extra multiply-adds per token.
        "extra_flops_vs_adapter": 0.0 if layer.fold_edits else layer.edit_log.rank / layer.r,
    }
