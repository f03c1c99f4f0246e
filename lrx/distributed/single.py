"""One process, one device: the backend of ``distributed.backend=single``."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lrx.distributed.common import TorchSteps, build_whole
from lrx.distributed.protocol import LayerSetup, Layout, ModelSpec
from lrx.errors import ConfigError, LrxError
from lrx.methods import LocalShards, LocalWeights, Shards, WeightAccess


class SingleDevice(TorchSteps):
    """One process, one device (CPU or a GPU)."""

    rank = 0
    world_size = 1
    is_main = True
    layout = Layout("single")

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

    def partitioned(self, param: torch.Tensor) -> bool:
        return False

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

