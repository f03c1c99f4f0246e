"""lrx inside a transformers ``Trainer`` (and TRL's trainers, which are Trainers).

    adapter = lrx.wrap(model, "srlora", r=8, r_target=24)
    trainer = SFTTrainer(model=adapter.model, ..., callbacks=[LrxCallback()])

``LrxCallback`` calls the method's hooks where lrx's own trainer calls them:

- ``attach``, ``check_schedule``, ``on_train_start``: ``on_train_begin`` (after
  ``accelerator.prepare`` and, resuming, after the Trainer loaded its checkpoint);
- ``after_backward`` (gradients complete, before the step): ``on_pre_optimizer_step``; under
  DeepSpeed the engine steps inside ``accelerator.backward``, so the gradients are gone by
  then: at the start of its ZeRO optimizer's ``step`` instead (where lrx's ZeRO-3 backend calls it);
- ``after_optimizer_step(step)`` (after step, scheduler, zero grad): ``on_step_end``, after
  the Trainer counted the step;
- checkpoints (edit logs, method state): ``on_save``, into ``checkpoint-N/lrx``.

One difference: the Trainer clips the gradients before ``on_pre_optimizer_step`` and lrx's
trainer after ``after_backward``, so SRLoRA's importance sees clipped gradients here whenever
clipping changes them (with ``max_grad_norm=0``, or a norm below it, both are the same).

A resumed Trainer has loaded the model (the edited base, the adapters) and the optimizer
itself; the callback restores what its checkpoint lacks: the edit logs (not in the model's
state dict: their rank grows) and the method state.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from lrx.adapter import WEIGHTS_NAME
from lrx.api import HANDLE_ATTR, Adapter
from lrx.distributed.found import Placement, check_zero_config, find_placement
from lrx.errors import ConfigError, LrxError
from lrx.fileio import read_safetensors
from lrx.methods import adapted_layers
from lrx.methods.editlog import EditLog

log = logging.getLogger(__name__)

CHECKPOINT_PART = "lrx"  # the folder inside each Trainer checkpoint
EVENTS_FILE = "method_events.jsonl"


def adapter_of(model) -> Adapter:
    """The ``lrx.Adapter`` of a model ``lrx.wrap`` adapted (or an accelerate/DeepSpeed wrapper
    of it); ConfigError otherwise."""
    for candidate in (model, getattr(model, "module", None)):
        if candidate is not None and HANDLE_ATTR in getattr(candidate, "__dict__", {}):
            return candidate.__dict__[HANDLE_ATTR]
    raise ConfigError(f"LrxCallback: the Trainer's model ({type(model).__name__}) was not adapted by lrx; "
                      "pass the model lrx.wrap(model, ...) returned (adapter.model) to the Trainer")


def _accelerate_checks(placement: Placement) -> None:
    """Settings of accelerate's plugins lrx cannot work with, and a plugin that did nothing."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return
    state = AcceleratorState._shared_state
    plugin = state.get("deepspeed_plugin")
    if plugin is not None:
        check_zero_config(plugin.deepspeed_config)
        offload = (plugin.deepspeed_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
        if placement.kind == "zero3":
            placement.shards.offloaded = offload.get("device", "none") not in (None, "none")
    fsdp = state.get("fsdp_plugin")
    if fsdp is not None and getattr(fsdp, "fsdp_version", 1) == 1:
        raise ConfigError("accelerate's FSDP plugin is set to FSDP1, which lrx's shard-local edits cannot address; "
                          "set fsdp_version: 2 in the accelerate config")
    asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if asked and placement.kind in ("single", "replicated"):
        log.warning("accelerate was configured for FSDP or DeepSpeed but the model is not sharded (accelerate %s); "
                    "lrx trains it as %s whole copies", str(state.get("distributed_type", "?")), placement.world_size)


def _check_folds(model) -> None:
    """Layers that fold their edits into a base accelerate's engine keeps below fp32 (DeepSpeed's
    bf16 engine casts every parameter of an fp32 model): the folds would be lossy."""
    for name, layer in adapted_layers(model):
        dtype = layer.base.weight.dtype
        if layer.fold_edits and dtype.is_floating_point and dtype != torch.float32:
            raise ConfigError(f"{name}: accelerate's mixed precision stores this fp32 base in {str(dtype).removeprefix('torch.')} "
                              "(DeepSpeed casts every parameter), where folded edits would be lossy; load the model in that "
                              "dtype before lrx.wrap (its edits then stay exact in the log), or lrx.wrap(..., fuse='log')")


@torch.no_grad()
def _load_logs(model, tensors: dict[str, torch.Tensor]) -> None:
    """Each layer's edit log as saved, set without replaying it: the resumed base holds its edits."""
    for name, layer in adapted_layers(model):
        U, V = tensors[f"{name}.edit_U"], tensors[f"{name}.edit_V"]
        sizes = [int(k) for k in tensors[f"{name}.edit_sizes"].tolist()]
        log = layer.edit_log
        if log.storage != "device" or sum(sizes) != U.shape[1]:
            raise LrxError(f"{name}: the saved edit log cannot be set here (sizes {sizes}, rank {U.shape[1]})")
        layer.edit_log = EditLog(U.to(log.U.device, log.U.dtype), V.to(log.V.device, log.V.dtype), sizes,
                                 int(tensors.get(f"{name}.edit_baked", 0)))


class LrxCallback(TrainerCallback):
    """Runs an lrx method's training hooks inside a transformers ``Trainer``, checkpoints and
    resumes its state with the Trainer's own checkpoints, and writes its events to
    ``{output_dir}/method_events.jsonl`` (``events`` holds them too).

    Args:
        adapter: the ``lrx.Adapter`` of the trained model; None = the one of the Trainer's model.
    """

    def __init__(self, adapter: Adapter | None = None):
        if adapter is not None and not isinstance(adapter, Adapter):
            raise ConfigError(f"LrxCallback takes the lrx.Adapter that lrx.wrap returned, not a {type(adapter).__name__}")
        self.adapter = adapter
        self.placement: Placement | None = None
        self.optimizer = None
        self.events: list[dict] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        found = adapter_of(model)
        if self.adapter is not None and found is not self.adapter:
            raise ConfigError("LrxCallback: the Trainer trains another model than this callback's adapter; "
                              "pass adapter.model to the Trainer")
        self.adapter = adapter = found
        method, module = adapter.method, adapter.model
        self.placement = find_placement(module)
        _accelerate_checks(self.placement)
        _check_folds(module)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
        saved = self._resumed(args, state)
        if saved is not None:
            _load_logs(module, saved)
        method.attach(module, self.placement.shards, None)
        method.check_schedule(state.max_steps)
        if saved is not None:
            prefix = "method_state."
            method.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
        method.on_train_start(module, self.optimizer, state.max_steps)
        if self.placement.kind == "zero3":
            self._before_zero_step(state)
        adapter.hooked = True

    def _resumed(self, args, state) -> dict[str, torch.Tensor] | None:
        """The lrx part of the checkpoint a resumed Trainer continues from, or None (a fresh run)."""
        if not state.global_step:
            return None
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_PART
        if not (folder / WEIGHTS_NAME).is_file():
            raise LrxError(f"resuming at step {state.global_step}: {folder} is missing; resume from a checkpoint "
                           "written with LrxCallback in the Trainer's callbacks")
        if self._is_main(args):
            self._rewind_events(args, state.global_step)
        return read_safetensors(folder / WEIGHTS_NAME)

    def _before_zero_step(self, state) -> None:
        """Under DeepSpeed the engine steps inside ``accelerator.backward``: the gradients are
        gone by ``on_pre_optimizer_step``. The method's ``after_backward`` runs instead when the
        engine calls its ZeRO optimizer's ``step`` (gradients reduced into the partitions, not
        yet clipped: where lrx's own ZeRO-3 backend calls it)."""
        zero = self.optimizer
        step = zero.step

        def hooked_step(*args, **kwargs):
            self.adapter.method.after_backward(self.adapter.model, state.global_step)
            return step(*args, **kwargs)

        zero.step = hooked_step  # this instance only

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.placement is not None and self.placement.kind != "zero3":
            self.adapter.method.after_backward(self.adapter.model, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        records = self.adapter.method.after_optimizer_step(self.adapter.model, self.optimizer, state.global_step)
        if not records:
            return
        records = [{"step": state.global_step, **r} for r in records]
        self.events.extend(records)
        if self._is_main(args):
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with (Path(args.output_dir) / EVENTS_FILE).open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_PART
        self.adapter.save(folder)
        if self.placement.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def on_train_end(self, args, state, control, **kwargs):
        if self._is_main(args):
            self.adapter.method.on_train_end(self.adapter.model, Path(args.output_dir))
        self.adapter.hooked = False

    @staticmethod
    def _is_main(args) -> bool:
        return getattr(args, "process_index", 0) == 0

    @staticmethod
    def _rewind_events(args, step: int) -> None:
        """Drop the events a run logged after the checkpoint it resumes from."""
        path = Path(args.output_dir) / EVENTS_FILE
        if path.is_file():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))
