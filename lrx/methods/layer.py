"""The adapted linear layer: ``y = base(x) + edits(x) + scale * B(A(x))``.

``base`` is the frozen pretrained linear (W0, possibly already carrying folded edits).
``edits`` is the edit log (``lrx.methods.editlog``, the submodule ``edit_log``): frozen
low-rank changes of the base made by a method (PiSSA's residual, SRLoRA's fused pairs),
recorded as fp32 factors ``U @ V`` so that ``W0 + edits`` can be rebuilt from the original
model plus the log. Depending on ``fold_edits`` they are either added into ``base.weight`` in
place (exact enough for fp32 bases) or applied beside the adapter as a low-rank product (needed
for bf16 and quantized bases, where a small in-place add loses most of the update: one bf16 add
keeps 29 % of a 1e-3-relative update and 3 % of a 1e-4 one, ``tools/bench_fusion.py``). Where
the log lives (on the device, in pinned host memory with a bf16 copy on the device for a bf16
forward, or as rows split with the base under FSDP2) is the log's business: the layer asks it
for its factors and moves it once with ``place_log``. Pair k is column k of ``lora_B`` with row
k of ``lora_A``.
"""

from __future__ import annotations

import torch
from torch import nn

from lrx.methods.editlog import EditLog
from lrx.methods.seam import LocalShards, Shards

# How a layer in log mode computes its one low-rank product of adapter and log (the layer's
# ``log_product``, set when it is built): "function" (LowRankWithFrozenTail: weight gradients
# for the trained pairs only), "cat" (autograd through the concatenation), or "auto": "cat" on
# a GPU, "function" elsewhere. Measured per layer
# (tools/bench_log_product.py, 4096 tokens, r=16, log ranks 16 and 80): bf16 on an H200, "cat"
# took 0.78-0.99x the time of "function" on the four shapes of an 8B Llama (its rank-96
# weight-gradient products are better shaped than the rank-16 ones, and it runs no Python in
# backward), and 8B FSDP2 training with checkpointing ran at 7,568 against 7,070 tok/s per GPU;
# fp32 on a CPU, where the FLOPs decide, "function" took 0.78-0.91x the time of "cat".
LOG_PRODUCTS = ("auto", "cat", "function")


class LowRankWithFrozenTail(torch.autograd.Function):
    """``(x @ [A; V].t()) @ [B, U].t()`` where only A (r x in) and B (out x r) are trained and
    the tail V, U (the edit log) is frozen.

    One product reads x once, as the plain concatenation does, but the backward computes the
    weight gradients for the r trained pairs only: autograd through the concatenation computes
    them for all r + k and throws the log's k away (with the log at rank 5 r, over 80 % of
    that work). Inputs must share one dtype; cast them before the call.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, V: torch.Tensor, U: torch.Tensor):
        h = x @ torch.cat([A, V]).t()
        # The parts, not their concatenations: the log is saved by reference, not copied per layer.
        ctx.save_for_backward(x, h, A, B, V, U)
        return h @ torch.cat([B, U], dim=1).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, h, A, B, V, U = ctx.saved_tensors
        r = A.shape[0]
        grad_h = grad @ torch.cat([B, U], dim=1)
        grad_x = grad_h @ torch.cat([A, V]) if ctx.needs_input_grad[0] else None
        rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731 (tokens x features, any leading dims)
        grad_A = rows(grad_h[..., :r]).t() @ rows(x) if ctx.needs_input_grad[1] else None
        grad_B = rows(grad).t() @ rows(h[..., :r]) if ctx.needs_input_grad[2] else None
        return grad_x, grad_A, grad_B, None, None


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus an edit log and a trainable low-rank adapter.

    Args:
        base: the pretrained ``nn.Linear`` (kept as a submodule, frozen).
        r: adapter rank (number of pairs).
        scale: multiplier of the adapter product (LoRA's alpha / r).
        dropout: dropout on the adapter's input.
        fold_edits: add edits into ``base.weight`` in place (True) or apply them beside the
            adapter as an fp32 low-rank product (False).
        log_product: how an unfolded log and the adapter are multiplied (see ``LOG_PRODUCTS``).
    """

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float = 0.0, fold_edits: bool = True,
                 log_product: str = "auto"):
        super().__init__()
        if r < 1:
            raise ValueError(f"adapter rank must be >= 1, got {r}")
        if log_product not in LOG_PRODUCTS:
            raise ValueError(f"log_product must be one of {LOG_PRODUCTS}, got {log_product!r}")
        self.log_product = log_product
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.scale = float(scale)
        self.fold_edits = fold_edits
        self.merged = False
        # Where the base's pieces live (``lrx.methods.seam.Shards``), set by Method.attach once
        # the model is placed: edits then fold into this process's piece of the base only.
        self.shards: Shards = LocalShards()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out_features, in_features = base.out_features, base.in_features  # weight.shape is empty under zero.Init
        device = base.weight.device
        self._init_adapter(r, in_features, out_features, device)
        # The edit log (``lrx.methods.editlog``): on the device until ``place_log`` moves it.
        self.edit_log: EditLog = self._empty_log(out_features, in_features, device)

    def _init_adapter(self, r: int, in_features: int, out_features: int, device: torch.device) -> None:
        """Create the trainable tensors; subclasses that parametrise A and B differently override it."""
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))

    def _empty_log(self, out_features: int, in_features: int, device: torch.device) -> EditLog:
        return EditLog.empty(out_features, in_features, device)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of this layer by name (saved in adapter files)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def restore_buffers(self) -> None:
        """Refill buffers that carry data (not training state) after the layer was built on
        the meta device and materialised empty; AdaptedLinear has none."""

    @property
    def in_features(self) -> int:
        return self.base.in_features  # not weight.shape: ZeRO-3 empties partitioned weights

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``module.weight`` keeps working."""
        return self.base.weight

    @property
    def quantized(self) -> bool:
        """Whether the base is stored quantized (``lrx.quant.QuantizedLinear``)."""
        return getattr(self.base, "quantized", False)

    @property
    def _live(self) -> int:
        """Rank of the log the forward applies beside the base (0 when edits are folded): the
        columns after the ``baked`` ones a quantized base contains."""
        return 0 if self.fold_edits else self.edit_log.rank - self.edit_log.baked

    def extra_repr(self) -> str:
        baked = self.edit_log.baked
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, "
            f"edit_rank={self.edit_log.rank}, fold_edits={self.fold_edits}" + (f", baked={baked}" if baked else "")
        )

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        A, B = self.lora_A, self.lora_B  # computed once: subclasses may derive them
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        if self._live and isinstance(self.dropout, nn.Identity):
            return y + self._log_and_adapter(x, A, B).to(y.dtype)
        delta = (self.dropout(x) @ A.t()) @ B.t() * self.scale
        if self._live:  # an offloaded log's device copy is bf16: the product runs in x's dtype
            delta = delta + self.edit_log.product(x, self.edit_log.baked)
        return y + delta.to(y.dtype)

    def _log_and_adapter(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """Adapter and the live edit log as one low-rank product: x is read once (these thin
        matmuls are memory-bound, so two products cost nearly twice one)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else A.dtype
        with torch.autocast(x.device.type, enabled=False):
            x, A, B = x.to(dtype), A.to(dtype), (B * self.scale).to(dtype)
            U, V = (t.to(dtype) for t in self.edit_log.views(self.edit_log.baked))
            if self.log_product == "cat" or (self.log_product == "auto" and x.is_cuda):
                return (x @ torch.cat([A, V]).t()) @ torch.cat([B, U], dim=1).t()
            return LowRankWithFrozenTail.apply(x, A, B, V, U)

    # ---- edits --------------------------------------------------------------------------

    @torch.no_grad()
    def add_edit(self, U: torch.Tensor, V: torch.Tensor) -> None:
        """Record the frozen change ``U @ V`` (out x k, k x in) and apply it to the base.

        The change is exact in the log; with ``fold_edits`` it is also added into the base
        weight (in the base's dtype), otherwise forward applies it from the log. Where the log
        is row-sharded (FSDP2) only this process's rows of U are read: they may be zero
        elsewhere.
        """
        device = self.edit_log.device
        U, V = U.detach().to(device=device, dtype=torch.float32), V.detach().to(device=device, dtype=torch.float32)
        if U.shape[:-1] + V.shape[-1:] != self._shape() or U.shape[-1] != V.shape[-2]:
            raise ValueError(f"edit factors {tuple(U.shape)} @ {tuple(V.shape)} do not fit {self.extra_repr()}")
        self.edit_log.append(U, V, self.shards)
        if self.fold_edits:
            self._fold(U, V, sign=1.0)

    def _shape(self) -> tuple[int, ...]:
        """The shape of ``U @ V`` of one edit (out x in)."""
        return (self.out_features, self.in_features)

    @torch.no_grad()
    def place_log(self, storage: str, capacity: int | None = None, compute_dtype: torch.dtype | None = None,
                  world_size: int = 1) -> None:
        """Move the edit log to ``storage`` (``lrx.methods.editlog.log_storage``'s choice, one of
        its ``STORAGES``; see ``EditLog.placed``): split by rows before the layer is sharded, once
        its log is initialised or restored (fixed rank ``capacity``, over ``world_size``
        processes), or to host memory with a ``compute_dtype`` copy on the device, only for a
        forward that runs in ``compute_dtype`` (it then computes exactly what it did with the
        fp32 log; ``capacity``: the log's final rank if known, one host allocation)."""
        self.edit_log = self.edit_log.placed(storage, capacity, compute_dtype, world_size)

    @torch.no_grad()
    def set_edit_log(self, U: torch.Tensor, V: torch.Tensor, sizes: torch.Tensor, baked: int | None = None) -> None:
        """Replace an empty log with a saved one and replay it onto a pristine base (W0).

        Edits are folded one segment at a time in their original order so that a resumed
        fp32 base is bit-identical to the one that was trained. ``baked``: the log of a layer
        whose base was quantized after its first ``baked`` columns; only those are replayed
        now, the rest once ``quantize_base`` has quantized the base as training did.
        """
        if self.edit_log.rank:
            raise RuntimeError("set_edit_log needs a layer whose base is still W0 (empty edit log)")
        sizes = [int(k) for k in sizes.tolist()]
        if sum(sizes) != U.shape[-1]:
            raise ValueError(f"edit log sizes sum to {sum(sizes)} but the factors have rank {U.shape[-1]}")
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        if baked and baked not in ends:
            raise ValueError(f"edit log: {baked} baked columns do not end a recorded edit (sizes {sizes})")
        cut = len(sizes) if baked is None else ends.index(baked) + 1 if baked else 0
        edits = [(U[..., end - k : end], V[..., end - k : end, :]) for k, end in zip(sizes, ends)]
        for edit in edits[:cut]:
            self.add_edit(*edit)
        self.edit_log.pending = edits[cut:]

    @torch.no_grad()
    def quantize_base(self, quantize) -> None:
        """Replace the full-precision base by ``quantize(base, weight)``, a quantized copy of
        ``weight`` = the base plus the edits made so far (PiSSA's residual is quantized, not W0:
        QPiSSA's smaller quantization error). From now on edits stay in the exact log beside the
        base (it cannot take them losslessly) and the forward skips the ``baked`` columns the
        base already contains. A log restored with ``set_edit_log(..., baked=k)`` gets its
        later edits back here. A quantizer with ``bakes = False`` (a checkpoint stored
        quantized) ignores the weight: every edit stays in the log (``baked`` 0)."""
        if self.quantized:
            raise RuntimeError("quantize_base: the base is already quantized")
        bakes = getattr(quantize, "bakes", True)  # False: a base stored quantized, read as stored
        weight = self.base.weight.detach().float() if bakes else None
        if bakes and not self.fold_edits and self.edit_log.rank:
            U, V = self._edit_factors_here()
            weight = weight + self._product(U.to(weight.device), V.to(weight.device))
        self.base = quantize(self.base, weight)
        self.base.requires_grad_(False)
        self.edit_log.baked, self.fold_edits = self.edit_log.rank if bakes else 0, False
        pending, self.edit_log.pending = self.edit_log.pending, []
        for edit in pending:
            self.add_edit(*edit)

    def _product(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """``U @ V`` in the layout of ``base.weight`` (fused experts: stacked, maybe transposed)."""
        return U @ V

    def _fold(self, U: torch.Tensor, V: torch.Tensor, sign: float) -> None:
        if self.quantized:
            raise RuntimeError("a quantized base cannot take edits in place; they stay in the edit log")
        self.shards.add_product(self.base.weight, U, V, sign)  # this process's piece of the base only

    # ---- weights ------------------------------------------------------------------------

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact low-rank factors ``(B_eff, A_eff)`` of the total change from the pretrained
        weight W0: ``B_eff @ A_eff == edits + scale * B @ A`` (fp32, ``delta_weight``)."""
        U, V = self._edit_factors_here()
        B = torch.cat([U, self.lora_B.detach() * self.scale], dim=-1)
        A = torch.cat([V, self.lora_A.detach()], dim=-2)
        return B, A

    def _edit_factors_here(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact log's factors on the layer's device (where the log's compute copy is)."""
        return tuple(t.to(self.edit_log.device) for t in self.edit_log.factors())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter (and unfolded edits) into the base weight; forward is then plain."""
        if self.merged:
            return
        self._fold(*self._unfolded_factors(), sign=1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to the base dtype's rounding)."""
        if not self.merged:
            return
        self._fold(*self._unfolded_factors(), sign=-1.0)
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight ``merge`` makes, computed in fp32 (out x in): the base (dequantized when
        quantized) plus what ``merge`` adds, rounded to a lower-precision dtype once by the caller."""
        B, A = self._unfolded_factors()
        base = self.base.dequantize() if self.quantized else self.base.weight.detach().float()
        return base + B.to(base.device) @ A.to(base.device)

    def _unfolded_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``merge`` adds to the base: the adapter, and the part of the edit log the base
        does not contain (none when folded; after the ``baked`` columns of a quantized base)."""
        B, A = self.lora_B.detach() * self.scale, self.lora_A.detach()
        if not self._live:
            return B, A
        U, V = self._edit_factors_here()
        k = self.edit_log.baked
        return torch.cat([U[..., k:], B], dim=-1), torch.cat([V[..., k:, :], A], dim=-2)


def adapter_weight(layer: AdaptedLinear) -> torch.Tensor:
    """``scale * B @ A`` of an adapted layer in fp32 (out x in)."""
    return (layer.lora_B @ layer.lora_A).detach() * layer.scale


def delta_weight(layer: AdaptedLinear) -> torch.Tensor:
    """An adapted layer's total change from the pretrained weight W0: ``edits + scale * B @ A``
    in fp32 (out x in)."""
    U, V = layer._edit_factors_here()
    return U @ V + adapter_weight(layer)
