"""SRLoRA on fused MoE experts (``lrx.methods.experts.AdaptedExperts``): a pool, scores and
events per expert, computed as batched tensors over the experts (no loop in an event).

An experts layer of E experts is E independent matrices: its pool holds U (E x out x k), S
(E x k), V (E x in x k) from one SVD per expert; a pair's score is taken per expert (E x r);
an event picks each expert's r' lowest-scoring pairs (E x r'), fuses them into that expert's
base and loads that expert's next r' pool directions into the freed slots, as one stacked edit
(``AdaptedExperts.add_edit``: U E x out x 2r', V E x 2r' x in), so the output is unchanged.
One process only: the experts' edit log is whole on the layer's device (``lrx.methods.experts``).
"""

from __future__ import annotations

import torch

from lrx.methods.experts import AdaptedExperts
from lrx.methods.pissa import principal_init
from lrx.spectral import top_singular


def init_experts(layer: AdaptedExperts, W: torch.Tensor, cfg, seed: int) -> tuple[torch.Tensor, ...]:
    """Per expert, the top ``r_target`` singular triplets of its weight (init time: a loop over the
    experts, as PiSSA's); the first r become the pairs (PiSSA-style, an edit of the base).

    Returns:
        The pool: U (E x out x k), S (E x k), V (E x in x k), k = r_target - r.
    """
    triplets = [top_singular(w, cfg.r_target, method=cfg.svd, niter=cfg.svd_niter, oversample=cfg.svd_oversample,
                             seed=seed) for w in layer.logical(W)]
    U, S, V = (torch.stack(t) for t in zip(*triplets, strict=True))
    principal_init(layer, U[..., : cfg.r], S[..., : cfg.r], V[..., : cfg.r])
    return U[..., cfg.r :], S[..., cfg.r :], V[..., cfg.r :]


def expert_scores(pieces: dict[str, torch.Tensor], layer: AdaptedExperts) -> torch.Tensor:
    """Score of every pair of every expert (E x r): AdaLoRA's ``mean_i s(B[e, i, k]) +
    mean_j s(A[e, k, j])`` from the layer's whole statistics ``pieces`` (flat, as ``Importance``
    keeps them)."""
    E, out_f, in_f, r = layer.num_experts, layer.out_features, layer.in_features, layer.r
    s_B = (pieces["B_ibar"] * pieces["B_ubar"]).view(E, out_f, r)
    s_A = (pieces["A_ibar"] * pieces["A_ubar"]).view(E, r, in_f)
    return s_B.sum(dim=1) / out_f + s_A.sum(dim=2) / in_f


def expert_event(layer: AdaptedExperts, idx: torch.Tensor, pool: dict[str, torch.Tensor],
                 check: bool) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Fuse pairs ``idx`` (E x r') of each expert into its base and subtract the next r' pool
    directions (one stacked edit). Returns the new pairs B_new (E x out x r'), A_new (E x r' x in)
    and, where ``check`` and the edit was folded, each expert's relative fusion error
    ``||applied - intended|| / ||intended||`` (measured in float64; else zeros: the log is exact)."""
    s, swap = layer.scale, idx.shape[1]
    B, A = layer.lora_B.detach(), layer.lora_A.detach()
    B_old = torch.gather(B, 2, idx[:, None, :].expand(-1, B.shape[1], -1))
    A_old = torch.gather(A, 1, idx[:, :, None].expand(-1, -1, A.shape[2]))
    root = torch.sqrt(pool["S"][..., :swap] / s)[:, None, :]
    B_new = pool["U"][..., :swap].to(B) * root.to(B)
    A_new = (pool["V"][..., :swap].to(A) * root.to(A)).transpose(1, 2)
    edit_U = torch.cat([B_old * s, -s * B_new], dim=2)
    edit_V = torch.cat([A_old, A_new], dim=1)
    before = layer.base.weight.detach().double().clone() if layer.fold_edits and check else None
    layer.add_edit(edit_U, edit_V)
    errors = [0.0] * layer.num_experts
    if before is not None:
        intended = layer.base.stored(torch.bmm(edit_U.double(), edit_V.double()).to(before.device))
        applied = layer.base.weight.detach().double() - before
        num = (applied - intended).square().sum(dim=(1, 2))
        den = intended.square().sum(dim=(1, 2))
        errors = torch.where(den > 0, (num / den.clamp_min(1e-300)).sqrt(), 0.0).tolist()
    return B_new, A_new, errors


def write_expert_slots(layer: AdaptedExperts, idx: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor,
                       shards, optimizer, moments: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Write the new pairs into slots ``idx`` of each expert's A and B and zero those slots' Adam
    ``moments``. Returns, for A and B, the flat 0/1 factor that keeps the other slots' statistics."""
    keep = {}
    for key, new, dim in (("A", A_new, 1), ("B", B_new, 2)):
        p = getattr(layer, f"lora_{key}")
        where = idx[:, :, None].expand(-1, -1, p.shape[2]) if key == "A" else idx[:, None, :].expand(-1, p.shape[1], -1)
        full = torch.zeros(p.shape, dtype=new.dtype, device=new.device).scatter_(dim, where, new)
        mask = torch.zeros(p.shape, dtype=torch.bool, device=new.device).scatter_(dim, where, True)
        keep[key] = shards.write_masked([p], full.view(1, -1), mask.view(1, -1), optimizer, moments)[0]
    return keep
