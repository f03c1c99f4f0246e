"""Training backends: one ``Backend`` protocol, implemented per way of running.

The trainer and ``launch/train.py`` talk to a backend; methods never do (they see only the
``WeightAccess`` seam a backend hands them). This package knows nothing of method names.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.methods import LocalWeights, WeightAccess


class Backend(Protocol):
    """How a model is placed, and how methods reach its weights."""

    name: str
    device: torch.device
    rank: int
    world_size: int

    def weights(self) -> WeightAccess:
        """Access to (possibly sharded) base weights for method initialisation and edits."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move or shard the adapted model for training; returns the model to train."""

    def setup(self, model: nn.Module, optimizer, scheduler, *, micro_batch: int, grad_accum: int,
              max_grad_norm: float) -> nn.Module:
        """Attach optimizer and scheduler (DeepSpeed builds its engine here); returns what to call."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's (already accumulation-scaled) loss."""

    def step(self, optimizer, scheduler, params: list[torch.Tensor], max_grad_norm: float) -> None:
        """Clip, optimizer step, scheduler step, zero the gradients."""

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place and return it."""

    def barrier(self) -> None:
        """Wait for every process."""

    def full_params(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context in which every process holds the full parameters (collective)."""

    def close(self) -> None:
        """Release process groups."""


class TorchSteps:
    """The plain-PyTorch training step, shared by the single-device and FSDP2 backends
    (ZeRO-3 hands these to the DeepSpeed engine instead)."""

    def setup(self, model: nn.Module, optimizer, scheduler, *, micro_batch: int, grad_accum: int,
              max_grad_norm: float) -> nn.Module:
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer, scheduler, params: list[torch.Tensor], max_grad_norm: float) -> None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


class MultiProcess:
    """What the multi-process backends share: ranks and device, small collectives, leaving together."""

    def _bind(self, use_cuda: bool) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if use_cuda:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def weights(self) -> WeightAccess:
        return LocalWeights()  # adapters are initialised on full weights, before sharding

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            # Leave together: a process that exits while a peer still finishes a gloo
            # collective makes the peer abort (seen as SIGABRT on CPU).
            dist.barrier()
            dist.destroy_process_group()


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

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def full_params(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def launched_by_deepspeed() -> bool:
    """The deepspeed launcher sets CROSS_RANK/LOCAL_SIZE (torchrun does not)."""
    return "CROSS_RANK" in os.environ or "LOCAL_SIZE" in os.environ


def build_backend(name: str, device: str = "auto", bf16: bool = True, deepspeed_config: str | None = None) -> Backend:
    """The backend for ``distributed.backend``; ``auto`` picks ZeRO-3 under the deepspeed
    launcher, FSDP2 under torchrun (WORLD_SIZE > 1), else one device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if name == "auto":
        name = "zero3" if launched_by_deepspeed() else "fsdp2" if world > 1 else "single"
    if name == "single":
        if world > 1:
            raise ConfigError(f"distributed.backend=single but {world} processes were launched; "
                              "use distributed.backend=fsdp2, zero3 or auto, or run python launch/train.py")
        return SingleDevice(device)
    if name == "fsdp2":
        from lrx.distributed.fsdp2 import FSDP2

        return FSDP2(device, bf16=bf16)
    if name == "zero3":
        from lrx.distributed.zero3 import ZeRO3

        return ZeRO3(device, bf16=bf16, ds_config=deepspeed_config)
    raise ConfigError(f"distributed.backend={name!r} is not available; use auto, single, fsdp2 or zero3")
