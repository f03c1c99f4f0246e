"""Quantized frozen bases: bitsandbytes nf4, fp4 and int8 weights that every backend can shard.

``model.quantize`` replaces every frozen linear layer of the base (output heads excepted) by a
``QuantizedLinear`` while the model is built, one layer at a time where its weight is whole
(the whole model on one process, one block while FSDP2 streams it, one gathered weight under
ZeRO-3), so no process holds a whole full-precision model after loading it.

Why not ``bnb.nn.Linear4bit``: its ``Params4bit`` keeps the quantization state as attributes
of the parameter object, which FSDP2 replaces by a DTensor (the state is lost: accelerate
#3983, axolotl #2992), and on CPUs with AVX512-BF16 its eval forward repacks the weight into
a layout ``dequantize_4bit`` no longer reads. Here the packed codes are a plain frozen integer
parameter (FSDP2 and ZeRO-3 shard it and all-gather it bit-exactly: neither casts integer
tensors to the compute dtype) and the quantization state (absmax, code books, nested
statistics) are buffers, which neither backend shards or casts: every process keeps what it
needs to dequantize. The arithmetic is bitsandbytes': ``quantize_4bit`` / ``dequantize_4bit``
(blocks of 64, the storage of ``load_in_4bit``) and ``int8_vectorwise_quant`` (one absmax per
row, the storage of ``load_in_8bit``). The forward dequantizes into the compute dtype and
multiplies; backward dequantizes again rather than keeping the weight (QLoRA's memory).
int8 is weight-only here: activations are not quantized (no LLM.int8 outlier matmul).

Fused MoE experts weights (``lrx.methods.experts``, experts x rows x cols) that are adapted
become a ``QuantizedExperts``: quantized per expert as the (experts * rows) x cols matrix, so a
4-bit block of 64 never spans two experts (rows x cols must be a multiple of the block size)
and each int8 row scale is one expert's row. The experts' own forward reads the whole weight of
a layer, so it is dequantized one layer's weight at a time while that experts module runs (as
the full-precision path makes its effective weight ``W + scale B A``), never the whole model.
Over several processes its codes are sharded like a ``QuantizedLinear``'s (FSDP2: rows of the
(experts * rows * cols / 2) x 1 codes, cut anywhere; ZeRO-3: a flat range) and dequantized only
where the backend has gathered them whole: FSDP2 unshards the block before the experts module
runs, and ZeRO-3 gathers a module's parameters while it is called (``forward(delta)``), so a
shard boundary never splits what one process dequantizes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from lrx.errors import ConfigError

log = logging.getLogger(__name__)

QUANT_TYPES = ("none", "nf4", "fp4", "int8")
BLOCKSIZE = 64  # bitsandbytes' and transformers' default for 4-bit


def bitsandbytes(device: torch.device | str | None = None):
    """The bitsandbytes module, or a one-line ConfigError naming the fix.

    Raises:
        ConfigError: bitsandbytes is missing, or has no backend for ``device``.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"model.quantize needs bitsandbytes >= 0.45 ({e}); pip install 'bitsandbytes>=0.45', "
                          "or set model.quantize=none") from None
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < (0, 45):
        raise ConfigError(f"model.quantize needs bitsandbytes >= 0.45 (its CPU and multi-backend support); "
                          f"{bnb.__version__} is installed: pip install -U 'bitsandbytes>=0.45'")
    if device is not None and torch.device(device).type not in ("cpu", "cuda", "xpu"):
        raise ConfigError(f"bitsandbytes has no backend for {device}; train on cpu or cuda, or set model.quantize=none")
    return bnb


@dataclass(frozen=True)
class QuantSettings:
    """How the base is quantized: ``kind`` (nf4, fp4, int8), nested 4-bit statistics
    (``double_quant``, QLoRA's double quantization) and the 4-bit block size."""

    kind: str
    double_quant: bool = True
    blocksize: int = BLOCKSIZE
    stored: bool = False
    """The checkpoint is stored quantized (``lrx.prequant``): its codes are read, not made."""
    experts: bool = True
    """Adapted fused experts weights are stored quantized (``QuantizedExperts``); False: they
    trained in ``model.dtype`` (runs over several processes did so before experts were quantized
    there), recorded so that a load or export rebuilds the model as that run held it. Adapter
    files always record it; one without the key was saved before experts were quantized, so its
    experts read as False."""

    @classmethod
    def for_processes(cls, kind: str, double_quant: bool = True, world_size: int = 1,
                      stored: bool = False) -> QuantSettings:
        """The settings a run over ``world_size`` processes stores its base with: fused experts
        are quantized on any number of processes (``experts``; FSDP2 and ZeRO-3 shard their codes
        like a ``QuantizedLinear``'s and dequantize them gathered), so ``world_size`` changes nothing."""
        return cls(kind, double_quant, stored=stored, experts=True)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "double_quant": self.double_quant, "blocksize": self.blocksize}
        out = {**out, "stored": True} if self.stored else out
        return {**out, "experts": self.experts}

    @classmethod
    def from_dict(cls, values: dict) -> QuantSettings:
        return cls(str(values["kind"]), bool(values.get("double_quant", True)), int(values.get("blocksize", BLOCKSIZE)),
                   bool(values.get("stored", False)), bool(values.get("experts", False)))

    def code_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of one quantized weight's codes (a parameter: sharded)."""
        n = out_features * in_features
        return n if self.kind == "int8" else math.ceil(n / 2)

    def stat_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of one quantized weight's statistics (buffers: whole on every process)."""
        if self.kind == "int8":
            return 4 * out_features
        blocks = math.ceil(out_features * in_features / self.blocksize)
        return blocks + 4 * math.ceil(blocks / 256) if self.double_quant else 4 * blocks


class _Dequantized(torch.autograd.Function):
    """``x @ W.t() + bias`` with W dequantized in forward and again in backward (never kept)."""

    @staticmethod
    def forward(ctx, x, module, dtype, *tensors):
        ctx.module, ctx.dtype = module, dtype
        ctx.save_for_backward(*tensors)
        return module.linear(x, module.dequantize(dtype, tensors), dtype)

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors  # unpacked once (activation checkpointing allows no more)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.dtype) @ ctx.module.dequantize(ctx.dtype, tensors)
        return (grad_x, None, None, *([None] * len(tensors)))


def _four_bit_plan(state: dict[str, torch.Tensor]) -> tuple[tuple, torch.Tensor | None]:
    """What ``dequantize`` needs of a 4-bit state besides its tensors, read once from its packed
    entry: (quant type, block size, shape, nested block size or 0, the dtype it was quantized from)
    and the nested offset."""
    import bitsandbytes.functional as bf

    qs = bf.QuantState.from_dict({k: v.cpu() for k, v in state.items()}, device="cpu")
    nested = qs.state2.blocksize if qs.nested else 0
    offset = qs.offset.float().reshape(()) if qs.nested else None
    return (qs.quant_type, qs.blocksize, tuple(qs.shape), nested, qs.dtype), offset


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored quantized (see the module doc); ``forward`` computes in the
    autocast dtype when autocast is on, else in the input's dtype.

    Made with ``QuantizedLinear.of(weight, settings, bias)``; ``dequantize()`` gives the fp32
    weight it computes with.
    """

    quantized = True

    def __init__(self, in_features: int, out_features: int, settings: QuantSettings, codes: torch.Tensor,
                 state: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.settings = in_features, out_features, settings
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._state_keys = list(state)
        self.keeps_weight = False  # set where activation checkpointing drops what forward saves
        for key, value in state.items():
            self.register_buffer(_buffer_name(key), value)
        self._read_keys = ["SCB"]  # what dequantize reads (guards of a compiled block see only these)
        if settings.kind != "int8":
            self._plan, offset = _four_bit_plan(state)
            self._read_keys = ["absmax", "nested_absmax", "nested_quant_map"] if self._plan[3] else ["absmax"]
            # Not in the state dict: derived from the packed entry, moved with the module.
            self.register_buffer("quant_offset", offset, persistent=False)

    @classmethod
    @torch.no_grad()
    def of(cls, weight: torch.Tensor, settings: QuantSettings, bias: torch.Tensor | None = None,
           device: torch.device | None = None) -> QuantizedLinear:
        """Quantize ``weight`` (a full-precision matrix, out x in) on ``device`` (default: the
        weight's) into a layer computing ``x @ W.t() + bias``."""
        bnb = bitsandbytes(device or weight.device)
        w = weight.detach().to(device or weight.device).float().contiguous()
        if settings.kind == "int8":
            # As Int8Params quantizes for load_in_8bit: row-wise absmax of the fp16 weight.
            codes, scale, _ = bnb.functional.int8_vectorwise_quant(w.half())
            state = {"SCB": scale.float()}
        elif settings.kind in ("nf4", "fp4"):
            codes, qs = bnb.functional.quantize_4bit(w, blocksize=settings.blocksize, quant_type=settings.kind,
                                                     compress_statistics=settings.double_quant,
                                                     quant_storage=torch.uint8)
            state = dict(qs.as_dict(packed=True))
        else:
            raise ConfigError(f"model.quantize={settings.kind!r} is not a quantization; use one of {', '.join(QUANT_TYPES)}")
        bias = None if bias is None else bias.detach().to(w.device)
        return cls(w.shape[1], w.shape[0], settings, codes, state, bias)

    def state_tensors(self) -> tuple[torch.Tensor, ...]:
        """The codes and the statistics ``dequantize`` reads, in a fixed order (not the packed
        description of a 4-bit state, whose length differs between layers)."""
        return (self.weight, *(getattr(self, _buffer_name(k)) for k in self._read_keys))

    def dequantize(self, dtype: torch.dtype = torch.float32, tensors: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The weight (out x in) in ``dtype``, as the forward computes with it: bitsandbytes'
        dequantize ops written straight into ``dtype`` (no fp32 copy), with no Python state
        built per call, so a compiled block traces them once for every layer of its shape."""
        codes, *state = tensors if tensors is not None else self.state_tensors()
        if self.settings.kind == "int8":
            (scale,) = state
            return (codes.float() * (scale.float() / 127.0)[:, None]).to(dtype)
        stats = dict(zip(self._read_keys, state))
        kind, blocksize, shape, nested, source = self._plan
        absmax = stats["absmax"]
        if nested:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, stats["nested_absmax"], stats["nested_quant_map"], nested, torch.float32) + self.quant_offset
        # Straight into dtype where that rounds as bitsandbytes would (it writes the source dtype).
        out = dtype if source in (torch.float32, dtype) else source
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, blocksize, kind, shape, out)
        return weight if out == dtype else weight.to(dtype)

    def weight_count(self) -> int:
        """Values of the weight it stores (not the bytes of its packed codes)."""
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            if self.keeps_weight and self.training and torch.is_grad_enabled():
                # Checkpointing frees what this forward saves and its recompute makes the weight
                # again for the backward: two dequantizes a step instead of three.
                return self.linear(x, self.dequantize(dtype), dtype)
            return _Dequantized.apply(x, self, dtype, *self.state_tensors())

    def linear(self, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x @ weight.t() + bias``, all in ``dtype`` (``weight``: the dequantized one)."""
        bias = self.bias.to(dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x.to(dtype), weight, bias)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.settings.double_quant and self.settings.kind != "int8" else ""
        return f"in={self.in_features}, out={self.out_features}, {self.settings.kind}{dq}"


class QuantizedExperts(QuantizedLinear):
    """A fused experts weight stored quantized per expert (see the module doc), in the place of
    ``lrx.methods.experts.ExpertWeights``: ``forward(delta)`` is the dequantized weight plus
    ``delta`` in the stored layout, summed in fp32 and rounded to the dtype the weight had once;
    ``dequantize()`` gives that weight in fp32 (experts x rows x cols). Made with ``of_experts``."""

    @classmethod
    @torch.no_grad()
    def of_experts(cls, weight: torch.Tensor, settings: QuantSettings, transposed: bool, dtype: torch.dtype,
                   device: torch.device | None = None) -> QuantizedExperts:
        """Quantize ``weight`` (experts x rows x cols, full precision, the stored layout; ``transposed``:
        experts x in x out) that the model computes with in ``dtype``.

        Raises:
            ConfigError: a 4-bit block would span two experts (rows x cols not a multiple of it).
        """
        experts, rows, cols = weight.shape
        if settings.kind != "int8" and rows * cols % settings.blocksize:
            raise ConfigError(f"experts of {rows}x{cols} are not a multiple of the {settings.kind} block size "
                              f"{settings.blocksize}, so they cannot be quantized per expert; set model.quantize=int8")
        layer = cls.of(weight.reshape(experts * rows, cols), settings, None, device)
        layer.num_experts, layer.transposed, layer.dtype, layer.rows = experts, transposed, dtype, rows
        layer.out_features, layer.in_features = (cols, rows) if transposed else (rows, cols)
        return layer

    def stored(self, W: torch.Tensor) -> torch.Tensor:
        """A logical (experts x out x in) tensor in the stored layout, and back (as ``ExpertWeights.stored``)."""
        return W.transpose(-1, -2) if self.transposed else W

    def dequantize(self, dtype: torch.dtype = torch.float32, tensors: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The weight (experts x rows x cols, the stored layout) in ``dtype``."""
        return super().dequantize(dtype, tensors).view(self.num_experts, self.rows, -1)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        return (delta.float() + self.dequantize()).to(self.dtype)

    def weight_count(self) -> int:
        return self.num_experts * self.out_features * self.in_features

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + super().extra_repr()


def _buffer_name(key: str) -> str:
    return "q_" + key.replace(".", "_")


def quantized_linears(model: nn.Module, skip: list[str], experts: bool = True) -> dict[int, str]:
    """The linear layers ``model.quantize`` stores quantized, by ``id``: every ``nn.Linear``
    (adapted layers' bases included) except the output heads and the modules in ``skip``
    (trained in full: ``modules_to_save``), as QLoRA quantizes, and the adapted fused experts
    weights (``ExpertWeights``, quantized per expert; unless ``experts`` is False, and experts left
    out of ``target_modules``: those stay in ``model.dtype``)."""
    from lrx.methods.base import OUTPUT_HEADS

    def kept(name: str) -> bool:
        name = name.removesuffix(".base")
        return any(name == h or name.endswith("." + h) for h in OUTPUT_HEADS) or any(
            name == m or name.startswith(m + ".") for m in skip)

    kinds = _quantizable() if experts else (nn.Linear,)
    return {id(m): n for n, m in model.named_modules() if type(m) in kinds and not kept(n)}


def _quantizable() -> tuple[type, ...]:
    from lrx.methods.experts import ExpertWeights

    return (nn.Linear, ExpertWeights)


class Quantizer:
    """Quantizes the linears of one model as a backend makes their weights whole.

    Args:
        settings: the quantization.
        device: where quantized layers are made (the training device: quantizing an 8B model
            on a CPU takes minutes).
    """

    def __init__(self, settings: QuantSettings, device: torch.device | None = None):
        self.settings, self.device = settings, device
        self.targets: dict[int, str] = {}

    bakes = True
    """Whether the adapted layers' init edits are quantized into their base (False: they stay in the log)."""

    def dequantized_base(self, layer: nn.Module):
        """A context in which ``layer``'s base weight is full precision (already so here)."""
        return contextlib.nullcontext()

    def plan(self, model: nn.Module, skip: list[str]) -> None:
        """Choose the layers to quantize (``quantized_linears``) of the wrapped model; one warning
        names the fused experts weights left in ``model.dtype`` (not adapted, or all of them when
        ``settings.experts`` is False: an adapter that trained them so)."""
        from lrx.methods.experts import ExpertWeights, is_experts_weight

        self.targets = quantized_linears(model, skip, self.settings.experts)
        if not self.settings.experts:
            adapted = [n for n, m in model.named_modules() if isinstance(m, ExpertWeights)]
            if adapted:
                log.warning("model.quantize=%s: the %d adapted fused experts weights (%s...) stay in the model's dtype, "
                            "as the adapter records (quantize.experts false: they trained unquantized); the other "
                            "linears are quantized", self.settings.kind, len(adapted), adapted[0])
        kept = [f"{n}.{p}" for n, m in model.named_modules() if not isinstance(m, ExpertWeights)
                for p, w in m.named_parameters(recurse=False) if is_experts_weight(m, w)]
        if kept:
            log.warning("model.quantize=%s: %d fused experts weights that are not adapted (%s...) stay in the model's "
                        "dtype; add the experts to method.target_modules to store them quantized",
                        self.settings.kind, len(kept), kept[0])

    def replaces(self, param: torch.Tensor) -> bool:
        """Whether ``param`` (of the planned model) is never read from the base's files: a weight
        whose stored quantized codes the quantizer reads instead (``lrx.prequant``). None here."""
        return False

    def __call__(self, linear: nn.Module, weight: torch.Tensor) -> QuantizedLinear:
        device = self.device if self.device is not None and weight.device.type != "meta" else weight.device
        if getattr(linear, "num_experts", None):  # a fused experts weight (``ExpertWeights``)
            return QuantizedExperts.of_experts(weight, self.settings, linear.transposed, linear.weight.dtype, device)
        return QuantizedLinear.of(weight, self.settings, linear.bias, device)

    def apply(self, root: nn.Module, gathered=lambda module: contextlib.nullcontext()) -> int:
        """Quantize the planned layers under ``root`` not quantized yet: an adapted layer through
        its ``quantize_base`` (its base plus the edits of its init), a plain linear replaced.
        ``gathered(module)``: a context in which the module's weight is whole (ZeRO-3).

        Returns:
            The number of layers quantized.
        """
        done = 0
        for parent in list(root.modules()):
            for child, module in list(parent.named_children()):
                if id(module) not in self.targets or type(module) not in _quantizable():
                    continue
                adapted = hasattr(parent, "quantize_base")  # the base of an adapted layer
                with gathered(parent if adapted else module):
                    if adapted:
                        parent.quantize_base(self)
                    else:
                        setattr(parent, child, self(module, module.weight))
                done += 1
        return done
