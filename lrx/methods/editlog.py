"""The edit log of an adapted layer: the exact fp32 record of the frozen changes a method made to
its base (PiSSA's residual, SRLoRA's fused pairs), ``U @ V`` with U out x rank and V rank x in.

One interface, one implementation per storage, chosen once by ``log_storage``:

- ``EditLog`` ("device"): buffers ``U``, ``V`` on the layer's device (any leading dims: fused
  experts stack one log per expert);
- ``HostLog`` ("host"): the exact fp32 log in pinned host memory and only its compute-dtype
  copy (bf16) on the device, for a forward that runs in bf16 and cast the fp32 log anyway;
- ``RowLog`` ("rows"): frozen fp32 parameters ``U`` (out x capacity) and ``Vt`` (in x
  capacity) of fixed rank that FSDP2 splits by rows with the base, so each process keeps its
  rows.

Every log keeps ``sizes`` (the rank of each recorded edit, in order), ``baked`` (its first
columns that a quantized base contains) and ``pending`` (restored edits to replay once the
base is quantized as training did). A layer holds its log as the submodule ``edit_log`` and
swaps it for another storage with ``placed``.
"""

from __future__ import annotations

import torch
from torch import nn

STORAGES = ("device", "host", "rows")


def log_storage(*, shards_rows: bool, bound: int | None, logged: bool, offloads: bool) -> str:
    """Where a layer's edit log lives (one of ``STORAGES``); the trainer's placement and the dry
    run's memory plan both ask this.

    Args:
        shards_rows: the backend splits every parameter by rows over several processes (FSDP2).
        bound: the method's ``edit_rank_bound`` (a row-sharded log needs a fixed rank).
        logged: the edits are applied beside the base, not folded into it.
        offloads: the method offloads unfolded logs for this forward's compute dtype.
    """
    if shards_rows and bound:
        return "rows"
    return "host" if logged and offloads else "device"


class EditLog(nn.Module):
    """An exact fp32 edit log on the layer's device: buffers ``U`` (..., out x rank) and ``V``
    (..., rank x in), not persistent (adapter files store the log explicitly, its rank changes
    during training)."""

    storage = "device"

    def __init__(self, U: torch.Tensor, V: torch.Tensor, sizes=(), baked: int = 0):
        super().__init__()
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("V", V, persistent=False)
        self.sizes: list[int] = [int(k) for k in sizes]
        self.baked = baked
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def empty(out_features: int, in_features: int, device, lead: tuple[int, ...] = ()) -> EditLog:
        return EditLog(torch.zeros(*lead, out_features, 0, device=device),
                       torch.zeros(*lead, 0, in_features, device=device))

    @property
    def rank(self) -> int:
        return sum(self.sizes)

    @property
    def device(self) -> torch.device:
        """Where the forward's copy lives (edits are moved here before they are appended)."""
        return self.held()[0].device

    def append(self, U: torch.Tensor, V: torch.Tensor, shards) -> None:
        """Record the edit ``U @ V`` (fp32, ... out x k and ... k x in, on ``device``). ``shards``:
        the layer's (a row-sharded log writes this process's rows)."""
        self._write(U, V, shards)
        self.sizes.append(V.shape[-2])

    def _write(self, U: torch.Tensor, V: torch.Tensor, shards) -> None:
        self.U = torch.cat([self.U, U.to(self.U.dtype)], dim=-1)
        self.V = torch.cat([self.V, V.to(self.V.dtype)], dim=-2)

    def views(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` from column ``start`` on, as the forward multiplies them (an offloaded log's
        compute-dtype copy, a row-sharded log's parameters as they are now)."""
        return self.U[..., start:], self.V[..., start:, :]

    def product(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The product ``x @ (U @ V)[start:].t()`` in ``x``'s dtype, factor by factor."""
        U, V = (t.to(x.dtype) for t in self.views(start))
        return (x @ V.t()) @ U.t()

    def factors(self, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact fp32 log ``(U, V)``, whole. ``gather``: a backend's (whole copies of sharded
        parameters, a collective every process calls); only a row-sharded log needs it."""
        return self.U, self.V

    def held(self) -> list[torch.Tensor]:
        """The tensors on the layer's device that hold the log."""
        return [*self.buffers(), *self.parameters()]

    def rows(self, shards) -> tuple[int, int] | None:
        """The rows of U whose edits this process must write (``Shards.row_piece``)."""
        return shards.row_piece(self.held()[0])

    def placed(self, storage: str, capacity: int | None = None, compute_dtype: torch.dtype | None = None,
               world_size: int = 1) -> EditLog:
        """This log in ``storage`` (itself when it is there already): ``capacity`` is a row log's
        fixed rank (a host log's first allocation), ``compute_dtype`` a host log's device copy's,
        ``world_size`` the processes a row log is split over."""
        if storage in (self.storage, "device"):  # a placed log stays where it is
            return self
        if self.storage != "device":
            raise RuntimeError(f"an edit log in {self.storage} memory cannot move to {storage}; "
                               "hold its rows before attach")
        U, V = self.factors()
        if storage == "host":
            log = HostLog(U, V, compute_dtype, capacity)
        else:
            log = RowLog(U, V, capacity, world_size)
        log.sizes, log.baked, log.pending = self.sizes, self.baked, self.pending
        return log


class HostLog(EditLog):
    """The exact fp32 log in host memory (pinned when there is a GPU, so copies from it are
    asynchronous), its ``compute_dtype`` copy in the buffers ``U``, ``V`` on the device. Host
    rows are rank-1 edits: ``Ut`` (capacity x out) holds U transposed so that appending k
    edits writes k whole rows; the capacity doubles when it runs out."""

    storage = "host"

    def __init__(self, U: torch.Tensor, V: torch.Tensor, compute_dtype: torch.dtype, capacity: int | None = None):
        super().__init__(U.to(compute_dtype), V.to(compute_dtype))
        pin = torch.cuda.is_available()
        cap = max(capacity or 0, U.shape[1])
        self.Ut = torch.empty(cap, U.shape[0], pin_memory=pin)
        self.Vh = torch.empty(cap, V.shape[1], pin_memory=pin)
        self.used = 0
        self._host(U, V)

    def _host(self, U: torch.Tensor, V: torch.Tensor) -> None:
        k = V.shape[0]
        if self.used + k > self.Vh.shape[0]:
            cap = max(2 * self.Vh.shape[0], self.used + k)
            Ut, Vh = self.Ut, self.Vh
            self.Ut = torch.empty(cap, Ut.shape[1], pin_memory=Ut.is_pinned())
            self.Vh = torch.empty(cap, Vh.shape[1], pin_memory=Vh.is_pinned())
            self.Ut[: self.used].copy_(Ut[: self.used])
            self.Vh[: self.used].copy_(Vh[: self.used])
        self.Ut[self.used : self.used + k].copy_(U.t(), non_blocking=True)
        self.Vh[self.used : self.used + k].copy_(V, non_blocking=True)
        self.used += k

    def _write(self, U: torch.Tensor, V: torch.Tensor, shards) -> None:
        self._host(U, V)
        super()._write(U, V, shards)

    def factors(self, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact fp32 ``(U, V)`` in host memory, once pending copies have landed."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.Ut[: self.used].t(), self.Vh[: self.used]


class RowLog(EditLog):
    """An exact fp32 log of fixed capacity held as two frozen parameters, so that a backend that
    shards every parameter by rows (FSDP2) splits it with the base: each process keeps its rows
    of ``U`` (out x capacity: the base's rows) and of ``Vt`` (V transposed, in x capacity), the
    forward sees both all-gathered with the block's other parameters (in the compute dtype
    under mixed precision, the dtype its product runs in anyway) and uses their first ``rank``
    columns. A sharded parameter cannot change shape, hence the capacity: the method's
    ``edit_rank_bound``, known before sharding.

    Edits are written into this process's rows only (``Shards.write_columns``), so the factors
    an event hands over may be zero outside them; saving gathers the log whole
    (``factors(backend.gather)``).
    """

    storage = "rows"

    def __init__(self, U: torch.Tensor, V: torch.Tensor, capacity: int, world_size: int = 1):
        nn.Module.__init__(self)
        k = U.shape[1]
        if k > capacity:
            raise ValueError(f"an edit log of rank {k} does not fit a capacity of {capacity}")
        Ut, Vt = U.new_zeros(U.shape[0], capacity), V.new_zeros(V.shape[1], capacity)
        Ut[:, :k], Vt[:, :k] = U, V.t()
        self.U = nn.Parameter(Ut, requires_grad=False)
        self.Vt = nn.Parameter(Vt, requires_grad=False)
        self.capacity, self.world_size = capacity, world_size
        self.sizes, self.baked, self.pending = [k] if k else [], 0, []

    def _write(self, U: torch.Tensor, V: torch.Tensor, shards) -> None:
        """Write into the next ``k`` columns of this process's rows (only its rows of U are read)."""
        k, rank = V.shape[0], self.rank
        if rank + k > self.capacity:
            raise RuntimeError(f"the row-sharded edit log holds rank {self.capacity} (the method's edit_rank_bound); "
                               f"an edit of rank {k} at rank {rank} does not fit")
        shards.write_columns(self.U, rank, U)
        shards.write_columns(self.Vt, rank, V.t())

    def views(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rank = self.rank
        return self.U[:, start:rank], self.Vt[:, start:rank].t()

    def factors(self, gather=None) -> tuple[torch.Tensor, torch.Tensor]:
        if gather is None:
            if self.world_size > 1:
                raise RuntimeError("this edit log is sharded by rows; gather it (edit_log.factors(backend.gather), "
                                   "a collective)")
            return self.views()
        whole = gather({"U": self.U, "Vt": self.Vt})
        return whole["U"][:, : self.rank], whole["Vt"][:, : self.rank].t()
