"""Training backends: one ``Backend`` protocol, implemented per way of running.

The runner and the trainer talk to a backend; methods never do (they see only the seam of
``lrx.methods.seam`` that a backend hands them: ``WeightAccess`` and ``Shards``). A backend
builds the model through one entry point, ``build(spec, layers)``: it constructs the model
(on the meta device where it streams), lets ``layers`` wrap it, loads the base, has
``layers`` initialise the adapted layers where their weights are whole, and places or
shards it. This package knows nothing of method names or of the adapted layer's internals:
what it needs of them comes as the ``LayerSetup`` callbacks.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
from torch import nn

from lrx.errors import ConfigError, LrxError
from lrx.methods import LocalShards, LocalWeights, Shards, WeightAccess
from lrx.sharding import fsdp_row_range


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


def build_whole(backend, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
    """The build of a model that is whole in each process before it is placed: construct and
    load, wrap, initialise every adapted layer (each process reads its rows), place."""
    model = spec.construct(False)
    layers.wrap(model)
    layers.init(model, backend.weights())
    spec.before_sharding(model)
    return backend.prepare(model)


class Backend(Protocol):
    """How a model is built and placed, how a step runs, and how methods reach the weights."""

    name: str
    device: torch.device
    rank: int
    world_size: int

    def build(self, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
        """The one way a model comes to be for training: construct, adapt (``layers``), load the
        base, initialise the adapters where their base is whole, place or shard."""

    def weights(self) -> WeightAccess:
        """Access to base weights for method initialisation (before sharding)."""

    def shards(self) -> Shards:
        """Access to this process's pieces of the parameters once ``setup`` has run."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move or shard an adapted, initialised model (the last step of ``build``)."""

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

    def close(self) -> None:
        """Release process groups."""


MOMENTS = ("exp_avg", "exp_avg_sq")
# A peer that stopped answering or is gone: torch's DistError family (NCCL, store, network), or gloo's transport
# errors, plain RuntimeErrors (torch 2.13: "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms ...").
GLOO_LOST = re.compile(r"gloo/transport/\S+\] (Timed out waiting \d+ms for (recv|send) operation|Connection closed by "
                       r"peer|Read error|writev|sendmsg|recvmsg)")
DIAGNOSE_S = 10.0  # how long the processes still alive wait for each other to name the missing ones


def lost_peer(error: BaseException) -> bool:
    """A collective's or the store's timeout, or a lost peer (not any error that says "timed out")."""
    return isinstance(error, torch.distributed.DistError) or (isinstance(error, RuntimeError) and bool(GLOO_LOST.search(str(error))))


@dataclass
class Timeouts:
    """How long lrx's collectives wait (``distributed.timeout_s``, ``distributed.checkpoint_timeout_s``)."""

    collective_s: float = 300.0
    io_s: float = 1800.0


def check_whole_shape(shape, value: torch.Tensor) -> None:
    """Raise ValueError unless ``value`` has the whole parameter's ``shape``."""
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"has shape {tuple(value.shape)}, the model needs {tuple(shape)}")


def like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A whole tensor placed like ``p``: its device and dtype, and for a DTensor this process's
    shard of it (``distribute_tensor``, a collective)."""
    full = full.to(p.device, p.dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, p.device_mesh, p.placements)
    return full


class TorchSteps:
    """The plain-PyTorch training step, shared by the single-device and FSDP2 backends
    (ZeRO-3 hands these to the DeepSpeed engine instead)."""

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.full_tensor() if hasattr(t, "full_tensor") else t.detach() for k, t in tensors.items()}

    def optimizer_state(self, named, optimizer) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in named:
            state = optimizer.state.get(p, {})
            for key in MOMENTS:
                if key in state:
                    t = state[key]
                    out[f"{name}.{key}"] = t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor: gather
        return out

    def load_optimizer_state(self, named, optimizer, tensors, step: int) -> None:
        for name, p in named:
            state = {}
            for key in MOMENTS:
                full = tensors.get(f"{name}.{key}")
                if full is None:
                    raise LrxError(f"the checkpoint has no optimizer state {name}.{key}; it belongs to another run")
                state[key] = like(p, full)
            state["step"] = torch.tensor(float(step))
            optimizer.state[p] = state

    @torch.no_grad()
    def load_whole(self, param: torch.Tensor, value: torch.Tensor) -> None:
        check_whole_shape(param.shape, value)  # a DTensor's shape is the whole one
        param.copy_(like(param, value))

    def setup(self, model: nn.Module, optimizer, scheduler, *, micro_batch: int, grad_accum: int,
              max_grad_norm: float) -> nn.Module:
        self.optimizer, self.scheduler = optimizer, scheduler
        return model

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        loss.backward()

    def step(self, optimizer, scheduler, params: list[torch.Tensor], max_grad_norm: float) -> None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


class MultiProcess:
    """What the multi-process backends share: ranks and device, small collectives, leaving together."""

    def _bind(self, use_cuda: bool, timeouts: Timeouts) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if use_cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # lrx's own traffic goes over CPU groups (it never waits for the GPU): the stop agreement
        # after every step (short timeout), waits while the main process writes files (long
        # timeout), and naming the rank that stopped answering once a collective timed out.
        self.timeouts, self.broken = timeouts, False
        self._diagnose_s = min(timeouts.collective_s, DIAGNOSE_S)
        self._control, self._io, self._diagnose = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=s))
            for s in (timeouts.collective_s, timeouts.io_s, self._diagnose_s))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def weights(self) -> WeightAccess:
        # Adapters are initialised before sharding; each process reads its own block of rows.
        return RowBlockWeights(self.rank, self.world_size, self.all_reduce_sum, self.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        """Wait for every process, up to ``distributed.checkpoint_timeout_s`` (the barriers wait
        for the main process's files)."""
        import torch.distributed as dist

        dist.barrier(group=self._io)

    def any_rank(self, flag: bool, slow: bool = False) -> bool:
        """Whether ``flag`` is true on any process (a CPU collective; ``slow``: with the file-writing timeout)."""
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, group=self._io if slow else self._control)
        return bool(t.item())

    def failure(self, error: BaseException, step: int) -> LrxError | None:
        """The one-line error for a collective that failed (timed out, or a peer is gone) at
        ``step``, naming the processes that no longer answer; None for other errors."""
        import torch.distributed as dist

        text = str(error)
        if not lost_peer(error):
            return None
        self.broken = True  # leave without the closing barrier
        try:  # the processes still alive meet here; rank 0 learns who did not come
            dist.monitored_barrier(group=self._diagnose, timeout=timedelta(seconds=self._diagnose_s),
                                   wait_all_ranks=True)
            missing = "none (they answered again)"
        except RuntimeError as e:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
            missing = f"rank {found.group(1)}" if found else "a process that is gone (see its own log)" \
                if self.rank == 0 else "rank 0, or one that rank 0's message names"
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return LrxError(f"rank {self.rank}, step {step}: a collective failed ({first[:160]}); not answering: "
                        f"{missing}; distributed.timeout_s={self.timeouts.collective_s:g}. Resume with --resume auto")

    @contextlib.contextmanager
    def main_first(self):
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and not self.broken:
            # Leave together: a process that exits while a peer still finishes a gloo
            # collective makes the peer abort (seen as SIGABRT on CPU).
            dist.barrier()
            dist.destroy_process_group()


class RowBlockWeights(LocalWeights):
    """``WeightAccess`` before sharding: process k reads FSDP2's k-th block of rows of each
    weight; small results are summed over processes on the communication device."""

    def __init__(self, rank: int, world_size: int, all_reduce, device: torch.device, shards_rows: bool = False):
        self.rank, self.world_size = rank, world_size
        self._all_reduce, self._device = all_reduce, device
        self.shards_rows = shards_rows and world_size > 1  # FSDP2 over several processes

    def row_block(self, layer) -> tuple[torch.Tensor, int]:
        first, end = fsdp_row_range(layer.out_features, self.world_size, self.rank)
        return layer.base.weight.detach()[first:end].float(), first

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self._device:
            return self._all_reduce(t)
        return t.copy_(self._all_reduce(t.to(self._device)))


class SingleDevice(TorchSteps):
    """One process, one device (CPU or a GPU)."""

    name = "single"
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"train.device={device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("train.device asks for cuda but no GPU is visible; use train.device=cpu")

    def weights(self) -> WeightAccess:
        return LocalWeights()

    def shards(self) -> Shards:
        return LocalShards()

    def build(self, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
        if spec.stream == "on":
            raise ConfigError("model.sharded_load=on needs distributed.backend=fsdp2 or zero3 (one process loads "
                              "the model whole); set model.sharded_load=auto")
        return build_whole(self, spec, layers)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def any_rank(self, flag: bool, slow: bool = False) -> bool:
        return flag

    def failure(self, error: BaseException, step: int) -> LrxError | None:
        return None

    def barrier(self) -> None:
        pass

    def main_first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def launched_by_deepspeed() -> bool:
    """The deepspeed launcher sets CROSS_RANK/LOCAL_SIZE (torchrun does not)."""
    return "CROSS_RANK" in os.environ or "LOCAL_SIZE" in os.environ


def backend_name(name: str, world: int) -> str:
    """``distributed.backend`` resolved: ``auto`` is ZeRO-3 under the deepspeed launcher, FSDP2
    with several processes (torchrun), else one device."""
    if name == "auto":
        return "zero3" if launched_by_deepspeed() else "fsdp2" if world > 1 else "single"
    return name


def build_backend(name: str, device: str = "auto", bf16: bool = True, deepspeed_config: str | None = None,
                  replicate: int = 1, timeouts: Timeouts | None = None) -> Backend:
    """The backend for ``distributed.backend`` (``backend_name``); ``replicate``: FSDP2's replica
    groups (HSDP); ``timeouts``: how long collectives wait."""
    timeouts = timeouts or Timeouts()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = backend_name(name, world)
    if replicate != 1 and name != "fsdp2":
        raise ConfigError(f"distributed.replicate={replicate} (HSDP) is for distributed.backend=fsdp2, not {name}; "
                          "set distributed.replicate=1")
    if name == "single":
        if world > 1:
            raise ConfigError(f"distributed.backend=single but {world} processes were launched; "
                              "use distributed.backend=fsdp2, zero3 or auto, or run python launch/train.py")
        return SingleDevice(device)
    if name == "fsdp2":
        from lrx.distributed.fsdp2 import FSDP2

        return FSDP2(device, bf16=bf16, replicate=replicate, timeouts=timeouts)
    if name == "zero3":
        from lrx.distributed.zero3 import ZeRO3

        return ZeRO3(device, bf16=bf16, ds_config=deepspeed_config, timeouts=timeouts)
    raise ConfigError(f"distributed.backend={name!r} is not available; use auto, single, fsdp2 or zero3")
