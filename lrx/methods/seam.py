"""The seam between methods and backends: what a method may ask of the weights it adapts.

Methods never learn where a backend keeps things (DTensor row blocks, ZeRO-3 flat partitions
and fp32 masters, gathered replicas of small parameters). They say *what* to read or change,
and each backend implements these verbs for its layout:

- ``WeightAccess`` (initialisation, before sharding): this process's rows of a base weight,
  a full copy of it, a small all-reduce, and a context in which a partitioned weight is whole.
- ``Shards`` (training, once the model is placed): this process's piece of a parameter and of
  its gradient, "add this low-rank product to my piece of the base", "write these values into
  these slots of A/B and reset their optimizer moments, wherever they live", a small
  all-reduce, which rows of a row-split method tensor (SRLoRA's pool) this process keeps,
  which rows of a parameter are its whole piece (``row_piece``), and "write these columns into
  my rows" of a frozen method tensor (a row-sharded edit log, ``write_columns``).

A *piece* is this process's flat range ``[start, end)`` of the row-major flattened parameter
(``span``): FSDP2's block of rows, ZeRO-3's partition, or the whole tensor on one process.
``PieceShards`` implements the verbs from three private primitives a backend provides
(``_copies``, ``_replicas``, ``_state``); ``LocalShards`` is the one-process case. Pure torch.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from lrx.sharding import flat_range_of_product, fsdp_row_range


def full_shape(p: torch.Tensor) -> torch.Size:
    """The whole shape of a parameter, also where a backend has emptied it (ZeRO-3 partitions a
    model built under ``zero.Init``): what a method may know of a weight it has not read."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


class WeightAccess(Protocol):
    """How a method reads base weights at initialisation, before the model is sharded;
    implemented per backend. Each process reads only its block of rows (``row_block``); the
    small results are combined with ``all_reduce``."""

    rank: int
    world_size: int
    shards_rows: bool
    """Whether the backend will split every parameter of an adapted layer by rows over several
    processes, in the blocks ``row_block`` reads (FSDP2): tensors a method registers as the
    layer's parameters now are then split with its base."""

    def full_weight(self, layer) -> torch.Tensor:
        """A full fp32 copy of ``layer``'s current base weight (out x in)."""

    def row_block(self, layer) -> tuple[torch.Tensor, int]:
        """This process's rows of the base weight (fp32) and the index of the first one.
        The blocks of all processes partition the rows (FSDP2's dim-0 split); of a fused
        experts weight (E x out x in, stored layout), dim 0 too: this process's experts."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place and return it (identity on one process)."""

    def gathered(self, layer) -> contextlib.AbstractContextManager:
        """Context in which ``layer``'s base weight (or a plain linear's weight) is whole on every
        process and changes made to it are kept (ZeRO-3 models built partitioned under ``zero.Init``)."""


class LocalWeights:
    """``WeightAccess`` for one process: the whole weight is its row block."""

    rank = 0
    world_size = 1
    shards_rows = False

    def full_weight(self, layer) -> torch.Tensor:
        return layer.base.weight.detach().float()

    def row_block(self, layer) -> tuple[torch.Tensor, int]:
        return self.full_weight(layer), 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gathered(self, layer) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class Shards(Protocol):
    """This process's view of the (possibly sharded) parameters during training.

    Every verb works on this process's piece only; the pieces of all processes partition
    each parameter, so a method that applies the same change on every process changes the
    whole parameter exactly once.
    """

    rank: int
    world_size: int

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        """``(start, end)`` of this process's piece of ``p`` (flat, row-major)."""

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This process's piece of the values training updates (1-D, ``end - start`` long or
        longer with padding): the parameter, or its fp32 master copy where the backend keeps
        one. Read it; change it only through ``add_product`` and ``write_masked``."""

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """This process's piece of ``p``'s gradient of the current step (fp32), or None."""

    def add_product(self, p: torch.Tensor, U: torch.Tensor, V: torch.Tensor, alpha: float = 1.0) -> None:
        """``p += alpha * U @ V`` (U: rows x k, V: k x cols, whole) on every live copy of this
        process's piece (and on whole copies the backend keeps beside it)."""

    def write_masked(self, params: list[torch.Tensor], values: torch.Tensor, mask: torch.Tensor,
                     optimizer=None, reset_state: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """For parameters of one shape and span: where ``mask`` (G x numel, bool) is set, write
        ``values`` (G x numel, whole and flat) into every live copy of each parameter, and zero
        the optimizer states named in ``reset_state`` (e.g. Adam's ``exp_avg``) there.

        Returns:
            Per parameter, this process's piece of ``~mask`` as floats (1 kept, 0 written), to
            reset the caller's own per-element state the same way."""

    def row_block(self, n_rows: int) -> tuple[int, int]:
        """Rows ``[first, end)`` of a row-split method tensor (SRLoRA's pool U; of fused experts,
        the experts whose pool it keeps) this process keeps."""

    def row_piece(self, p: torch.Tensor) -> tuple[int, int] | None:
        """Rows ``[first, end)`` of 2-D ``p`` that are this process's piece of it, where that piece
        is a block of whole rows and the only copy a change must reach (FSDP2's row block; all
        rows of an unsharded tensor); None where pieces split rows or whole replicas are kept
        (ZeRO-3). Where it is a block, the verbs on ``p`` read only these rows of the whole
        values they are given: the other rows may be zeros."""

    def write_columns(self, p: torch.Tensor, col: int, values: torch.Tensor) -> None:
        """``p[:, col : col + n] = values`` (values: rows x n, all of ``p``'s rows, read only in
        ``row_piece(p)``) on this process's piece of 2-D ``p`` (a frozen method tensor such as a
        row-sharded edit log)."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place and return it; every process gets identical values."""


class PieceShards:
    """The ``Shards`` verbs built from a backend's three primitives:

    - ``_copies(p)``: every live 1-D copy of this process's piece that a change must reach,
      the one training updates last (ZeRO-3: the partition, then its fp32 master);
    - ``_replicas(p)``: whole 1-D copies kept besides the piece (ZeRO-3 keeps small
      parameters gathered between steps);
    - ``_state(optimizer, p, key)``: this process's piece of an optimizer state, or None.
    """

    rank: int
    world_size: int

    def __init__(self, rank: int = 0, world_size: int = 1, all_reduce=None):
        self.rank, self.world_size = rank, world_size
        self._all_reduce = all_reduce

    # -- primitives (the one-process layout; backends override) --

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        return 0, p.numel()

    def _copies(self, p: torch.Tensor) -> list[torch.Tensor]:
        return [p.data.view(-1)]

    def _replicas(self, p: torch.Tensor) -> list[torch.Tensor]:
        return []

    def _state(self, optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
        value = optimizer.state.get(p, {}).get(key) if optimizer is not None else None
        return None if value is None else value.view(-1)

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return None if p.grad is None else p.grad.view(-1)

    # -- verbs --

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return self._copies(p)[-1]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._all_reduce is None else self._all_reduce(t)

    def row_block(self, n_rows: int) -> tuple[int, int]:
        return fsdp_row_range(n_rows, self.world_size, self.rank)

    def row_piece(self, p: torch.Tensor) -> tuple[int, int] | None:
        return (0, p.shape[0]) if not self._replicas(p) else None  # the one-process layout: every row

    @torch.no_grad()
    def write_columns(self, p: torch.Tensor, col: int, values: torch.Tensor) -> None:
        rows = self.row_piece(p)
        if rows is None:
            raise NotImplementedError("write_columns needs pieces of whole rows (FSDP2, one process), "
                                      "not pieces that split rows")
        first, end = rows
        n_cols, n = p.shape[1], values.shape[1]
        for piece in self._copies(p):
            block = piece[: (end - first) * n_cols].view(end - first, n_cols)
            block[:, col : col + n].copy_(values[first:end])

    @torch.no_grad()
    def add_product(self, p: torch.Tensor, U: torch.Tensor, V: torch.Tensor, alpha: float = 1.0) -> None:
        start, end = self.span(p)
        whole = start == 0 and end == p.numel() and not self._replicas(p)
        for piece in self._copies(p):
            if whole:  # the one-process case: one product, no flat-range arithmetic
                piece.view(p.shape).add_((U @ V).mul_(alpha).to(piece.dtype))
            else:
                piece[: end - start].add_(flat_range_of_product(U, V, start, end).mul_(alpha).to(piece.dtype))
        for copy in self._replicas(p):
            copy.add_((U @ V).view(-1).mul_(alpha).to(copy.dtype))

    @torch.no_grad()
    def write_masked(self, params: list[torch.Tensor], values: torch.Tensor, mask: torch.Tensor,
                     optimizer=None, reset_state: tuple[str, ...] = ()) -> list[torch.Tensor]:
        start, end = self.span(params[0])
        n = end - start
        copies = [self._copies(p) for p in params]
        for c in range(len(copies[0])):  # e.g. the parameter, and ZeRO-3's fp32 master
            views = [cp[c][:n] for cp in copies]
            new = torch.where(mask[:, start:end], values[:, start:end].to(views[0].dtype), torch.stack(views))
            torch._foreach_copy_(views, list(new))
        replicas = [self._replicas(p) for p in params]
        for c in range(len(replicas[0])):
            views = [r[c] for r in replicas]
            torch._foreach_copy_(views, list(torch.where(mask, values.to(views[0].dtype), torch.stack(views))))
        targets, factors = [], []
        keep = (~mask[:, start:end]).float().unbind(0)
        for g, p in enumerate(params):
            for key in reset_state:
                t = self._state(optimizer, p, key)
                if t is not None:
                    targets.append(t[:n])
                    factors.append(keep[g] if t.device == keep[g].device else keep[g].to(t.device))
        if targets:
            torch._foreach_mul_(targets, factors)
        return list(keep)


class LocalShards(PieceShards):
    """``Shards`` of an unsharded model: every piece is the whole parameter."""
