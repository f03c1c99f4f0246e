"""What a backend is, in the roles it plays (as torchtitan keeps ``ParallelDims``, parallelize
and the model converters apart): ``Layout`` (the facts of how parameters are laid out, known
before any process starts), ``ModelPlacement`` (build and place a model, hand methods its
pieces), ``TrainStep`` (attach the optimizer, backward, step), ``Collectives`` (ranks and
small collectives) and ``StateIO`` (whole copies in, whole copies out). ``Backend`` is all four.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from lrx.errors import LrxError
from lrx.methods import Shards, WeightAccess


class LayerSetup(Protocol):
    """What a backend calls while it builds a model; the runner's ``lrx.build.Adapters``
    implements it over the method (and, when resuming, the saved adapter)."""

    def wrap(self, model: nn.Module) -> None:
        """Replace the target linears by adapted layers (reads no weight; works on meta)."""

    def init(self, root: nn.Module, weights: WeightAccess) -> None:
        """Initialise (or restore) the adapted layers inside ``root`` whose base weights are
        now whole and filled, once each; ``weights`` reads them."""

    def file_key(self, name: str) -> str:
        """The key in the base's checkpoint of the parameter called ``name`` in the wrapped model."""

    def created(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is made by the adapters (not in the base's files; ``init`` fills it)."""


class WeightReader(Protocol):
    """A source of base tensors by checkpoint key (``lrx.fileio.WeightFiles``)."""

    def __contains__(self, key: str) -> bool: ...

    def get(self, key: str) -> torch.Tensor: ...


@dataclass
class ModelSpec:
    """The model to build, as the runner knows it; the backend decides how to build it."""

    construct: Callable[[bool], nn.Module]
    """``construct(meta)``: the model with its head; ``meta=True`` puts every parameter on the meta
    device and reads nothing."""
    reader: WeightReader | None = None
    """Where the base's weights can be read one tensor at a time (its safetensors files), so a
    sharding backend can load them straight into shards; None = ``construct`` loads them."""
    source: str = "weights"
    """What ``reader`` reads, for the log."""
    stream: str = "auto"
    """``model.sharded_load``: ``on`` refuses a backend that would load the model whole."""
    dtype: torch.dtype = torch.float32
    """The dtype the base is stored in (``model.dtype``): a backend keeps it (ZeRO-3's bf16 engine
    only for bf16 bases), so edits folded into an fp32 base stay exact."""
    before_sharding: Callable[[nn.Module], None] = lambda model: None
    """Called on the adapted model before it is placed or sharded (activation checkpointing)."""
    blockwise: bool = False
    """Every sharding backend builds the model on the meta device and fills it from ``reader`` one
    transformer block at a time, ZeRO-3 too (instead of transformers' ``zero.Init`` load, which
    cannot read these files: a checkpoint stored quantized, whose codes ``layers.init`` reads)."""


@dataclass(frozen=True)
class Layout:
    """How a backend lays a model's parameters out over the processes: the facts a plan asks
    (``lrx.plan``), known from ``distributed.*`` and the world size alone, before any process
    group is joined (torchtitan's ``ParallelDims``). A live backend holds its own as ``layout``."""

    backend: str
    """The resolved ``distributed.backend`` (``single``, ``fsdp2``, ``zero3``), for the plan's text."""
    world_size: int = 1
    shard_size: int = 1
    """Processes one parameter is split over (1: whole on every process; HSDP: one replica's)."""
    row_blocks: bool = False
    """Each process's piece of a parameter is a contiguous block of its rows (FSDP2), so a frozen
    tensor held as a parameter with the base's rows is split with it; False: flat partitions
    (ZeRO-3) or nothing split."""
    how: str = ""
    """How parameters are split, for the plan (``fully_shard per block + root``)."""
    gather_hooks: bool = False
    """Parameters are gathered by hooks on each module as it is called (ZeRO-3): a compiled
    block would trace them, so ``train.compile=auto`` leaves the blocks eager."""

    @property
    def splits_rows(self) -> bool:
        """Whether an adapted layer's parameters are split by rows over several processes, so
        an edit log held as parameters (``RowLog``) is split with the base."""
        return self.row_blocks and self.shard_size > 1

    def held(self, numel: float) -> float:
        """The share of a sharded tensor of ``numel`` values (or bytes) one process holds."""
        return numel / self.shard_size

    def rows_held(self, rows: int) -> int:
        """The most rows of a ``rows``-row parameter one process holds when split by rows."""
        return -(-rows // self.shard_size) if self.row_blocks else rows


class ModelPlacement(Protocol):
    """Building a model and placing it; methods reach its pieces through ``shards``."""

    layout: Layout
    device: torch.device

    def build(self, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
        """The one way a model comes to be: construct, adapt (``layers``), load the base,
        initialise the adapters where their base is whole, place or shard."""

    def shards(self) -> Shards:
        """Access to this process's pieces of the parameters once ``setup`` has run."""

    def partitioned(self, param: torch.Tensor) -> bool:
        """Whether this process holds only a piece of ``param`` (a DTensor shard, a ZeRO-3 partition)."""


class TrainStep(Protocol):
    """One optimizer step: attach the optimizer, backward per micro-batch, step."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def setup(self, model: nn.Module, optimizer, scheduler, *, micro_batch: int, grad_accum: int,
              max_grad_norm: float) -> nn.Module:
        """Attach optimizer and scheduler (DeepSpeed builds its engine here); returns what to call.
        Afterwards ``self.optimizer`` and ``self.scheduler`` are the ones that step: those given,
        or (ZeRO-3 with an ``optimizer`` block in its DeepSpeed config) the ones DeepSpeed built."""

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """Backward of one micro-batch's (already accumulation-scaled) loss. ``sync``: the step's
        last micro-batch, whose backward reduces the gradients over processes; the earlier ones
        may accumulate locally (FSDP2: no reduce-scatter per micro-batch)."""

    def step(self, optimizer, scheduler, params: list[torch.Tensor], max_grad_norm: float) -> None:
        """Clip, optimizer step, scheduler step, zero the gradients."""


class Collectives(Protocol):
    """The processes of a run: who is who, small collectives, failures, leaving."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place and return it."""

    def barrier(self) -> None:
        """Wait for every process."""

    def any_rank(self, flag: bool, slow: bool = False) -> bool:
        """Whether ``flag`` is true on any process (collective)."""

    def failure(self, error: BaseException, step: int) -> LrxError | None:
        """A one-line error naming the processes that stopped answering, if ``error`` is a
        failed collective; None otherwise."""

    def main_first(self) -> contextlib.AbstractContextManager:
        """A context the main process runs first while the others wait, then the others (e.g.
        tokenising into a shared cache once)."""

    def close(self) -> None:
        """Release process groups."""


class StateIO(Protocol):
    """Whole values in and out of (possibly sharded) parameters and optimizer state."""

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole copies of (possibly sharded) parameters, on every process (collective; only
        these are gathered, never the whole model)."""

    def load_whole(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Write a whole value into a (possibly sharded) parameter, before ``setup``: this
        process keeps its piece (collective when sharded: every process, in the same order).

        Raises:
            ValueError: ``value`` does not have the parameter's whole shape."""

    def optimizer_state(self, named: list[tuple[str, torch.Tensor]], optimizer) -> dict[str, torch.Tensor]:
        """Adam's moments of every trained tensor, whole, as ``{name}.exp_avg`` / ``.exp_avg_sq``
        (collective: gathered from the shards, so they load on any number of processes)."""

    def load_optimizer_state(self, named: list[tuple[str, torch.Tensor]], optimizer,
                             tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore what ``optimizer_state`` returned (resharded for this run), at Adam step ``step``."""


class Backend(ModelPlacement, TrainStep, Collectives, StateIO, Protocol):
    """How a model is built and placed, how a step runs, how processes talk, how state moves:
    the four roles above, implemented per way of running (single device, FSDP2, ZeRO-3)."""
