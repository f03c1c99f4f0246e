"""What the backends share: the build of a model that is whole before it is placed, the
plain-PyTorch step (single device, FSDP2), the multi-process collectives, init-time reads of
row blocks, and the small helpers of state I/O."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from lrx.distributed.protocol import LayerSetup, ModelSpec
from lrx.errors import ConfigError, LrxError
from lrx.methods import LocalWeights, WeightAccess
from lrx.sharding import fsdp_row_range


def build_whole(backend, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
    """The build of a model that is whole in each process before it is placed: construct and
    load, wrap, initialise every adapted layer (each process reads its rows), place."""
    model = spec.construct(False)
    layers.wrap(model)
    layers.init(model, backend.weights())
    spec.before_sharding(model)
    return backend.prepare(model)


def file_aliases(model: nn.Module, layers: LayerSetup) -> dict[int, list[str]]:
    """Every parameter's keys in the base's files (``layers.file_key``; tied ones have several), by ``id``."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(layers.file_key(name))
    return aliases


def materialize(root: nn.Module, reader, aliases: dict[int, list[str]], done: dict[int, nn.Parameter],
                layers: LayerSetup, device: torch.device) -> None:
    """Give every meta parameter and buffer under ``root`` real storage on ``device``: parameters
    read from ``reader`` (or, made by the build, ``layers.created``: adapters and the stand-ins of
    weights stored quantized, left for ``layers.init``), buffers zeroed. ``done``: the parameters
    made so far, by the meta one's ``id`` (a tied parameter is made once).

    Raises:
        ConfigError: a weight is not in ``reader`` (e.g. a freshly initialised head).
    """
    for module in root.modules():
        for key, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                value = torch.empty(param.shape, dtype=param.dtype, device=device)
                made = layers.created(param)
                names = [] if made else [n for n in aliases.get(id(param), []) if n in reader]
                if names:
                    value.copy_(reader.get(names[0]))
                elif not made:
                    raise ConfigError(
                        f"sharded loading: {aliases.get(id(param), ['?'])[0]} is not in the model's safetensors "
                        "files (a freshly initialised head?); set model.sharded_load=off")
                done[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[key] = done[id(param)]
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:  # buffers made on the meta base (edit logs, bases)
                module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)


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
        # dim 0: rows of a linear's weight, the experts of a fused experts weight (E x out x in)
        first, end = fsdp_row_range(getattr(layer, "num_experts", layer.out_features), self.world_size, self.rank)
        return layer.base.weight.detach()[first:end].float(), first

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self._device:
            return self._all_reduce(t)
        return t.copy_(self._all_reduce(t.to(self._device)))

