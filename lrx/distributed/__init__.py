"""Training backends: one ``Backend`` protocol in four roles, implemented per way of running.

The runner and the trainer talk to a backend; methods never do (they see only the seam of
``lrx.methods.seam`` that a backend hands them: ``WeightAccess`` and ``Shards``). A backend
builds the model through one entry point, ``build(spec, layers)``: it constructs the model
(on the meta device where it streams), lets ``layers`` wrap it, loads the base, has
``layers`` initialise the adapted layers where their weights are whole, and places or
shards it. This package knows nothing of method names or of the adapted layer's internals:
what it needs of them comes as the ``LayerSetup`` callbacks.

``protocol.py`` holds the roles (``ModelPlacement``, ``TrainStep``, ``Collectives``,
``StateIO``) and ``Layout``, the facts of a backend's layout that a plan asks
(``plan_layout``: no process group needed); ``common.py`` what the backends share;
``single.py``, ``fsdp2.py``, ``zero3.py`` the backends; ``found.py`` the layout of a model
someone else sharded.
"""

from __future__ import annotations

import os

from lrx.distributed.common import (
    DIAGNOSE_S,
    GLOO_LOST,
    MOMENTS,
    MultiProcess,
    RowBlockWeights,
    Timeouts,
    TorchSteps,
    build_whole,
    check_whole_shape,
    like,
    lost_peer,
)
from lrx.distributed.protocol import (
    Backend,
    Collectives,
    LayerSetup,
    Layout,
    ModelPlacement,
    ModelSpec,
    StateIO,
    TrainStep,
    WeightReader,
)
from lrx.distributed.single import SingleDevice
from lrx.errors import ConfigError

__all__ = [
    "DIAGNOSE_S", "GLOO_LOST", "MOMENTS", "Backend", "Collectives", "LayerSetup", "Layout", "ModelPlacement", "ModelSpec",
    "MultiProcess", "RowBlockWeights", "SingleDevice", "StateIO", "Timeouts", "TorchSteps", "TrainStep",
    "WeightReader", "backend_name", "build_backend", "build_whole", "check_whole_shape", "launched_by_deepspeed",
    "like", "lost_peer", "plan_layout",
]


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


def plan_layout(name: str, world: int, replicate: int = 1) -> Layout:
    """The ``Layout`` the backend ``distributed.backend=name`` would have with ``world``
    processes and ``replicate`` replica groups, without starting it (for ``--dry-run``)."""
    name = backend_name(name, world)
    if name == "fsdp2":
        from lrx.distributed.fsdp2 import FSDP2

        return FSDP2.plan_layout(world, replicate)
    if name == "zero3":
        from lrx.distributed.zero3 import ZeRO3

        return ZeRO3.plan_layout(world)
    return SingleDevice.layout
