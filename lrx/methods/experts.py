"""Fused mixture-of-experts weights as adapted layers: one LoRA pair per expert.

transformers >= 5 stores the experts of Mixtral, Qwen3-MoE and gpt-oss as fused 3-D
parameters of their experts module (``gate_up_proj``, ``down_proj``): experts x out x in,
used as ``F.linear(x, W[e])`` (Mixtral, Qwen3-MoE), or experts x in x out, used as
``x @ W[e]`` (gpt-oss: the module's ``is_transposed``). The experts module's forward (its
loop over the experts hit, or transformers' grouped_mm / batched_mm implementations) reads
the whole parameter, so an ``AdaptedExperts`` takes the parameter's place as a submodule of
the same name and a forward pre-hook of the experts module hands that forward the effective
weight ``W + scale * B @ A`` (plus the live edit log), computed by one batched matmul over
the stacked pairs (A: experts x r x in, B: experts x out x r): a token routed to expert e
sees ``W_e x + scale * B_e A_e x``. This is what peft's ``target_parameters`` does too; it
materialises one weight-sized tensor per adapted parameter while its block runs (activation
checkpointing keeps that to one block), and on a bf16 base the effective weight is rounded
to bf16 once per forward (a linear's adapter is added after the base product instead).

The base parameter is kept as ``base.weight`` (``ExpertWeights``), so the layer's state key
``experts.gate_up_proj.base.weight`` maps back to the checkpoint's ``experts.gate_up_proj``
(``file_key``). The edit log is stacked like the adapter (U: experts x out x k, V:
experts x k x in) and kept on the layer's device, whole on every process (no host or
row-sharded log): PiSSA's init and SRLoRA's events (``lrx.methods.srlora.experts``) edit
experts (folded into an fp32 base, kept in the log beside a bf16 one). Under FSDP2 / ZeRO-3 a
fold adds only this process's piece of the edit to its piece of the base (``Shards.add_product``
with the stacked factors: FSDP2 splits the experts dim, so a piece is whole experts; a ZeRO-3
flat range may cut an expert), and the log takes the whole factors on every process.

With ``model.quantize`` the base becomes ``lrx.quant.QuantizedExperts``, stored quantized per
expert from the weight plus the init's edits (as ``AdaptedLinear.quantize_base``): it takes
``ExpertWeights``' place and calls (``forward(delta)``, ``stored``), dequantized while the
experts module runs, and later edits stay in the exact log beside it. Over several processes
(FSDP2, ZeRO-3) its codes are sharded like any parameter and dequantized where the backend
has gathered them (see ``lrx.quant``).
"""

from __future__ import annotations

import torch
from torch import nn

from lrx.methods.editlog import EditLog
from lrx.methods.layer import AdaptedLinear
from lrx.methods.seam import full_shape

# Experts modules whose weights are experts x in x out although transformers of that version
# sets no ``is_transposed`` (transformers < 5.2x: gpt-oss's layout is older than the flag).
TRANSPOSED = ("GptOssExperts",)


def is_experts_weight(module: nn.Module, param: torch.Tensor) -> bool:
    """Whether ``param`` (a parameter of ``module`` itself) is a fused experts weight: 3-D, one
    matrix per expert of a module that counts its experts (``num_experts``)."""
    shape = full_shape(param)
    return len(shape) == 3 and getattr(module, "num_experts", None) == shape[0] \
        and not isinstance(module, (nn.Linear, AdaptedLinear))


class ExpertWeights(nn.Module):
    """A fused experts parameter held as ``weight``, so an adapted layer's ``base`` reads like a
    linear's (``in_features``, ``out_features``, ``weight``).

    Args:
        weight: the parameter, experts x out x in, or experts x in x out when ``transposed``.
        transposed: the model multiplies ``x @ W[e]`` (gpt-oss).
    """

    bias = None

    def __init__(self, weight: nn.Parameter, transposed: bool):
        super().__init__()
        self.weight = weight
        self.transposed = transposed
        experts, rows, cols = full_shape(weight)
        self.num_experts = experts
        self.out_features, self.in_features = (cols, rows) if transposed else (rows, cols)

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        """``weight + delta`` (delta in the stored layout), summed in fp32 and rounded to the
        weight's dtype once: a bf16 sum of the rounded delta rounds twice, and an SRLoRA event,
        which changes the fp32 delta in its last bits only, then flips bf16 ulps of the weight
        (1.2e-3 relative change of a tiny Qwen3-MoE's logits; 0 with one rounding). Called, not
        read, and summed here: ZeRO-3 gathers a module's parameters while it runs and releases
        them when it returns."""
        return (delta.float() + self.weight).to(self.weight.dtype)

    def stored(self, W: torch.Tensor) -> torch.Tensor:
        """A logical (experts x out x in) tensor in the stored layout, and back (an involution)."""
        return W.transpose(-1, -2) if self.transposed else W


class AdaptedExperts(AdaptedLinear):
    """The fused experts weight of one parameter plus a stacked adapter: pair k of expert e is
    column k of ``lora_B[e]`` with row k of ``lora_A[e]``.

    Args:
        base: the experts weight (``ExpertWeights``).
        r, scale, fold_edits: as ``AdaptedLinear``'s (no dropout: there is no input to drop).
    """

    fused = True

    def __init__(self, base: ExpertWeights, r: int, scale: float, fold_edits: bool = True):
        super().__init__(base, r, scale, 0.0, fold_edits=fold_edits)

    def _empty_log(self, out_features: int, in_features: int, device: torch.device) -> EditLog:
        return EditLog.empty(out_features, in_features, device, lead=(self.base.num_experts,))

    def _init_adapter(self, r: int, in_features: int, out_features: int, device: torch.device) -> None:
        E = self.base.num_experts
        self.lora_A = nn.Parameter(torch.zeros(E, r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(E, out_features, r, device=device))

    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, " + super().extra_repr()

    def logical(self, W: torch.Tensor) -> torch.Tensor:
        """The base weight ``W`` as experts x out x in (a view)."""
        return self.base.stored(W)

    def forward(self) -> torch.Tensor:
        """The effective weight in the stored layout: ``W + scale * B @ A`` (+ the live log)."""
        B, A = self.lora_B * self.scale, self.lora_A
        if self.merged:
            return self.base(B.new_zeros(()))
        if self._live:
            U, V = self.edit_log.views(self.edit_log.baked)
            B, A = torch.cat([U, B], dim=-1), torch.cat([V, A], dim=-2)
        return self.base(self.base.stored(torch.bmm(B, A)))

    def _shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.out_features, self.in_features)

    def stored_factors(self, U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of ``stored(U @ V)`` (gpt-oss: ``V^T @ U^T`` per expert), so that a piece of
        the stored weight takes its part of an edit through ``Shards.add_product``."""
        if self.base.transposed:
            return V.transpose(-1, -2), U.transpose(-1, -2)
        return U, V

    def _fold(self, U: torch.Tensor, V: torch.Tensor, sign: float) -> None:
        if self.quantized:
            raise RuntimeError("quantized experts cannot take edits in place; they stay in the edit log")
        W = self.base.weight
        U, V = U.to(W.device), V.to(W.device)
        if self.shards.world_size > 1:  # this process's piece only: its experts (FSDP2) or flat range (ZeRO-3)
            self.shards.add_product(W, *self.stored_factors(U, V), sign)
            return
        W.add_(self.base.stored(torch.bmm(U, V)).to(W.dtype), alpha=sign)

    def place_log(self, storage: str, capacity: int | None = None, compute_dtype: torch.dtype | None = None,
                  world_size: int = 1) -> None:
        """The experts' log stays on the device, whole, a buffer on every process (see the module doc)."""

    def _product(self, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return self.base.stored(torch.bmm(U, V))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight ``merge`` makes, in fp32 and the stored layout (a quantized base dequantized)."""
        B, A = self._unfolded_factors()
        base = self.base.dequantize() if self.quantized else self.base.weight.detach().float()
        return base + self.base.stored(torch.bmm(B, A).to(base.device))


def _effective_weights(module: nn.Module, args) -> None:
    """Forward pre-hook of an experts module: its adapted parameters, as the forward reads them."""
    for name, child in module._modules.items():
        if isinstance(child, AdaptedExperts):
            module.__dict__[name] = child()  # shadows the submodule for attribute reads only


def _drop_effective_weights(module: nn.Module, args, output) -> None:
    for name, child in module._modules.items():
        if isinstance(child, AdaptedExperts):
            module.__dict__.pop(name, None)


def adapt_experts(experts: nn.Module, name: str, make) -> AdaptedExperts:
    """Replace the fused parameter ``experts.<name>`` by the adapted layer ``make(base)`` makes
    of its ``ExpertWeights`` (an ``AdaptedExperts``), under the same name.

    Returns:
        The adapted layer (registered in ``experts``; the hooks that feed its effective weight
        to the experts' forward are registered once per experts module).
    """
    param = experts._parameters.pop(name)
    transposed = bool(getattr(experts, "is_transposed", type(experts).__name__ in TRANSPOSED))
    layer = make(ExpertWeights(param, transposed))
    setattr(experts, name, layer)
    if not getattr(experts, "_lrx_adapted", False):
        experts.register_forward_pre_hook(_effective_weights)
        experts.register_forward_hook(_drop_effective_weights, always_call=True)
        experts._lrx_adapted = True
    return layer
