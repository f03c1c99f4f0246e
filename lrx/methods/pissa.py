"""PiSSA (Meng et al., 2024, arXiv 2404.02948): adapters start on the principal subspace.

With ``W0 = U S V^T`` (top r triplets) and scale s = alpha / r:
``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, and the base becomes the residual
``W0 - s B A`` (recorded as an edit), so the model's output is unchanged at init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lrx.methods import register_method
from lrx.methods.base import EditingConfig, Method, WeightAccess
from lrx.methods.experts import AdaptedExperts
from lrx.methods.layer import AdaptedLinear
from lrx.spectral import top_singular


@dataclass(kw_only=True)
class PiSSAConfig(EditingConfig):
    """PiSSA's options are those of every method that edits its base (``EditingConfig``)."""


def principal_init(layer: AdaptedLinear, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
    """Load triplets into the adapter PiSSA-style and subtract them from the base (an edit).

    Args:
        layer: the adapted layer; its r pairs are overwritten.
        U, S, V: r singular triplets (out x r, r, in x r; with a leading experts dim for
            ``AdaptedExperts``, one set per expert).
    """
    root = torch.sqrt(S / layer.scale).unsqueeze(-2)  # (1 x r), or experts x 1 x r
    B = U * root
    A = (V * root).transpose(-1, -2)
    with torch.no_grad():
        layer.lora_B.copy_(B)
        layer.lora_A.copy_(A)
    layer.add_edit(-layer.scale * B, A)


@register_method("pissa")
class PiSSA(Method):
    config_cls = PiSSAConfig
    adapts_experts = True

    def edit_rank_bound(self) -> int:
        return self.config.r  # the principal residual, W0 - U_r S_r V_r^T

    def init_layer(self, name: str, index: int, layer: AdaptedLinear, weights: WeightAccess) -> None:
        cfg = self.config
        W = weights.full_weight(layer)
        svd = lambda w: top_singular(w, cfg.r, method=cfg.svd, niter=cfg.svd_niter,  # noqa: E731
                                     oversample=cfg.svd_oversample, seed=cfg.svd_seed + index)
        if isinstance(layer, AdaptedExperts):  # per expert (init time: a loop, not the hot path)
            U, S, V = (torch.stack(t) for t in zip(*(svd(w) for w in layer.logical(W)), strict=True))
        else:
            U, S, V = svd(W)
        principal_init(layer, U, S, V)
