"""DeepSpeed ZeRO-3 backend: every parameter flattened and partitioned over the processes.

Launched by the ``deepspeed`` launcher or ``torchrun``. On CPU, DeepSpeed runs with
``DS_ACCELERATOR=cpu`` and gloo (its first start JIT-compiles a small shared-memory extension,
cached in TORCH_EXTENSIONS_DIR). The engine owns backward scaling, gradient clipping
(``gradient_clipping``), the optimizer step and the LR-scheduler step; lrx's client AdamW is
used (``zero_allow_untested_optimizer``). Buffers (edit logs, EigenLoRAx bases) are not
partitioned.

Adapters are initialised on the full weights before partitioning (as in the FSDP2 backend);
``zero.Init`` for models too big for one process and shard-local SRLoRA come next (issue 5).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.distributed import MultiProcess

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"


class ZeRO3(MultiProcess):
    """ZeRO stage 3 through ``deepspeed.initialize``.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        bf16: on GPU, train in bf16 (DeepSpeed's ``bf16.enabled``).
        ds_config: DeepSpeed JSON; batch sizes, accumulation and clipping are filled in by lrx.
    """

    name = "zero3"

    def __init__(self, device: str = "auto", bf16: bool = True, ds_config: str | None = None):
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("distributed.backend=zero3 needs deepspeed: pip install deepspeed") from None
        self.deepspeed = deepspeed
        try:
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
        except (ValueError, RuntimeError, KeyError) as e:
            raise ConfigError(f"zero3 cannot join the process group ({str(e).splitlines()[0]}); launch with "
                              "deepspeed --num_gpus N launch/train.py ... or torchrun") from None
        self._bind(use_cuda)
        path = Path(ds_config) if ds_config else DEFAULT_CONFIG
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} not found; set distributed.deepspeed_config")
        self.ds_config = json.loads(path.read_text())
        self.bf16 = use_cuda and bf16
        self.engine = None
        self.micro = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def setup(self, model: nn.Module, optimizer, scheduler, *, micro_batch: int, grad_accum: int,
              max_grad_norm: float) -> nn.Module:
        """Build the engine; it partitions the parameters (ZeRO-3) and owns the optimizer step."""
        config = {
            **self.ds_config,
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * self.world_size,
            "gradient_clipping": max_grad_norm,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.bf16},
        }
        config.setdefault("zero_optimization", {})["stage"] = 3
        self.engine, *_ = self.deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        self.grad_accum = grad_accum
        log.info("zero3: parameters partitioned over %d processes (%s)", self.world_size, self.device.type)
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.micro += 1
        if self.micro % self.grad_accum:
            self.engine.step()  # DeepSpeed counts every micro-batch; it steps only at the boundary

    def step(self, optimizer, scheduler, params, max_grad_norm: float) -> None:
        self.engine.step()  # clipping, optimizer, scheduler and zero_grad

    @contextlib.contextmanager
    def full_params(self, model: nn.Module) -> Iterator[None]:
        """Every rank holds full parameters inside (gathered); collective."""
        module = getattr(model, "module", model)
        with self.deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield

    def close(self) -> None:
        # Drop the engine (and its threads) before the process group: an engine still alive at
        # interpreter exit aborted a CPU run ~1 in 8 ("terminate called without an active exception").
        self.engine = None
        gc.collect()
        super().close()
