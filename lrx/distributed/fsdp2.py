"""PyTorch FSDP2 backend: ``fully_shard`` per transformer block, then the root.

Launched by ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR/PORT and
LOCAL_RANK). NCCL on GPUs, gloo on CPU. Parameters, adapters included, are DTensors sharded
on dim 0 (rank k holds a contiguous block of rows); so are the edit logs, which the layers
hold as frozen parameters of fixed rank when ``weights().shards_rows`` says so before
sharding (``RowLog``); buffers (EigenLoRAx bases) are not sharded and stay whole and
identical on every rank.

Adapters are initialised before sharding (every rank, same seed, same result; SVDs read one
block of rows per rank), block by block when the base streams from safetensors files
(``FSDP2.stream``). During training methods reach their rank's rows through ``FSDP2Shards``:
SRLoRA's importance, scores and recomposition events are shard-local.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lrx.distributed.common import (
    MultiProcess,
    RowBlockWeights,
    Timeouts,
    TorchSteps,
    build_whole,
    file_aliases,
    materialize,
)
from lrx.distributed.protocol import LayerSetup, Layout, ModelSpec
from lrx.distributed.torch_compat import allow_integer_parameters
from lrx.errors import ConfigError
from lrx.methods import PieceShards
from lrx.sharding import fsdp_row_range

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


def join(backend: str, timeout: timedelta) -> None:
    """``init_process_group`` from the launcher's environment. Workers that ``torchrun
    --max-restarts`` restarted keep their keys apart from the failed attempt's: with the
    agent's store shared by all attempts, gloo otherwise meets the dead attempt's addresses and
    fails ("Gloo connectFullMesh failed ... Connect timeout"; seen with torch 2.13)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(f"lrx/attempt-{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


class FSDP2(TorchSteps, MultiProcess):
    """Data-parallel training with parameters sharded over all processes (one mesh axis).

    Args:
        device: ``auto``, ``cpu`` or ``cuda``; with CUDA each process uses ``cuda:LOCAL_RANK``.
        bf16: on GPU, keep bf16 copies of the parameters for compute (``MixedPrecisionPolicy``),
            reducing gradients in fp32.
    """


    def __init__(self, device: str = "auto", bf16: bool = True, replicate: int = 1, timeouts: Timeouts | None = None):
        timeouts = timeouts or Timeouts()
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        allow_integer_parameters()  # quantized bases' codes (torch 2.11: see torch_compat)
        if not dist.is_initialized():
            try:
                join("nccl" if use_cuda else "gloo", timedelta(seconds=timeouts.collective_s))
            except (ValueError, RuntimeError) as e:
                raise ConfigError(
                    f"fsdp2 cannot join the process group ({str(e).splitlines()[0]}); launch with "
                    "torchrun --nproc_per_node N launch/train.py ... (it sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)"
                ) from None
        self._bind(use_cuda, timeouts)
        if replicate < 1 or self.world_size % replicate:
            raise ConfigError(f"distributed.replicate={replicate} does not divide the {self.world_size} processes into "
                              "equal groups; use a divisor (the number of nodes for multi-node jobs) or 1")
        if replicate == 1:
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))
            self.shard_rank, self.shard_size, self.shard_group = self.rank, self.world_size, None
        else:  # HSDP: shard within each group, replicate across the groups (torchtitan's dp_replicate x dp_shard)
            self.mesh = init_device_mesh(self.device.type, (replicate, self.world_size // replicate),
                                         mesh_dim_names=("replicate", "shard"))
            self.shard_rank, self.shard_size = self.mesh["shard"].get_local_rank(), self.world_size // replicate
            self.shard_group = self.mesh.get_group("shard")
        self.layout = self.plan_layout(self.world_size, replicate)
        self.mp_policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if use_cuda and bf16 else MixedPrecisionPolicy()
        )

    @staticmethod
    def plan_layout(world: int, replicate: int = 1) -> Layout:
        """Every parameter split by rows over the ``world // replicate`` processes of a shard group."""
        return Layout("fsdp2", world, max(world // max(replicate, 1), 1), row_blocks=True,
                      how="fully_shard per block + root")

    def partitioned(self, param: torch.Tensor) -> bool:
        return isinstance(param, DTensor)

    def setup(self, model: nn.Module, optimizer, scheduler, **kwargs) -> nn.Module:
        self._root = model
        return super().setup(model, optimizer, scheduler, **kwargs)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # Gradient accumulation without a reduce-scatter per micro-batch: until the step's last
        # micro-batch FSDP2 keeps the (adapter-sized) unsharded gradients and adds to them; the
        # last backward reduce-scatters their sum once.
        self._root.set_requires_gradient_sync(sync)
        loss.backward()

    def _mesh_text(self) -> str:
        replicate = self.world_size // self.shard_size
        return f"; HSDP: {replicate} replicas x {self.shard_size} shards" if replicate > 1 else ""

    def shard_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the processes that share this one's replica of the parameters (its shard
        group; every process without HSDP): pieces summed this way give the whole tensor once,
        the same on every replica."""
        dist.all_reduce(t, group=self.shard_group)
        return t

    def weights(self):
        return RowBlockWeights(self.shard_rank, self.shard_size, self.shard_sum, self.device,
                               shards_rows=self.layout.splits_rows)

    def shards(self) -> FSDP2Shards:
        return FSDP2Shards(self.shard_rank, self.shard_size, self.shard_sum)

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        blocks = transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp_policy)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy)
        log.info("fsdp2: %d blocks + root sharded over %d processes (%s)%s%s", len(blocks), self.world_size,
                 self.device.type, self._mesh_text(), _ties(model))
        return model

    def build(self, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
        """Whole in each process, then sharded; or, when the base can be read tensor by tensor,
        built on the meta device and filled one block at a time (``stream``)."""
        if spec.reader is None:
            return build_whole(self, spec, layers)
        model = spec.construct(True)
        layers.wrap(model)
        spec.before_sharding(model)
        return self.stream(model, spec.reader, layers, spec.source)

    def stream(self, model: nn.Module, reader, layers: LayerSetup, source: str = "weights") -> nn.Module:
        """Shard a wrapped model built on the meta device, filling it one block at a time.

        Each transformer block is materialised on this process's device, filled from
        ``reader`` (``key in reader``, ``reader.get(key)``, keys as in a transformers
        checkpoint, mapped by ``layers.file_key``), its adapted layers initialised
        (``layers.init``: on the block's whole weights, as a whole build would) and then
        sharded, which frees the rest of its rows; the root's own weights (embeddings, norms,
        heads) come last. No process ever holds more than one block whole.

        Raises:
            ConfigError: a weight is not in ``reader`` (e.g. a freshly initialised head).
        """
        aliases = file_aliases(model, layers)
        done: dict[int, nn.Parameter] = {}
        weights = self.weights()
        blocks = transformer_blocks(model)
        for block in blocks:
            materialize(block, reader, aliases, done, layers, self.device)
            layers.init(block, weights)
            fully_shard(block, mesh=self.mesh, mp_policy=self.mp_policy)
            done.clear()  # holding the block's whole tensors would keep them alive (ties live in the root)
        materialize(model, reader, aliases, done, layers, self.device)
        layers.init(model, weights)
        for module in model.modules():  # real buffers (rotary tables) to the device
            for key, buf in list(module._buffers.items()):
                if buf is not None and not isinstance(buf, DTensor):
                    module._buffers[key] = buf.to(self.device)
        fully_shard(model, mesh=self.mesh, mp_policy=self.mp_policy)
        log.info("fsdp2: %d blocks + root loaded block by block from %s and sharded over %d processes (%s)%s",
                 len(blocks), source, self.world_size, self.device.type, _ties(model))
        return model


def _ties(model: nn.Module) -> str:
    """``; tied: model.embed_tokens.weight = lm_head.weight`` where the sharded model still
    shares one parameter between names (tied embeddings, filled once from the files)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied = [" = ".join(group) for group in names.values() if len(group) > 1]
    return f"; tied: {', '.join(tied)}" if tied else ""


class FSDP2Shards(PieceShards):
    """``Shards`` of FSDP2 parameters: this process's piece is its block of rows (``Shard(0)``)."""

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        first, end = fsdp_row_range(p.shape[0], self.world_size, self.rank)
        cols = math.prod(p.shape[1:])  # from the global shape: indexing a DTensor would all-gather it
        return first * cols, end * cols

    def _copies(self, p: torch.Tensor) -> list[torch.Tensor]:
        return [self._local(p)]

    def row_piece(self, p: torch.Tensor) -> tuple[int, int] | None:
        if not isinstance(p, DTensor):  # a buffer: whole on every process
            return 0, p.shape[0]
        return fsdp_row_range(p.shape[0], self.world_size, self.rank)

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return None if p.grad is None else self._local(p.grad)

    def _state(self, optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
        value = optimizer.state.get(p, {}).get(key) if optimizer is not None else None
        return None if value is None else self._local(value)

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, DTensor):
            raise RuntimeError("an FSDP2 parameter is not sharded here (unsharded after an eval forward?); "
                               "call model.reshard() before editing shards")
        return t.to_local().view(-1)
