"""Checkpoints stored quantized by bitsandbytes (``*-bnb-4bit`` folders): read as stored.

transformers + bitsandbytes ``save_pretrained`` writes each quantized linear as its packed
codes (``{layer}.weight``: uint8 for nf4/fp4, int8 for int8) beside the statistics: for 4-bit
``QuantState.as_dict(packed=True)`` under ``{layer}.weight.`` (``absmax``, ``quant_map``,
``nested_absmax``, ``nested_quant_map``, ``quant_state.bitsandbytes__{nf4,fp4}``), for int8
the row scales ``{layer}.SCB``. ``load_prequantized`` builds the model with those linears'
weights as stand-ins (no memory) and every other tensor read from the files; ``StoredQuantizer``
then makes each planned linear a ``QuantizedLinear`` of the stored codes and statistics, bit
for bit, one layer at a time. Nothing is dequantized whole: a method that reads the weight at
init (PiSSA, SRLoRA's pool) gets one layer's dequantized weight (``dequantized_base``), and
its init edits stay in the exact edit log beside the stored codes (``bakes = False``: the
residual is not quantized again, as it is when lrx quantizes a full-precision folder).

Under FSDP2 and ZeRO-3 the runner's ``ModelSpec`` is ``blockwise``: the model is built on the
meta device and filled one transformer block at a time; the planned linears' weights are never
read (``StoredQuantizer.replaces``: the backend leaves them as stand-ins), each block's layers
get their stored codes as they are initialised, and the block is sharded before the next is
read, so no process holds the whole model; each keeps its piece of the codes as stored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from lrx.errors import ConfigError, ModelError
from lrx.fileio import WeightFiles
from lrx.quant import QuantizedLinear, Quantizer, QuantSettings

SUPPORTED = "bitsandbytes nf4/fp4 (with or without double quantization) and int8"
STATE_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def stored_settings(config, path: Path | str) -> QuantSettings | None:
    """The quantization a checkpoint is stored in (its config's ``quantization_config``), or
    None for a full-precision one.

    Raises:
        ModelError: a format lrx cannot read (GPTQ, AWQ, ...), naming what it reads.
    """
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    kind = qc.get("quant_method", "unknown")
    if kind == "bitsandbytes" and qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type", "nf4") in ("nf4", "fp4"):
        return QuantSettings(qc.get("bnb_4bit_quant_type", "nf4"), bool(qc.get("bnb_4bit_use_double_quant")), stored=True)
    if kind == "bitsandbytes" and qc.get("load_in_8bit"):
        return QuantSettings("int8", False, stored=True)
    raise ModelError(f"{path} is stored quantized ({kind}), which lrx cannot read; it reads checkpoints stored as "
                     f"{SUPPORTED}, or full-precision ones (model.quantize quantizes them while loading)")


def check_explicit(quantize: str, double_quant: bool, stored: QuantSettings, path: str) -> None:
    """Refuse an explicit ``model.quantize`` that differs from how the checkpoint is stored.

    Raises:
        ConfigError: naming both.
    """
    if quantize not in ("none", stored.kind):
        raise ConfigError(f"model.quantize={quantize} but {path} is stored quantized as {stored.kind}; "
                          f"set model.quantize={stored.kind} or none (it is taken from the checkpoint)")


def stored_layers(files: WeightFiles, settings: QuantSettings) -> set[str]:
    """The names of the linears the files hold quantized."""
    suffix = ".SCB" if settings.kind == "int8" else ".weight.absmax"
    return {k.removesuffix(suffix) for k in files.keys() if k.endswith(suffix)}


def stored_layer(files: WeightFiles, name: str, settings: QuantSettings, bias: torch.Tensor | None,
                 device: torch.device | None = None) -> QuantizedLinear:
    """The ``QuantizedLinear`` of one stored layer: its codes and statistics as the files hold them."""
    def read(key: str) -> torch.Tensor:
        return files.get(key).to(device) if device is not None else files.get(key)

    codes = read(f"{name}.weight")
    if settings.kind == "int8":
        state = {"SCB": read(f"{name}.SCB").float()}
        out_features, in_features = codes.shape
    else:
        tag = f"quant_state.bitsandbytes__{settings.kind}"
        keys = [k for k in (*STATE_4BIT, tag) if f"{name}.weight.{k}" in files]
        state = {k: read(f"{name}.weight.{k}") for k in keys}
        out_features, in_features = _shape_4bit(state[tag])
    bias = None if bias is None or bias.device.type == "meta" else bias
    return QuantizedLinear(in_features, out_features, settings, codes, state, bias)


def _shape_4bit(packed: torch.Tensor) -> tuple[int, int]:
    import json

    meta = json.loads(bytes(packed.tolist()).decode())
    return tuple(int(d) for d in meta["shape"])


class StoredQuantizer(Quantizer):
    """A ``Quantizer`` whose layers come quantized from a bitsandbytes checkpoint (see the module
    doc): the planned linears get the stored codes and statistics; the weight they are given
    (a full-precision base plus init edits) is never quantized, and edits stay in the log."""

    bakes = False

    def __init__(self, settings: QuantSettings, folder: Path | str, device: torch.device | None = None):
        super().__init__(settings, device)
        self.files = WeightFiles(sorted(Path(folder).glob("*.safetensors")))
        self.folder = folder
        self._weights: set[int] = set()

    def plan(self, model: nn.Module, skip: list[str]) -> None:
        super().plan(model, skip)
        stored = stored_layers(self.files, self.settings)
        planned = {n.removesuffix(".base") for n in self.targets.values()}
        if stored - planned:
            raise ConfigError(f"{self.folder} stores {sorted(stored - planned)[0]} quantized, which this run trains "
                              "in full or keeps as an output head; drop it from method.modules_to_save")
        self.targets = {i: n for i, n in self.targets.items() if n.removesuffix(".base") in stored}
        self._weights = {id(m.weight) for m in model.modules() if id(m) in self.targets}

    def replaces(self, param: torch.Tensor) -> bool:
        """The planned linears' weights: stand-ins (on the meta device while a backend streams the
        files) that are never read; ``__call__`` reads their codes and statistics instead."""
        return id(param) in self._weights

    def __call__(self, linear: nn.Module, weight: torch.Tensor | None) -> QuantizedLinear:
        name = self.targets[id(linear)].removesuffix(".base")
        return stored_layer(self.files, name, self.settings, linear.bias, self.device)

    @contextlib.contextmanager
    def dequantized_base(self, layer: nn.Module):
        """Within: the adapted ``layer``'s base holds its stored weight dequantized (fp32), for an
        init that reads the weight; one layer at a time."""
        base = layer.base
        if id(base) not in self.targets:
            yield
            return
        weight = self(base, None).dequantize()
        base.weight = nn.Parameter(weight, requires_grad=False)
        yield


def load_prequantized(auto, config, folder: Path, dtype: torch.dtype, settings: QuantSettings):
    """The model of a checkpoint stored quantized: every tensor read from its files but the
    quantized linears' weights, stand-ins (one zero expanded to their shape) that
    ``StoredQuantizer`` replaces."""
    from accelerate import init_empty_weights

    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    files = WeightFiles(sorted(folder.glob("*.safetensors")))
    layers = stored_layers(files, settings)
    if not layers:
        kind = "*.SCB" if settings.kind == "int8" else "*.weight.absmax"
        raise ModelError(f"{folder}: config.json says bitsandbytes {settings.kind} but its files hold no quantized "
                         f"weights ({kind} statistics); save the quantized model again, or drop quantization_config")
    for key in files.keys():
        layer, weight, _ = key.partition(".weight")  # {layer}.weight, .weight.absmax ..., .weight_format
        if (weight and layer in layers) or key.removesuffix(".SCB") in layers:
            continue  # codes and statistics: read by StoredQuantizer (the bias is read here)
        _assign(model, key, files.get(key), dtype)
    for name in layers:  # a stand-in of the weight's shape (no memory): adapters are made beside it
        module = model.get_submodule(name)
        shape = module.weight.shape
        module.weight = nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=False)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelError(f"{folder}: its files lack {left[0]} (and {len(left) - 1} more); save the model again")
    return model


def _assign(model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype) -> None:
    path, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return  # a tensor this architecture does not have (as from_pretrained ignores it)
    value = value.to(dtype) if value.is_floating_point() else value
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
