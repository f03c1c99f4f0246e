"""Truncated SVD of base weights, deterministic across runs and ranks, and computable per shard.

Pure torch. PiSSA and SRLoRA need the top singular triplets of each adapted weight.

The randomized path is written for a weight whose rows are split over ranks (FSDP2 shards
dim 0): each rank passes only its row block ``W_k`` and an ``all_reduce`` (sum) callable;
only ``in x q`` and ``q x q`` matrices cross ranks (``W^T W = sum_k W_k^T W_k``). It
iterates on the right singular subspace, ``Z <- orth(sum_k W_k^T (W_k Z))``, then takes the
small SVD through the float64 Gram matrix of ``B = W Z``: ``B^T B = Vb S^2 Vb^T``,
``V = Z Vb``, ``U_k = W_k V S^-1`` (local rows). Every replicated quantity (S, V) is computed
from all-reduced inputs by the same deterministic operations on every rank, so it is
bit-identical everywhere. One process is the special case of one block and no reduction.

Signs are fixed on V (largest-magnitude entry of every right singular vector positive):
V is replicated, so the convention needs no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from lrx.errors import ConfigError


class RankError(ConfigError, ValueError):
    """More principal directions asked of a weight than it has: a setting (the method's rank or
    pool size) the model's layers cannot take, so a one-line user error."""

    def __init__(self, k: int, rows: int, cols: int):
        super().__init__(f"the method asks for {k} principal directions of a {rows} x {cols} weight, which has at "
                         f"most {min(rows, cols)}; lower method.r (or method.r_target) so that it fits every "
                         "adapted layer")

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def fix_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of v_i is positive."""
    idx = V.abs().argmax(dim=0)
    signs = torch.sign(V.gather(0, idx[None, :]))[0]
    signs[signs == 0] = 1
    return U * signs, V * signs


def randomized_svd_rows(
    W_rows: torch.Tensor,
    k: int,
    *,
    all_reduce: AllReduce = _identity,
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
    n_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of a row-sharded matrix (Halko et al. 2011, Alg. 4.4 on W^T W).

    Args:
        W_rows: this rank's rows of W (any number, possibly zero); all ranks share the columns.
        k: triplets to return.
        all_reduce: sums a tensor over ranks in place and returns it (identity on one process).
        niter: power iterations.
        oversample: extra sketch columns.
        seed: seed of the Gaussian sketch (the same on every rank).
        n_rows: total rows of W over all ranks (bounds the sketch width); default: local rows.

    Returns:
        ``U_rows`` (this rank's rows of U, fp32), ``S`` (k,) and ``V`` (in x k), S and V identical
        on every rank; signs fixed on V.
    """
    n_in = W_rows.shape[1]
    n_rows = W_rows.shape[0] if n_rows is None else n_rows
    if not 1 <= k <= min(n_rows, n_in):
        raise RankError(k, n_rows, n_in)
    q = min(k + oversample, n_rows, n_in)
    W = W_rows.detach().float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Z = torch.randn(n_in, q, generator=gen).to(W.device)
    for _ in range(niter + 1):
        Z, _ = torch.linalg.qr(all_reduce(W.t() @ (W @ Z)))
    B = (W @ Z).double()
    gram = all_reduce(B.t() @ B)
    evals, Vb = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)[:k]
    S = evals[order].clamp_min(0).sqrt()
    Vb = Vb[:, order]
    V = Z.double() @ Vb
    U = (B @ Vb) / S.clamp_min(torch.finfo(torch.float64).tiny)
    U, V = fix_signs(U, V)
    return U.float().contiguous(), S.float(), V.float().contiguous()


def top_singular(
    W: torch.Tensor,
    k: int,
    *,
    method: Literal["exact", "randomized"] = "exact",
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of a whole matrix ``W`` (out x in) in fp32.

    Args:
        W: the matrix.
        k: number of triplets; at most ``min(W.shape)``.
        method: ``exact`` (``torch.linalg.svd``) or ``randomized`` (``randomized_svd_rows`` on
            one block: the same arithmetic a sharded run does per rank).
        niter, oversample, seed: of the randomized method.

    Returns:
        ``U`` (out x k), ``S`` (k,), ``V`` (in x k) with ``W ~= U diag(S) V^T``, signs fixed.
    """
    if method == "randomized":
        return randomized_svd_rows(W, k, niter=niter, oversample=oversample, seed=seed)
    if method != "exact":
        raise ValueError(f"unknown SVD method {method!r}; use exact or randomized")
    if not 1 <= k <= min(W.shape):
        raise RankError(k, *W.shape)
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    U, V = fix_signs(U[:, :k].contiguous(), Vh[:k].t().contiguous())
    return U, S[:k], V
