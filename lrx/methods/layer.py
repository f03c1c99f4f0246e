"""The adapted linear layer: ``y = base(x) + edits(x) + scale * B(A(x))``.

``base`` is the frozen pretrained linear (W0, possibly already carrying folded edits).
``edits`` is the edit log: frozen low-rank changes of the base made by a method (PiSSA's
residual, SRLoRA's fused pairs), recorded as fp32 factors ``edit_U @ edit_V`` so that
``W0 + edits`` can be rebuilt from the original model plus the log. Depending on
``fold_edits`` they are either added into ``base.weight`` in place (exact enough for fp32
bases) or applied beside the adapter as a low-rank product (needed for bf16 and quantized
bases, where a small in-place add loses most of the update: one bf16 add keeps 29 % of a
1e-3-relative update and 3 % of a 1e-4 one, ``tools/bench_fusion.py``). When the forward
runs in bf16 on a GPU, ``offload_edit_log`` keeps the exact fp32 log in host memory and only
its bf16 copy on the device: training is bit-identical (the fp32 log was cast to bf16 for
every product anyway) and the log takes half the GPU memory. Under FSDP2 over several
processes ``hold_log_rows`` makes it a ``RowLog`` instead: frozen fp32 parameters of fixed
rank that FSDP2 splits by rows with the base, so each process holds its share. Pair k is
column k of ``lora_B`` with row k of ``lora_A``.
"""

from __future__ import annotations

import torch
from torch import nn

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


class HostLog:
    """An exact fp32 edit log in host memory (pinned when there is a GPU, so copies from it
    are asynchronous). Rows are rank-1 edits: ``Ut`` (capacity x out) holds U transposed so
    that appending k edits writes k whole rows; the capacity doubles when it runs out.
    """

    def __init__(self, out_features: int, in_features: int, capacity: int = 0):
        pin = torch.cuda.is_available()
        self.Ut = torch.empty(capacity, out_features, pin_memory=pin)
        self.V = torch.empty(capacity, in_features, pin_memory=pin)
        self.rank = 0

    def append(self, U: torch.Tensor, V: torch.Tensor) -> None:
        """Add the edits ``U @ V`` (fp32, out x k and k x in, on any device)."""
        k = V.shape[0]
        if self.rank + k > self.V.shape[0]:
            grown = HostLog(self.Ut.shape[1], self.V.shape[1], max(2 * self.V.shape[0], self.rank + k))
            grown.append(*self.factors())
            self.Ut, self.V = grown.Ut, grown.V
        self.Ut[self.rank : self.rank + k].copy_(U.t(), non_blocking=True)
        self.V[self.rank : self.rank + k].copy_(V, non_blocking=True)
        self.rank += k

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)``: out x rank and rank x in views, once pending copies have landed."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.Ut[: self.rank].t(), self.V[: self.rank]


class RowLog:
    """An exact fp32 edit log of fixed capacity held as two frozen parameters of its layer, so
    that a backend that shards every parameter by rows (FSDP2) splits it with the base: each
    process keeps its rows of ``edit_U`` (out x capacity: the base's rows) and of ``edit_Vt``
    (V transposed, in x capacity), the forward sees both all-gathered with the block's other
    parameters (in the compute dtype under mixed precision, the dtype its product runs in
    anyway) and uses their first ``rank`` columns. A sharded parameter cannot change shape,
    hence the capacity: the method's ``edit_rank_bound``, known before sharding.

    Edits are written into this process's rows only (``Shards.write_columns``), so the factors
    an event hands over may be zero outside them; saving gathers the log whole
    (``AdaptedLinear.edit_factors`` with a backend's ``gather``).
    """

    def __init__(self, capacity: int, rank: int):
        self.capacity, self.rank = capacity, rank

    @staticmethod
    @torch.no_grad()
    def hold(layer: AdaptedLinear, capacity: int) -> RowLog:
        """Move ``layer``'s whole log (buffers ``edit_U``, ``edit_V``) into capacity-sized frozen
        parameters, before the layer is sharded."""
        U, V = layer.edit_U, layer.edit_V
        k = U.shape[1]
        if k > capacity:
            raise ValueError(f"an edit log of rank {k} does not fit a capacity of {capacity}")
        Ut = U.new_zeros(layer.out_features, capacity)
        Vt = V.new_zeros(layer.in_features, capacity)
        Ut[:, :k], Vt[:, :k] = U, V.t()
        del layer._buffers["edit_U"], layer._buffers["edit_V"]
        layer.edit_U = nn.Parameter(Ut, requires_grad=False)
        layer.edit_Vt = nn.Parameter(Vt, requires_grad=False)
        return RowLog(capacity, k)

    def append(self, layer: AdaptedLinear, U: torch.Tensor, V: torch.Tensor) -> None:
        """Write the edits ``U @ V`` (fp32; U: out x k, only this process's rows read) into the
        next ``k`` columns of this process's rows."""
        k = V.shape[0]
        if self.rank + k > self.capacity:
            raise RuntimeError(f"the row-sharded edit log holds rank {self.capacity} (the method's edit_rank_bound); "
                               f"an edit of rank {k} at rank {self.rank} does not fit")
        layer.shards.write_columns(layer.edit_U, self.rank, U)
        layer.shards.write_columns(layer.edit_Vt, self.rank, V.t())
        self.rank += k

    def views(self, layer: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)``, out x rank and rank x in, of the parameters as they are now (whole inside a
        sharded forward)."""
        return layer.edit_U[:, : self.rank], layer.edit_Vt[:, : self.rank].t()

    def gathered(self, layer: AdaptedLinear, gather) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole fp32 ``(U, V)`` through ``gather`` (a backend's: whole copies of sharded
        parameters, collective)."""
        whole = gather({"U": layer.edit_U, "Vt": layer.edit_Vt})
        return whole["U"][:, : self.rank], whole["Vt"][:, : self.rank].t()


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
        # Log columns the base itself contains although edits are not folded: a quantized base
        # was quantized from W0 plus the edits made until then (``quantize_base``, QPiSSA).
        self.baked = 0
        self._pending: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out_features, in_features = base.out_features, base.in_features  # weight.shape is empty under zero.Init
        device = base.weight.device
        self._init_adapter(r, in_features, out_features, device)
        # The edit log. Not persistent: lrx's adapter files store it explicitly because its
        # rank changes during training, which module.load_state_dict cannot handle.
        self.register_buffer("edit_U", torch.zeros(out_features, 0, device=device), persistent=False)
        self.register_buffer("edit_V", torch.zeros(0, in_features, device=device), persistent=False)
        self.edit_sizes: list[int] = []  # the rank of each recorded edit, in order
        # Set by offload_edit_log: the exact log then lives here, edit_U/edit_V are its
        # compute-dtype copies.
        self.host_log: HostLog | None = None
        # Set by hold_log_rows (FSDP2): the log is then a pair of frozen parameters split by rows.
        self.row_log: RowLog | None = None

    def _init_adapter(self, r: int, in_features: int, out_features: int, device: torch.device) -> None:
        """Create the trainable tensors; subclasses that parametrise A and B differently override it."""
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))

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
    def edit_rank(self) -> int:
        return self.row_log.rank if self.row_log is not None else self.edit_U.shape[-1]

    @property
    def quantized(self) -> bool:
        """Whether the base is stored quantized (``lrx.quant.QuantizedLinear``)."""
        return getattr(self.base, "quantized", False)

    @property
    def live_rank(self) -> int:
        """Rank of the log the forward applies beside the base (0 when edits are folded)."""
        return 0 if self.fold_edits else self.edit_rank - self.baked

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, "
            f"edit_rank={self.edit_rank}, fold_edits={self.fold_edits}" + (f", baked={self.baked}" if self.baked else "")
        )

    # ---- forward ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        A, B = self.lora_A, self.lora_B  # computed once: subclasses may derive them
        if x.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        if self.live_rank:
            k = self.baked  # the log's first k columns are inside a quantized base
            if isinstance(self.dropout, nn.Identity):
                # Adapter and edit log as one low-rank product: x is read once (these thin
                # matmuls are memory-bound, so two products cost nearly twice one).
                dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
                    else A.dtype
                with torch.autocast(x.device.type, enabled=False):
                    x, A, B = x.to(dtype), A.to(dtype), (B * self.scale).to(dtype)
                    U, V = (t.to(dtype) for t in self._log_views(k))
                    if self.log_product == "cat" or (self.log_product == "auto" and x.is_cuda):
                        delta = (x @ torch.cat([A, V]).t()) @ torch.cat([B, U], dim=1).t()
                    else:
                        delta = LowRankWithFrozenTail.apply(x, A, B, V, U)
                return y + delta.to(y.dtype)
            U, V = (t.to(x.dtype) for t in self._log_views(k))  # an offloaded log's copy is bf16
            delta = (self.dropout(x) @ A.t()) @ B.t() * self.scale + (x @ V.t()) @ U.t()
        else:
            delta = (self.dropout(x) @ A.t()) @ B.t() * self.scale
        return y + delta.to(y.dtype)

    # ---- edits --------------------------------------------------------------------------

    @torch.no_grad()
    def add_edit(self, U: torch.Tensor, V: torch.Tensor) -> None:
        """Record the frozen change ``U @ V`` (out x k, k x in) and apply it to the base.

        The change is exact in the log; with ``fold_edits`` it is also added into the base
        weight (in the base's dtype), otherwise forward applies it from the log. Where the log
        is row-sharded (``hold_log_rows``) only this process's rows of U are read: they may be
        zero elsewhere.
        """
        U = U.detach().to(device=self.edit_U.device, dtype=torch.float32)
        V = V.detach().to(device=self.edit_U.device, dtype=torch.float32)
        if U.shape != (self.out_features, V.shape[0]) or V.shape[1] != self.in_features:
            raise ValueError(f"edit factors {tuple(U.shape)} @ {tuple(V.shape)} do not fit {self.extra_repr()}")
        if self.row_log is not None:
            self.row_log.append(self, U, V)
        else:
            if self.host_log is not None:
                self.host_log.append(U, V)
            self.edit_U = torch.cat([self.edit_U, U.to(self.edit_U.dtype)], dim=1)
            self.edit_V = torch.cat([self.edit_V, V.to(self.edit_V.dtype)], dim=0)
        self.edit_sizes.append(U.shape[1])
        if self.fold_edits:
            self._fold(U, V, sign=1.0)

    @torch.no_grad()
    def offload_edit_log(self, compute_dtype: torch.dtype, capacity: int | None = None) -> None:
        """Keep the exact fp32 log in host memory and only a ``compute_dtype`` copy on the device.

        Only for a forward that runs in ``compute_dtype`` (bf16 autocast or bf16 parameters):
        it then computes exactly what it did with the fp32 log, which it cast anyway. A layer
        that folds its edits keeps none beside the base and is left as it is.

        Args:
            compute_dtype: the dtype of the forward's products (torch.bfloat16).
            capacity: the log's final rank if known (one host allocation); else it holds the
                current log and doubles when an edit does not fit.
        """
        if self.fold_edits or self.host_log is not None or self.row_log is not None:
            return  # a row-sharded log keeps its fp32 rows on the device: a share of what this saves
        U, V = self.edit_U, self.edit_V
        self.host_log = HostLog(self.out_features, self.in_features, max(capacity or 0, U.shape[1]))
        self.host_log.append(U, V)
        self.edit_U, self.edit_V = U.to(compute_dtype), V.to(compute_dtype)

    @torch.no_grad()
    def hold_log_rows(self, capacity: int) -> None:
        """Hold the edit log as frozen fp32 parameters of rank ``capacity`` that a backend which
        shards every parameter by rows splits with the base (``RowLog``); call it before the
        layer is sharded, once its log is initialised or restored."""
        if self.row_log is not None:
            return
        if self.host_log is not None:
            raise RuntimeError("an offloaded edit log cannot be row-sharded; hold its rows before attach")
        self.row_log = RowLog.hold(self, capacity)

    def edit_log_storage(self) -> list[torch.Tensor]:
        """The tensors on the layer's device that hold its edit log (buffers, or a row-sharded
        log's parameters)."""
        if self.row_log is not None:
            return [self.edit_U, self.edit_Vt]
        return [self.edit_U, self.edit_V]

    def _log_views(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` from column ``start`` on, as the forward multiplies them (an offloaded log's
        compute-dtype copy)."""
        U, V = self.row_log.views(self) if self.row_log is not None else (self.edit_U, self.edit_V)
        return U[..., start:], V[..., start:, :]

    def edit_factors(self, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact fp32 edit log ``(U, V)``, out x k and k x in: on the layer's device, in
        host memory when it is offloaded, or, row-sharded, made whole by ``gather`` (a
        backend's ``gather``: a collective, every process calls it; needed with several
        processes)."""
        if self.row_log is not None:
            if gather is None:
                if self.shards.world_size > 1:
                    raise RuntimeError("this edit log is sharded by rows; gather it (edit_factors(backend.gather), "
                                       "a collective)")
                return self.row_log.views(self)
            return self.row_log.gathered(self, gather)
        if self.host_log is not None:
            return self.host_log.factors()
        return self.edit_U, self.edit_V

    @torch.no_grad()
    def set_edit_log(self, U: torch.Tensor, V: torch.Tensor, sizes: torch.Tensor, baked: int | None = None) -> None:
        """Replace an empty log with a saved one and replay it onto a pristine base (W0).

        Edits are folded one segment at a time in their original order so that a resumed
        fp32 base is bit-identical to the one that was trained. ``baked``: the log of a layer
        whose base was quantized after its first ``baked`` columns; only those are replayed
        now, the rest once ``quantize_base`` has quantized the base as training did.
        """
        if self.edit_rank:
            raise RuntimeError("set_edit_log needs a layer whose base is still W0 (empty edit log)")
        sizes = [int(k) for k in sizes.tolist()]
        if sum(sizes) != U.shape[-1]:
            raise ValueError(f"edit log sizes sum to {sum(sizes)} but the factors have rank {U.shape[-1]}")
        cut = len(sizes)
        if baked is not None:
            ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
            if baked and baked not in ends:
                raise ValueError(f"edit log: {baked} baked columns do not end a recorded edit (sizes {sizes})")
            cut = ends.index(baked) + 1 if baked else 0
        start = self._replay(U, V, sizes[:cut])
        if cut < len(sizes):
            self._pending = (U[..., start:], V[..., start:, :], sizes[cut:])

    def _replay(self, U: torch.Tensor, V: torch.Tensor, sizes: list[int]) -> int:
        """``add_edit`` each recorded edit of ``U @ V`` in order; returns the columns replayed."""
        start = 0
        for k in sizes:
            self.add_edit(U[..., start : start + k], V[..., start : start + k, :])
            start += k
        return start

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
        if bakes and not self.fold_edits and self.edit_rank:
            U, V = self._edit_factors_here()
            weight = weight + U.to(weight.device) @ V.to(weight.device)
        self.base = quantize(self.base, weight)
        self.base.requires_grad_(False)
        self.baked, self.fold_edits = self.edit_rank if bakes else 0, False
        if self._pending is not None:
            (U, V, sizes), self._pending = self._pending, None
            self._replay(U, V, sizes)

    def _fold(self, U: torch.Tensor, V: torch.Tensor, sign: float) -> None:
        if self.quantized:
            raise RuntimeError("a quantized base cannot take edits in place; they stay in the edit log")
        self.shards.add_product(self.base.weight, U, V, sign)  # this process's piece of the base only

    # ---- weights ------------------------------------------------------------------------

    def adapter_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in fp32 (out x in)."""
        return (self.lora_B @ self.lora_A).detach() * self.scale

    def edits_weight(self) -> torch.Tensor:
        """The edit log's total change ``U @ V`` in fp32 (out x in), on the adapter's device."""
        U, V = self._edit_factors_here()
        return U @ V

    def delta_weight(self) -> torch.Tensor:
        """Total change from the pretrained weight W0: ``edits + scale * B @ A`` (fp32)."""
        return self.edits_weight() + self.adapter_weight()

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact low-rank factors ``(B_eff, A_eff)`` with ``B_eff @ A_eff == delta_weight()``."""
        U, V = self._edit_factors_here()
        B = torch.cat([U, self.lora_B.detach() * self.scale], dim=-1)
        A = torch.cat([V, self.lora_A.detach()], dim=-2)
        return B, A

    def _edit_factors_here(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``edit_factors`` on the layer's device (where the log's compute copy is)."""
        return tuple(t.to(self.edit_U.device) for t in self.edit_factors())

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
        if not self.live_rank:
            return B, A
        U, V = self._edit_factors_here()
        return torch.cat([U[..., self.baked :], B], dim=-1), torch.cat([V[..., self.baked :, :], A], dim=-2)
