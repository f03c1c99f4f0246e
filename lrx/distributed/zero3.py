"""DeepSpeed ZeRO-3 backend: every parameter flattened and partitioned over the processes.

Launched by the ``deepspeed`` launcher or ``torchrun``. On CPU, DeepSpeed runs with
``DS_ACCELERATOR=cpu`` and gloo (its first start JIT-compiles a small shared-memory extension,
cached in TORCH_EXTENSIONS_DIR). The engine owns backward scaling, gradient clipping
(``gradient_clipping``), the optimizer step and the LR-scheduler step; lrx's client AdamW is
used (``zero_allow_untested_optimizer``). Buffers (edit logs, EigenLoRAx bases) are not
partitioned.

Adapters are initialised before partitioning (as in the FSDP2 backend). During training
methods reach their rank's flat range through ``ZeRO3Shards`` (DeepSpeed's ``safe_get_local_*``
family): SRLoRA's importance, scores and recomposition events are shard-local.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from lrx.distributed.common import (
    MOMENTS,
    MultiProcess,
    RowBlockWeights,
    Timeouts,
    build_whole,
    check_whole_shape,
    file_aliases,
    materialize,
)
from lrx.distributed.protocol import LayerSetup, Layout, ModelSpec
from lrx.errors import ConfigError, LrxError
from lrx.methods import PieceShards

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"


def optimizer_block(block: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A DeepSpeed config's ``optimizer`` block with lrx's learning rate, betas and epsilon (the
    first group's, before warm-up) in its params: lrx's train settings stay the one source."""
    if not isinstance(block, dict) or "type" not in block:
        raise ConfigError('the DeepSpeed config\'s "optimizer" needs a "type" (e.g. {"type": "AdamW"}); '
                          "or remove the block to use lrx's AdamW")
    group = optimizer.param_groups[0]
    params = {**block.get("params", {}), "lr": group.get("initial_lr", group["lr"]),
              "betas": list(group["betas"]), "eps": group["eps"]}
    return {**block, "params": params}


def check_arch_list(block: dict) -> None:
    """Refuse, in one line, a ``TORCH_CUDA_ARCH_LIST`` that DeepSpeed cannot build the fused
    optimizer of ``block`` for. DeepSpeed JIT-compiles it for the listed architectures and
    parses only entries like "9.0" or "9.0+PTX"; a suffixed one such as "9.0a" (which some CUDA
    images set) otherwise fails deep inside ``deepspeed.initialize`` with
    ``invalid literal for int() with base 10: '0a'``."""
    if block.get("params", {}).get("torch_adam"):
        return  # torch's own optimizer: nothing is compiled
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    entries = [cc.strip() for cc in value.replace(" ", ";").split(";") if cc.strip()]
    bad = [cc for cc in entries if not re.fullmatch(r"\d+\.\d+(\+PTX)?", cc)]
    if bad:
        fixed = ";".join(dict.fromkeys(re.sub(r"[a-zA-Z]+$", "", cc.replace("+PTX", "")) for cc in entries))
        raise ConfigError(f"TORCH_CUDA_ARCH_LIST={value!r}: DeepSpeed cannot build its {block.get('type')} for "
                          f"{', '.join(bad)}; set TORCH_CUDA_ARCH_LIST=\"{fixed}\" "
                          "or add \"torch_adam\": true to the optimizer's params in the DeepSpeed config")


def without_shm_allreduce() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce.

    That op serves inference only. When every rank is local it maps a 66 MiB ``/dev/shm`` buffer per
    process that is never unlinked, so each run leaks it and a full ``/dev/shm`` then breaks later
    runs. Its kernels also busy-wait, so a dead peer hangs the rest. Marking the op unavailable makes
    DeepSpeed use plain torch.distributed (gloo), which is what training uses anyway.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class ZeRO3(MultiProcess):
    """ZeRO stage 3 through ``deepspeed.initialize``.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        bf16: on GPU, DeepSpeed's bf16 engine (``bf16.enabled``) for a bf16 base; an fp32 base stays
            fp32 (the trainer's autocast still computes in bf16).
        ds_config: DeepSpeed JSON; batch sizes, accumulation and clipping are filled in by lrx.
    """


    def __init__(self, device: str = "auto", bf16: bool = True, ds_config: str | None = None,
                 timeouts: Timeouts | None = None):
        timeouts = timeouts or Timeouts()
        use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("distributed.backend=zero3 needs deepspeed: pip install deepspeed") from None
        self.deepspeed = deepspeed
        path = Path(ds_config) if ds_config else DEFAULT_CONFIG  # read before joining: a bad file is one line
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} not found; set distributed.deepspeed_config")
        try:
            self.ds_config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            where = f" at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON{where}; fix it or set "
                              "distributed.deepspeed_config to a JSON file") from None
        if not isinstance(self.ds_config, dict):
            raise ConfigError(f"DeepSpeed config {path} must be a JSON object ({{...}}); fix it")
        zero = self.ds_config.get("zero_optimization") or {}
        hierarchical = {k: zero[k] for k in ("zero_hpz_partition_size", "mics_shard_size") if zero.get(k, 0) not in (0, 1, -1)}
        if hierarchical:
            # lrx's shard-local events address each parameter's flat partition over all processes;
            # hpZ's secondary partitions and MiCS's sub-groups lay parameters out otherwise.
            raise ConfigError(f"DeepSpeed config {path}: hierarchical partitioning ({', '.join(f'{k}={v}' for k, v in hierarchical.items())}) "
                              "is not supported by lrx's shard-local edits; remove it, or use distributed.backend=fsdp2 "
                              "with distributed.replicate=NODES for multi-node jobs")
        # Without a launcher's environment DeepSpeed falls back to MPI discovery (an mpi4py traceback).
        unset = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if unset:
            raise ConfigError(f"distributed.backend=zero3 needs a launcher ({', '.join(unset)} not set); run "
                              "deepspeed --num_gpus N launch/train.py ... (or torchrun), or set distributed.backend=auto")
        if not use_cuda:
            without_shm_allreduce()
        try:
            if os.environ.get("TORCHELASTIC_RESTART_COUNT") is not None and not torch.distributed.is_initialized():
                # Under torchrun: keep each attempt's keys apart, as FSDP2 does (fsdp2.join);
                # DeepSpeed then adopts the process group.
                from lrx.distributed.fsdp2 import join

                join("nccl" if use_cuda else "gloo", timedelta(seconds=timeouts.collective_s))
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                                       timeout=timedelta(seconds=timeouts.collective_s))
        except (ValueError, RuntimeError, KeyError) as e:
            raise ConfigError(f"zero3 cannot join the process group ({str(e).splitlines()[0]}); launch with "
                              "deepspeed --num_gpus N launch/train.py ... or torchrun") from None
        self._bind(use_cuda, timeouts)
        self.layout = self.plan_layout(self.world_size)
        self.bf16 = use_cuda and bf16
        self.engine_bf16: bool | None = None  # decided by build from the base's dtype
        self.engine = None
        self.micro = 0

    @staticmethod
    def plan_layout(world: int) -> Layout:
        """Every parameter flattened, one flat partition per process (pieces split rows)."""
        return Layout("zero3", world, world, row_blocks=False, how="ZeRO stage 3", gather_hooks=True)

    def partitioned(self, param: torch.Tensor) -> bool:
        return hasattr(param, "ds_id")

    def weights(self) -> "ZeroWeights":
        return ZeroWeights(self.rank, self.world_size, self.all_reduce_sum, self.device, self.deepspeed)

    def build(self, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
        """Whole in each process, or (a base that can be read tensor by tensor) partitioned from
        the start: under a live ``HfDeepSpeedConfig`` transformers builds the model under
        ``zero.Init``, every parameter partitioned at creation, and loads the checkpoint one
        tensor at a time, so no process holds the whole model; each adapted layer's base is
        then gathered alone while its adapter is initialised (``ZeroWeights.gathered``). A
        ``blockwise`` spec (a folder stored quantized) is streamed block by block (``stream``)."""
        # DeepSpeed's bf16 engine casts every parameter to bf16: only for a bf16 base, so that an
        # fp32 base (model.dtype=float32) stays fp32 and edits folded into it stay exact.
        self.engine_bf16 = self.bf16 and spec.dtype == torch.bfloat16
        if spec.reader is not None and spec.blockwise:
            return self.stream(spec, layers)
        if spec.reader is not None:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(self._init_config())  # transformers reads it through a weak reference: keep it
            log.info("zero3: building the model partitioned (zero.Init) and loading it tensor by tensor")
        return build_whole(self, spec, layers)

    def _init_config(self) -> dict:
        """The DeepSpeed config of partitioning at build time (before the engine knows the batch)."""
        config = {**self.ds_config, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "bf16": {"enabled": self.engine_bf16}}
        config.setdefault("zero_optimization", {})["stage"] = 3
        return config

    def stream(self, spec: ModelSpec, layers: LayerSetup) -> nn.Module:
        """A ``blockwise`` build: on the meta device, then per transformer block (the root's own
        tensors last) filled from ``spec.reader``, its adapted layers initialised on its whole
        weights (``layers.init``) and partitioned at once (``zero.Init(module=...)``, what the
        engine does at ``setup`` with parameters not partitioned yet), as ``FSDP2.stream``
        shards it: no process holds more than one block whole."""
        from lrx.distributed.fsdp2 import transformer_blocks

        model = spec.construct(True)
        layers.wrap(model)
        spec.before_sharding(model)
        aliases, config, weights = file_aliases(model, layers), self._init_config(), self.weights()
        blocks = transformer_blocks(model)
        for part in [*blocks, model]:  # ties live in the root: each part makes its own parameters once
            materialize(part, spec.reader, aliases, {}, layers, self.device)
            layers.init(part, weights)
            self.deepspeed.zero.Init(module=part, config_dict_or_path=config, dtype=spec.dtype)
        for module in model.modules():  # real buffers (rotary tables) to the device
            for key, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[key] = buf.to(self.device)
        log.info("zero3: %d blocks + root loaded block by block from %s and partitioned over %d processes (%s)",
                 len(blocks), spec.source, self.world_size, self.device.type)
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
        if not partitioned:
            return model.to(self.device)
        log.info("zero3: %d of %d parameters were built partitioned", partitioned, len(list(model.parameters())))
        for module in model.modules():  # built partitioned: move only what zero.Init did not place
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None and not hasattr(t, "ds_id") and t.device != self.device:
                    t.data = t.data.to(self.device)
        return model

    def setup(self, model: nn.Module, optimizer, scheduler, *, micro_batch: int, grad_accum: int,
              max_grad_norm: float) -> nn.Module:
        """Build the engine; it partitions the parameters (ZeRO-3) and owns the optimizer step."""
        # ZeRO-3's backward hooks hang on tensors that need a gradient. With nothing before the
        # first adapted module needing one (fused experts alone adapted: their adapter reaches the
        # model through a hook, not an input), the first backward accumulated into an emptied
        # adapter parameter. The embeddings' output needs one, as peft makes it for checkpointing.
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        config = {
            **self.ds_config,
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * self.world_size,
            "gradient_clipping": max_grad_norm,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.bf16 if self.engine_bf16 is None else self.engine_bf16},
        }
        config.setdefault("zero_optimization", {})["stage"] = 3
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for g in optimizer.param_groups for p in g["params"]})
        if len(dtypes) > 1 and not config["bf16"]["enabled"]:  # DeepSpeed asserts one dtype per parameter group
            raise ConfigError(f"zero3 without DeepSpeed's bf16 engine (CPU, or train.bf16=false) needs the trained parameters "
                              f"in one dtype, and these are {' and '.join(dtypes)} (a bf16 base's task head beside the "
                              "fp32 adapters); set model.dtype=float32, or train.bf16=true on GPUs")
        if self.offloaded and "optimizer" not in config:
            raise ConfigError('zero_optimization.offload_optimizer needs an "optimizer" block in the DeepSpeed config '
                              '(e.g. {"type": "AdamW"}, which DeepSpeed runs as its CPU Adam); or remove the offload')
        if "optimizer" in config:
            # DeepSpeed builds the optimizer its config names (FusedAdam, CPU Adam, ...) over lrx's
            # parameter groups, with lrx's learning rate, betas and weight decay, and lrx's LR
            # schedule is rebuilt on it.
            config["optimizer"] = optimizer_block(config["optimizer"], optimizer)
            if self.device.type == "cuda":
                check_arch_list(config["optimizer"])
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
            lambdas = scheduler.lr_lambdas
            self.engine, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
                model=model, model_parameters=groups, config=config,
                lr_scheduler=lambda built: torch.optim.lr_scheduler.LambdaLR(built, lambdas))
            built = getattr(self.optimizer, "optimizer", self.optimizer)  # inside ZeRO's wrapper
            log.info("zero3: optimizer %s built by DeepSpeed (%s)", config["optimizer"]["type"], type(built).__name__)
        else:
            self.engine, *_ = self.deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=config)
            self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum = grad_accum
        log.info("zero3: parameters partitioned over %d processes (%s)", self.world_size, self.device.type)
        return self.engine

    @property
    def offloaded(self) -> bool:
        """The DeepSpeed config keeps the optimizer state off the GPU (offload_optimizer)."""
        offload = self.ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
        return offload.get("device", "none") not in (None, "none")

    def shards(self) -> ZeRO3Shards:
        return ZeRO3Shards(self.rank, self.world_size, self.all_reduce_sum, offloaded=self.offloaded)

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        # The trainer already divided the loss by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.micro += 1
        if self.micro % self.grad_accum:
            self.engine.step()  # DeepSpeed counts every micro-batch; it steps only at the boundary

    def step(self, optimizer, scheduler, params, max_grad_norm: float) -> None:
        self.engine.step()  # clipping, optimizer, scheduler and zero_grad

    def gather(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.deepspeed.zero.GatheredParameters(list(tensors.values()), modifier_rank=None):
            return {k: t.detach().clone() for k, t in tensors.items()}

    @torch.no_grad()
    def load_whole(self, param: torch.Tensor, value: torch.Tensor) -> None:
        check_whole_shape(getattr(param, "ds_shape", param.shape), value)  # partitioned: emptied
        if not hasattr(param, "ds_id"):  # not built partitioned
            param.copy_(value)
            return
        with self.deepspeed.zero.GatheredParameters([param], modifier_rank=0):  # every rank writes the same
            param.copy_(value)

    def optimizer_state(self, named, optimizer) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        out = {}
        for name, p in named:
            for key in MOMENTS:
                t = safe_get_full_optimizer_state(p, key)  # collective
                if t is not None:
                    out[f"{name}.{key}"] = t
        return out

    def load_optimizer_state(self, named, optimizer, tensors, step: int) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        inner = self.engine.optimizer.optimizer  # the client AdamW, stepping DeepSpeed's fp32 partitions
        flats = self.engine.optimizer.fp32_partitioned_groups_flat
        for flat in flats:  # AdamW creates its state at the first step: do it now
            if "exp_avg" not in inner.state[flat]:
                inner.state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        for name, p in named:
            for key in MOMENTS:
                full = tensors.get(f"{name}.{key}")
                if full is None:
                    raise LrxError(f"the checkpoint has no optimizer state {name}.{key}; it belongs to another run")
                safe_set_full_optimizer_state(p, full.to(self.device, torch.float32), key)
        for flat in flats:
            old = inner.state[flat]["step"]
            inner.state[flat]["step"] = torch.full_like(old, float(step)) if torch.is_tensor(old) else step
        for group in inner.param_groups:  # optimizers that count steps per group (DeepSpeed's FusedAdam)
            if "step" in group:
                group["step"] = step

    def close(self) -> None:
        # Drop the engine (and its threads) before the process group: an engine still alive at
        # interpreter exit aborted a CPU run ~1 in 8 ("terminate called without an active exception").
        self.engine = None
        # And the HfDeepSpeedConfig of a streamed build: while it lives, transformers builds every
        # model of this process under zero.Init (a later run's whole model included).
        self._hf_config = None
        gc.collect()
        super().close()


class ZeroWeights(RowBlockWeights):
    """``WeightAccess`` of a model built under ``zero.Init``: a layer's partitioned parameters
    (an adapted layer's base weight and bias, or a plain linear's) are gathered while its
    adapter is initialised or it is quantized; what rank 0 (like every rank) changes is kept."""

    def __init__(self, rank, world_size, all_reduce, device, deepspeed):
        super().__init__(rank, world_size, all_reduce, device)
        self._deepspeed = deepspeed

    def gathered(self, layer: nn.Module):
        params = [p for p in layer.parameters() if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        return self._deepspeed.zero.GatheredParameters(params, modifier_rank=0)


class ZeRO3Shards(PieceShards):
    """``Shards`` of ZeRO-3 parameters: this process's piece is its flat partition (``ds_tensor``).

    A trained parameter has two live copies of the piece: the module's partition (used by the
    next all-gather) and the optimizer's fp32 master partition (what training updates, last).
    Both are views, so writes reach the live state (optimizer offload is not supported by these
    views). Small parameters are also kept whole between steps (``_replicas``).
    """

    def __init__(self, rank: int, world_size: int, all_reduce, offloaded: bool = False):
        super().__init__(rank, world_size, all_reduce)
        self.offloaded = offloaded
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state

        self._fp32, self._grad, self._optim = safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        part = p.ds_tensor.ds_numel
        start = min(self.rank * part, p.ds_numel)
        return start, min(start + part, p.ds_numel)

    def _copies(self, p: torch.Tensor) -> list[torch.Tensor]:
        if self.offloaded:  # the fp32 master and moments live off the GPU, where no view reaches
            raise ConfigError("this method edits parameters in place (SRLoRA's events, folded edits), which "
                              "ZeRO-3's offload_optimizer does not allow; remove zero_optimization.offload_optimizer "
                              "from the DeepSpeed config")
        out = [p.ds_tensor.view(-1)]
        if p.requires_grad and hasattr(p, "_z3_optimizer"):
            out.append(self._fp32(p).view(-1))
        return out

    def row_piece(self, p: torch.Tensor) -> tuple[int, int] | None:
        return None  # flat partitions split rows (and small parameters keep whole replicas)

    def _replicas(self, p: torch.Tensor) -> list[torch.Tensor]:
        # Parameters under stage3_param_persistence_threshold stay gathered between steps
        # (adapters of an 8B model are); forward reads that copy, not the partition.
        return [p.data.view(-1)] if p.data.numel() == p.ds_numel else []

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._grad(p).view(-1) if p.requires_grad else None

    def _state(self, optimizer, p: torch.Tensor, key: str) -> torch.Tensor | None:
        if optimizer is None or not p.requires_grad:
            return None
        try:
            return self._optim(p, key).view(-1)
        except KeyError:  # no state before the first step
            return None
