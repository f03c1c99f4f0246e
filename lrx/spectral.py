"""Truncated SVD of base weights, deterministic across runs and ranks.

Pure torch. PiSSA and SRLoRA need the top singular triplets of each adapted weight. A fixed
sign convention (largest-magnitude entry of every left singular vector positive) makes the
result identical wherever it is computed (DESIGN.md, "Algorithms", step 1).
"""

from __future__ import annotations

from typing import Literal

import torch


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of u_i is positive."""
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx[None, :]))[0]
    signs[signs == 0] = 1
    return U * signs, V * signs


def top_singular(
    W: torch.Tensor,
    k: int,
    *,
    method: Literal["exact", "randomized"] = "exact",
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``W`` (out x in) in fp32.

    Args:
        W: the matrix.
        k: number of triplets; at most ``min(W.shape)``.
        method: ``exact`` (``torch.linalg.svd``) or ``randomized`` (Halko et al. 2011,
            Alg. 4.4: seeded Gaussian sketch of width ``k + oversample``, ``niter`` power
            iterations with re-orthonormalisation).
        niter: power iterations (randomized only).
        oversample: extra sketch columns (randomized only).
        seed: seed of the sketch (randomized only).

    Returns:
        ``U`` (out x k), ``S`` (k,), ``V`` (in x k) with ``W ~= U diag(S) V^T``, signs fixed.
    """
    if not 1 <= k <= min(W.shape):
        raise ValueError(f"cannot take {k} singular triplets of a {tuple(W.shape)} matrix")
    W = W.detach().float()
    if method == "exact":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].t()
    elif method == "randomized":
        q = min(k + oversample, min(W.shape))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sketch = torch.randn(W.shape[1], q, generator=gen).to(W.device)
        Q, _ = torch.linalg.qr(W @ sketch)
        for _ in range(niter):
            Z, _ = torch.linalg.qr(W.t() @ Q)
            Q, _ = torch.linalg.qr(W @ Z)
        Ub, S, Vh = torch.linalg.svd(Q.t() @ W, full_matrices=False)
        U, S, V = (Q @ Ub)[:, :k], S[:k], Vh[:k].t()
    else:
        raise ValueError(f"unknown SVD method {method!r}; use exact or randomized")
    U, V = fix_signs(U.contiguous(), V.contiguous())
    return U, S, V
