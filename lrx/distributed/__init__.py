"""Training backends: one ``Backend`` protocol, implemented per way of running.

The trainer and ``launch/train.py`` talk to a backend; methods never do (they see only the
``WeightAccess`` seam a backend hands them). This package knows nothing of method names.
"""

from __future__ import annotations

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

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""


class SingleDevice:
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


def build_backend(name: str, device: str = "auto") -> Backend:
    """The backend for ``distributed.backend`` (auto: from the launcher environment).

    Raises:
        ConfigError: a multi-process launch (torchrun, deepspeed) reached a single-process backend.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # Several processes would each train the whole model and write the same run folder.
        raise ConfigError(
            f"launched as {world} processes (WORLD_SIZE={world}), but lrx trains in one process only in "
            "this version (FSDP2 and ZeRO-3 backends are not built yet); run python launch/train.py"
        )
    if name in ("auto", "single"):
        return SingleDevice(device)
    raise ConfigError(f"distributed.backend={name!r} is not available; use single or auto")
