"""Where a rank's piece of a weight lies, and that piece of a low-rank product. Pure torch.

FSDP2 shards dim 0 (``Shard(0)``): rank k holds rows ``[k c, min((k + 1) c, out))`` with
``c = ceil(out / world)`` (``torch.chunk`` semantics; trailing ranks may hold fewer or no
rows). ZeRO-3 flattens each parameter and gives rank k the flat range
``[k p, min((k + 1) p, numel))`` with ``p = ceil(numel / world)`` (the tail is padding).

A rank-k' edit ``U @ V`` (U: out x k', V: k' x in) restricted to a rank's piece needs only
that piece's rows of U and the small, full V (docs/ARCHITECTURE.md, the event): no full
weight is ever gathered.
"""

from __future__ import annotations

import math

import torch


def fsdp_row_range(out_features: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a dim-0 sharded matrix held by ``rank``."""
    chunk = math.ceil(out_features / world_size)
    start = min(rank * chunk, out_features)
    return start, min(start + chunk, out_features)


def zero3_flat_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """Flat elements ``[start, end)`` of a ZeRO-3 partitioned parameter held by ``rank``."""
    part = math.ceil(numel / world_size)
    start = min(rank * part, numel)
    return start, min(start + part, numel)


def rows_of_product(U: torch.Tensor, V: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``[start, end)`` of ``U @ V`` from those rows of U only."""
    return U[start:end] @ V


def flat_range_of_product(U: torch.Tensor, V: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of ``(U @ V).flatten()`` computed from the rows they touch.

    Args:
        U: out x k (only rows ``start // in`` to ``ceil(end / in)`` are read), or E x out x k
            (stacked, fused MoE experts: only the experts the range touches are read).
        V: k x in, or E x k x in.
        start, end: flat range (row-major), e.g. from ``zero3_flat_range``.

    Returns:
        A 1-D tensor of ``end - start`` elements.
    """
    n_in = V.shape[-1]
    if end <= start:
        return U.new_zeros(0)
    if U.dim() == 3:  # one product per expert touched (a rank holds whole experts under FSDP2)
        per = U.shape[1] * n_in
        first, last = start // per, math.ceil(end / per)
        return torch.bmm(U[first:last], V[first:last]).flatten()[start - first * per : end - first * per]
    first, last = start // n_in, math.ceil(end / n_in)
    block = (U[first:last] @ V).flatten()
    return block[start - first * n_in : end - first * n_in]


# ---- pieces: a rank's flat range of a row-major matrix ---------------------------------------
#
# FSDP2's row block [a, b) of an (R, C) matrix is the flat range [a C, b C); one process holds
# [0, R C). Methods work on such pieces without knowing which backend cut them.


def piece_rows(piece: torch.Tensor, start: int, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """The piece as whole rows, zero-padded where it begins or ends inside a row.

    Returns:
        ``(block, first)``: ``block`` (n_rows x C) holds rows ``first ..`` of the matrix with
        every element outside the piece set to zero (a view when the piece is whole rows).
    """
    block, first = pieces_rows(piece[None], start, shape)
    return block[0], first


def pieces_rows(pieces: torch.Tensor, start: int, shape: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """``piece_rows`` of G pieces with the same range at once: ``pieces`` is G x n, the
    result G x n_rows x C."""
    cols = shape[1]
    first, lead = divmod(start, cols)
    total = lead + pieces.shape[1]
    n_rows = math.ceil(total / cols)
    tail = n_rows * cols - total
    if lead or tail:
        pieces = torch.cat([pieces.new_zeros(pieces.shape[0], lead), pieces, pieces.new_zeros(pieces.shape[0], tail)], dim=1)
    return pieces.view(pieces.shape[0], n_rows, cols), first


def piece_to_full(piece: torch.Tensor, start: int, shape: tuple[int, int]) -> torch.Tensor:
    """A full-size (R x C) matrix holding the piece and zeros elsewhere; summing these over
    ranks (an all-reduce) gives the whole matrix exactly, since x + 0 == x."""
    block, first = piece_rows(piece, start, shape)
    full = piece.new_zeros(shape)
    full[first : first + block.shape[0]] = block
    return full
