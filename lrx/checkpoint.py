"""Training checkpoints: everything a run changed, written atomically, resumable on any world size.

A checkpoint is a folder ``RUN/checkpoints/step-00000012/`` holding

- ``adapter/``: the lrx adapter (adapter tensors, edit log, modules_to_save, method state:
  importance statistics, pool, schedule), as ``lrx.adapter.save_adapter`` writes it;
- ``optimizer.safetensors``: Adam's moments of every trained tensor, whole (gathered from the
  shards), keyed by parameter name, so a run resumes on another number of processes;
- ``rng-rank{K}.safetensors``: the torch (and CUDA) random states of each process;
- ``trainer_state.json``: step, micro-batches consumed (the data position), the LR scheduler,
  the world size, the resolved config and the lrx / torch / transformers versions;
- ``COMPLETE``: written last; a folder without it is incomplete and never resumed from.

Never the base weights: resuming rebuilds ``W0 + edits`` from the original model and the
edit log. Files are written into ``.step-N.tmp``, fsynced, marked complete and renamed, so a
crash leaves the previous checkpoints intact; the newest ``keep`` complete ones are kept.
Only safetensors and JSON are read back.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

import lrx
from lrx.adapter import WEIGHTS_NAME, save_adapter, trained_tensors
from lrx.errors import LrxError
from lrx.fileio import read_json, read_safetensors

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
NAME = re.compile(r"^step-(\d{8})$")
# Config sections a checkpoint must agree on to be resumed (batch sizes, steps may change).
MUST_MATCH = ("model", "method")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the newest complete one of ``run_dir`` (None
    if there is none), else the given folder, which must be a complete checkpoint."""
    if resume == "auto":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise LrxError(f"train.resume={resume}: no such checkpoint folder; use auto or a RUN/checkpoints/step-N folder")
    if not (path / COMPLETE).is_file():
        raise LrxError(f"{path} is an incomplete checkpoint (no {COMPLETE} marker: the save was interrupted); "
                       "resume from an earlier one or use train.resume=auto")
    return path


def read_state(path: Path) -> dict[str, Any]:
    file = path / STATE
    if not file.is_file():
        raise LrxError(f"{path}: {STATE} is missing; the checkpoint is incomplete or not lrx's")
    return read_json(file, "the checkpoint is corrupt; resume from another one")


def check_compatible(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state, after checking it was made for the same model and method."""
    state = read_state(path)
    saved = state.get("config", {})
    for section in MUST_MATCH:
        if saved.get(section) != config.get(section):
            diff = sorted(k for k in set(saved.get(section, {})) | set(config.get(section, {}))
                          if saved.get(section, {}).get(k) != config.get(section, {}).get(k))
            raise LrxError(f"{path} was made with other {section} settings ({', '.join(diff)} differ); "
                           f"resume with the run's own config or start a new run")
    return state


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(run_dir: Path, step: int, *, backend, model, method, trainer_state: dict[str, Any],
                    optimizer_state: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` (collective: every process calls it).

    Args:
        run_dir: the run directory (shared by all processes).
        step: optimizer steps done.
        backend: the training backend (rank, barrier, full parameters).
        model, method: the adapted model and its method.
        trainer_state: JSON-serialisable trainer state (step, data position, scheduler ...).
        optimizer_state: whole optimizer tensors by name (taken on every rank, written by rank 0).
        meta: adapter metadata (base model, task ...).
        keep: how many complete checkpoints to keep (older ones are deleted).

    Raises:
        LrxError: the folder cannot be written (permissions, full disk); nothing earlier is lost.
    """
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    method_state = method.state_dict()  # collective
    error = None
    try:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crash
            tmp.mkdir(parents=True)
        backend.barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and backend.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(backend.device)
        save_file(rng, str(tmp / f"rng-rank{backend.rank}.safetensors"))
        params = backend.gather(trained_tensors(model, method))  # collective: the adapter only
        if backend.is_main:
            save_adapter(tmp / "adapter", model, method, meta, method_state, params)
        if backend.is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in optimizer_state.items()}, str(tmp / OPTIMIZER),
                      metadata={"format": "pt"})
            state = {**trainer_state, "world_size": backend.world_size,
                     "versions": {"lrx": lrx.__version__, "torch": torch.__version__,
                                  "transformers": transformers.__version__}}
            (tmp / STATE).write_text(json.dumps(state, indent=2))
    except OSError as e:
        error = e
    failed = torch.tensor([1.0 if error else 0.0], device=backend.device)
    if backend.all_reduce_sum(failed).item() > 0:  # every process leaves the same way
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{error.strerror or error}" if error else "another process failed to write it"
        raise LrxError(f"cannot write checkpoint {final} ({reason}); free space or fix permissions of "
                       f"{root}; earlier checkpoints are intact")
    if backend.is_main:
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        if final.exists():  # the same step again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s written", final)
    backend.barrier()
    return final


def read_optimizer(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path / OPTIMIZER)


def read_rng(path: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """This process's random states, or None when the checkpoint had fewer processes."""
    file = path / f"rng-rank{rank}.safetensors"
    return read_safetensors(file) if file.is_file() else None


def adapter_dir(path: Path) -> Path:
    adapter = path / "adapter"
    if not (adapter / WEIGHTS_NAME).is_file():
        raise LrxError(f"{path}: adapter/{WEIGHTS_NAME} is missing; the checkpoint is incomplete")
    return adapter
