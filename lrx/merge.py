"""Merging an adapted model in place: every adapter and edit folded into its base, plain
linears put back (peft's ``merge_and_unload``). ``lrx.Adapter.merge`` and the merged export
(``lrx.export``) both call it; it sits below both, so the API does not import the export.
"""

from __future__ import annotations

import torch
from torch import nn

from lrx.methods import adapted_layers
from lrx.quant import QuantizedLinear


@torch.no_grad()
def merge_into_linears(model: nn.Module) -> int:
    """Fold every adapted layer (edits and adapter) into its base in fp32 and unwrap it; a
    quantized base (and every other quantized linear) becomes a plain ``nn.Linear`` holding
    its dequantized weight plus the change (quantized fused experts: their parameter again, in
    the dtype they computed in).

    Returns:
        The number of layers merged.
    """
    layers = list(adapted_layers(model))
    for name, layer in layers:
        weight = layer.merged_weight()
        parent, _, child = name.rpartition(".")
        if getattr(layer, "fused", False) and layer.quantized:  # experts: a parameter in the dtype they computed in
            setattr(model.get_submodule(parent) if parent else model, child,
                    nn.Parameter(weight.to(layer.base.dtype), requires_grad=False))
            continue
        base = layer.base if not layer.quantized else plain_linear(layer.base)
        base.weight.copy_(weight.to(base.weight.dtype))  # one rounding, from fp32
        # fused experts: the parameter takes its place back
        setattr(model.get_submodule(parent) if parent else model, child, base.weight if getattr(layer, "fused", False) else base)
    for parent in list(model.modules()):
        for child, module in list(parent.named_children()):
            if isinstance(module, QuantizedLinear):
                linear = plain_linear(module)
                linear.weight.copy_(module.dequantize())
                setattr(parent, child, linear)
    return len(layers)


def plain_linear(module: nn.Module) -> nn.Linear:
    """An fp32 ``nn.Linear`` of a quantized layer's shape and bias (weight to be filled)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=module.weight.device)
    if module.bias is not None:
        linear.bias.copy_(module.bias)
    return linear
