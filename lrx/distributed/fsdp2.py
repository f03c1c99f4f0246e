"""PyTorch FSDP2 backend: ``fully_shard`` per transformer block, then the root.

Launched by ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR/PORT and
LOCAL_RANK). NCCL on GPUs, gloo on CPU. Parameters, adapters included, are DTensors sharded
on dim 0 (rank k holds a contiguous block of rows); buffers (edit logs, EigenLoRAx bases)
are not sharded and stay whole and identical on every rank.

This first version initialises adapters on the full weights (every rank, same seed, same
result) and shards afterwards; loading large models into shards from the meta device and
shard-local SRLoRA events come next (issue 5).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lrx.errors import ConfigError
from lrx.distributed import MultiProcess, TorchSteps

log = logging.getLogger(__name__)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: HF's ``_no_split_modules`` classes, else the
    items of the largest ``nn.ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    biggest = max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))
    return list(biggest)


class FSDP2(TorchSteps, MultiProcess):
    """Data-parallel training with parameters sharded over all processes (one mesh axis).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``; with CUDA each process uses ``cuda:LOCAL_RANK``.
        bf16: on GPU, keep bf16 copies of the parameters for compute (``MixedPrecisionPolicy``),
            reducing gradients in fp32.
    """

    name = "fsdp2"

    def __init__(self, device: str = "auto", bf16: bool = True):
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if use_cuda else "gloo")
            except (ValueError, RuntimeError) as e:
                raise ConfigError(
                    f"fsdp2 cannot join the process group ({str(e).splitlines()[0]}); launch with "
                    "torchrun --nproc_per_node N launch/train.py ... (it sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)"
                ) from None
        self._bind(use_cuda)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.mp_policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if use_cuda and bf16 else MixedPrecisionPolicy()
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        blocks = transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp_policy)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy)
        log.info("fsdp2: %d blocks + root sharded over %d processes (%s)", len(blocks), self.world_size,
                 self.device.type)
        return model

    @contextlib.contextmanager
    def full_params(self, model: nn.Module) -> Iterator[None]:
        """Every rank holds full parameters inside (all-gathered), sharded again after.

        Collective: all ranks must enter. Memory: the whole model, for now.
        """
        fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            m.unshard()
        try:
            yield
        finally:
            for m in fsdp:
                m.reshard()
