"""The placement of a model that someone else sharded (``accelerate`` with its FSDP2 or
DeepSpeed plugin): lrx finds how its parameters are laid out and hands a method the
``Shards`` of that layout, the same ``FSDP2Shards`` / ``ZeRO3Shards`` lrx's own backends use.

Supported: one process; several processes with whole replicas (DDP); FSDP2 over a 1-D mesh
(``fully_shard``: parameters are ``DTensor``s sharded on dim 0); ZeRO-3 (parameters carry
``ds_id``, one flat partition per process). Refused in one line: FSDP1 (``FlatParameter``s
mix the parameters of a whole block), FSDP2 over a 2-D mesh (HSDP), ZeRO-3's hierarchical
partitions (hpZ, MiCS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.methods import LocalShards, LocalWeights, Shards, WeightAccess


@dataclass
class Placement:
    """How a model's parameters are laid out over processes, for a method and for saving."""

    kind: str
    """``single``, ``replicated`` (several processes, whole copies: DDP), ``fsdp2`` or ``zero3``."""
    shards: Shards
    gather: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    """Whole copies of (possibly sharded) tensors on every process (a collective when sharded)."""
    rank: int = 0
    world_size: int = 1

    @property
    def sharded(self) -> bool:
        """Whether parameters are split over processes (FSDP2, ZeRO-3) rather than whole in each."""
        return self.kind not in ("single", "replicated")


def check_zero_config(config: dict) -> None:
    """Refuse DeepSpeed settings lrx's shard-local edits cannot work with (hpZ, MiCS)."""
    zero = config.get("zero_optimization") or {}
    hierarchical = {k: zero[k] for k in ("zero_hpz_partition_size", "mics_shard_size")
                    if zero.get(k, 0) not in (0, 1, -1, None)}
    if hierarchical:
        raise ConfigError(f"DeepSpeed {', '.join(f'{k}={v}' for k, v in hierarchical.items())} (hierarchical partitioning) "
                          "is not supported by lrx's shard-local edits; remove it from the DeepSpeed config")


def _whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.full_tensor() if hasattr(t, "full_tensor") else t.detach() for k, t in tensors.items()}


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(group=None):
    def reduce(t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
        return t

    return reduce


def init_weights(model: nn.Module) -> WeightAccess:
    """How adapters read the base weights of ``model`` while it is wrapped: whole on this
    process (``LocalWeights``), or, for a model transformers built partitioned under DeepSpeed's
    ``zero.Init`` (a live ZeRO-3 config when it was made), ZeRO-3's ``ZeroWeights``: each layer
    gathered alone, each process reading its block of rows (as lrx's ZeRO-3 backend builds)."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return LocalWeights()
    import deepspeed

    from lrx.distributed.zero3 import ZeroWeights

    rank, world = _world()
    device = next(model.parameters()).device
    return ZeroWeights(rank, world, _all_reduce(), device, deepspeed)


def find_placement(model: nn.Module) -> Placement:
    """The placement of ``model`` as it will train (after ``accelerator.prepare``).

    Raises:
        ConfigError: a layout lrx cannot edit (FSDP1, HSDP, hpZ).
    """
    rank, world = _world()
    params = list(model.parameters())
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()) or \
            any(type(p).__name__ == "FlatParameter" for p in params):
        raise ConfigError("FSDP1 (FullyShardedDataParallel) flattens whole blocks, which lrx's shard-local edits "
                          "cannot address; set fsdp_version: 2 in the accelerate config")
    dtensors = [p for p in params if hasattr(p, "device_mesh")]
    if dtensors:
        mesh = dtensors[0].device_mesh
        if mesh.ndim != 1:
            raise ConfigError(f"FSDP2 over a {mesh.ndim}-D mesh (HSDP) is not supported through accelerate; "
                              "shard over one mesh axis, or use launch/train.py with distributed.replicate")
        from lrx.distributed.fsdp2 import FSDP2Shards

        shards = FSDP2Shards(mesh.get_local_rank(), mesh.size(), _all_reduce(mesh.get_group()))
        return Placement("fsdp2", shards, _whole, rank, world)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        from lrx.distributed.zero3 import ZeRO3Shards

        def gather(tensors):
            with deepspeed.zero.GatheredParameters(list(tensors.values()), modifier_rank=None):
                return {k: t.detach().clone() for k, t in tensors.items()}

        return Placement("zero3", ZeRO3Shards(rank, world, _all_reduce()), gather, rank, world)
    # Whole on every process (one process, or DDP's replicas with averaged gradients): every
    # process computes the same statistics and events from the same values.
    return Placement("single" if world == 1 else "replicated", LocalShards(), _whole, rank, world)
