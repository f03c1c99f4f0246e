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
crash leaves the previous checkpoints intact; the newest ``keep`` complete ones are kept (an
older one loses its ``COMPLETE`` marker before its files go). Only safetensors and JSON are
read back.

``CheckpointManager`` is the one owner of saving and resuming: it writes the parts (the
typed ``TrainingProgress``, the optimizer moments, the RNG states, the adapter with the
method state) and restores them in the order the run needs them: the progress file is
checked before anything slow, the adapter is restored layer by layer while the backend
builds the model (``saved_adapter``), the rest once the trainer exists (``restore``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

import lrx
from lrx import faults
from lrx.adapter import WEIGHTS_NAME, SavedAdapter, edit_logs, save_adapter
from lrx.diskspace import DiskFull, full_error, is_full, tensor_bytes
from lrx.errors import LrxError
from lrx.fileio import fsync_tree, read_json, read_safetensors, swap_in
from lrx.rundir import ended_early

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


@dataclass
class TrainingProgress:
    """Where a run stands: what ``trainer_state.json`` holds (torchtune's ``TrainingProgress``)."""

    step: int
    """Optimizer steps done."""
    micro: int
    """Micro-batches each process has consumed (the data position)."""
    global_micro_batch: int
    """Examples in one micro-batch over all processes (train.batch_size x processes)."""
    scheduler: dict
    """The LR scheduler's state_dict."""
    config: dict
    """The resolved config of the run."""
    world_size: int = 1
    versions: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, file: Path) -> "TrainingProgress":
        """Validate a progress file's content; LrxError naming the key otherwise."""
        if not isinstance(data, dict):
            raise LrxError(f"{file} is not a progress record (a JSON object); the checkpoint is corrupt")
        kinds = {"step": int, "micro": int, "global_micro_batch": int, "scheduler": dict, "config": dict,
                 "world_size": int, "versions": dict}
        optional = {"world_size", "versions"}
        for key, kind in kinds.items():
            if key not in data:
                if key in optional:
                    continue
                raise LrxError(f"{file} has no {key!r}; the checkpoint is corrupt or not lrx's: resume from another one")
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise LrxError(f"{file}: {key!r} is {value!r}, expected a {'non-negative integer' if kind is int else 'JSON object'}; "
                               "the checkpoint is corrupt: resume from another one")
        if data["global_micro_batch"] == 0:
            raise LrxError(f"{file}: 'global_micro_batch' is 0; the checkpoint is corrupt: resume from another one")
        return cls(**{k: data[k] for k in kinds if k in data})


def read_progress(path: Path) -> TrainingProgress:
    file = path / STATE
    if not file.is_file():
        raise LrxError(f"{path}: {STATE} is missing; the checkpoint is incomplete or not lrx's")
    return TrainingProgress.from_json(read_json(file, "the checkpoint is corrupt; resume from another one"), file)


def check_compatible(path: Path, config: dict[str, Any], built: bool = False,
                     progress: TrainingProgress | None = None) -> TrainingProgress:
    """The checkpoint's progress (``progress`` when already read), after checking it was made for
    the same model and method; ``built``: ``config`` is that of the built method, its filled-in
    settings compared too."""
    from lrx.methods import get_method_class, unfilled, without_retired_keys

    progress = progress or read_progress(path)
    saved = dict(progress.config)
    method = dict(saved.get("method", {}))
    if method.get("name") == config.get("method", {}).get("name"):  # keys retired since it was written
        config_cls = get_method_class(method["name"]).config_cls
        method = without_retired_keys(config_cls, method)
        if not built:
            method = unfilled(config_cls, method, config.get("method", {}))
    saved["method"] = method
    for section in MUST_MATCH:
        if saved.get(section) != config.get(section):
            diff = sorted(k for k in set(saved.get(section, {})) | set(config.get(section, {}))
                          if saved.get(section, {}).get(k) != config.get(section, {}).get(k))
            raise LrxError(f"{path} was made with other {section} settings ({', '.join(diff)} differ); "
                           f"resume with the run's own config or start a new run")
    return progress


def save_checkpoint(run_dir: Path, step: int, *, backend, model, method, progress: TrainingProgress,
                    optimizer_state: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                    meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` (collective: every process calls it).

    Args:
        run_dir: the run directory (shared by all processes).
        step: optimizer steps done.
        backend: the training backend (rank, barrier).
        model, method: the adapted model and its method.
        progress: the training progress to record.
        optimizer_state: whole optimizer tensors by name (taken on every rank, written by rank 0).
        params: the trained tensors, gathered whole (taken on every rank).
        meta: adapter metadata (base model, task ...).
        keep: how many complete checkpoints to keep (older ones are deleted).

    Raises:
        LrxError: the folder cannot be written (permissions, full disk); nothing earlier is lost.
    """
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    method_state = method.state_dict()  # collective
    logs = edit_logs(model, backend.gather, keep=backend.is_main)  # collective where logs are row-sharded
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
        faults.fire(f"checkpoint:{step}", backend.rank)  # tests: a full disk or a signal in the middle of a write
        if backend.is_main:
            save_adapter(tmp / "adapter", model, method, meta, method_state, params, logs)
            save_file({k: v.detach().cpu().contiguous() for k, v in optimizer_state.items()}, str(tmp / OPTIMIZER),
                      metadata={"format": "pt"})
            state = {**dataclasses.asdict(progress), "world_size": backend.world_size,
                     "versions": {"lrx": lrx.__version__, "torch": torch.__version__,
                                  "transformers": transformers.__version__}}
            (tmp / STATE).write_text(json.dumps(state, indent=2))
    except (OSError, DiskFull) as e:  # DiskFull: save_adapter's line; the checkpoint's names its folder
        error = getattr(e, "error", e)
    # Every process leaves the same way (waiting while the main one writes: the long timeout).
    if backend.any_rank(error is not None, slow=True):
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, error, tensor_bytes(optimizer_state, params, logs, method_state))
    if backend.is_main:
        fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        swap_in(tmp, final, remove=retire)  # final exists: the same step again (the end of a resumed run)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            retire(old)
        log.info("checkpoint %s written", final)
    backend.barrier()
    return final


def write_error(final: Path, error: OSError | None, needed: int) -> LrxError:
    """The one line for a checkpoint that could not be written (``error`` None: another process failed)."""
    intact = "earlier checkpoints are intact"
    if error is not None and is_full(error):
        return full_error(final.parent, needed, error, intact)
    reason = f"{error.strerror or error}" if error else "another process failed to write it"
    return LrxError(f"cannot write checkpoint {final} ({reason}); free space or fix permissions of {final.parent}; {intact}")


def retire(path: Path) -> None:
    """Delete a checkpoint: its COMPLETE marker first, so that one half deleted by a crash is
    never taken for a complete one."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


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


def kept_lines(file: Path, step: int) -> list[str]:
    """The lines of a JSONL log (metrics, events) up to ``step``: what a killed run logged
    after its checkpoint goes.

    Raises:
        LrxError: a line is not a JSON record with a step (the file was edited or cut).
    """
    if not file.is_file():
        return []
    kept = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            raise LrxError(f"{file}: line {number} is not a JSON record with a 'step'; remove or fix that line "
                           "and resume again") from None
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line)
    return kept


class CheckpointManager:
    """The one owner of a run's checkpoints: where they are, saving, and resuming.

    Args:
        run_dir: the run directory (shared by all processes).
        keep: how many complete checkpoints to keep.
        meta: adapter metadata written with every checkpoint's adapter (set once known).
    """

    LOGS = ("metrics.jsonl", "method_events.jsonl")

    def __init__(self, run_dir: str | Path, keep: int, meta: dict[str, Any] | None = None):
        self.run_dir, self.keep, self.meta = Path(run_dir), keep, meta or {}
        self.path: Path | None = None
        self.progress: TrainingProgress | None = None
        self.again = False  # --resume auto found a run that stopped before its first checkpoint

    def open(self, resume: str | None, config: dict[str, Any]) -> Path | None:
        """Pick the checkpoint to resume from (``train.resume``: auto, a folder, or None) and
        check its progress file and settings, before anything slow; None = a new run."""
        if not resume:
            return None
        self.path = resolve_resume(resume, self.run_dir)
        if self.path is None:
            self.again = ended_early(self.run_dir)
            if self.again:  # the runner replaces the run's files (as --overwrite would)
                log.warning("train.resume=auto: the run in %s stopped before its first checkpoint; starting it "
                            "again from step 0", self.run_dir)
            else:
                log.info("train.resume=auto: no complete checkpoint in %s; starting a new run", self.run_dir)
            return None
        self.progress = check_compatible(self.path, config)
        for name in self.LOGS:  # a corrupt line is refused now, not after the slow loading
            kept_lines(self.run_dir / name, self.progress.step)
        return self.path

    def confirm(self, config: dict[str, Any]) -> None:
        """Check the settings again once the method is built and has filled in its own (a basis's
        sha256: the same basis file as the checkpoint's run)."""
        if self.path is not None:
            check_compatible(self.path, config, built=True, progress=self.progress)  # read once, at open

    def saved_adapter(self) -> SavedAdapter | None:
        """The checkpoint's adapter, restored layer by layer while the backend builds the model."""
        return SavedAdapter(adapter_dir(self.path)) if self.path is not None else None

    def save(self, trainer) -> Path:
        """Write a checkpoint of the trainer's current step (collective)."""
        backend = trainer.backend
        progress = TrainingProgress(
            step=trainer.step, micro=trainer.micro, global_micro_batch=trainer.cfg.train.batch_size * backend.world_size,
            scheduler=trainer.scheduler.state_dict(), config=trainer.cfg.to_dict())
        return save_checkpoint(
            self.run_dir, trainer.step, backend=backend, model=trainer.module, method=trainer.method,
            progress=progress, optimizer_state=backend.optimizer_state(trainer.params, trainer.optimizer),
            params=backend.gather(dict(trainer.method.trainable_parameters(trainer.module))),
            meta=self.meta, keep=self.keep)

    def restore(self, trainer, saved: SavedAdapter) -> None:
        """Continue from the opened checkpoint (its adapter is in the model already): the method
        state, optimizer moments (resharded), LR schedule, data position and random states; the
        run's logs lose what was logged after the checkpoint.

        Raises:
            LrxError: the checkpoint is at or past the run's last step, or its data position is
                not a whole number of this run's global batches.
        """
        path, progress, backend = self.path, self.progress, trainer.backend
        if progress.step >= trainer.total_steps:
            raise LrxError(f"{path} is at step {progress.step} and this run has {trainer.total_steps} steps: nothing "
                           "is left to train; raise train.max_steps (or train.epochs) to continue it")
        samples = progress.micro * progress.global_micro_batch
        global_micro = trainer.cfg.train.batch_size * backend.world_size
        if samples % global_micro:
            raise LrxError(f"{path}: the run consumed {samples} examples per process group, which is not a whole "
                           f"number of batches of {global_micro} (train.batch_size x processes); keep the global batch")
        saved.restore_method_state(trainer.method)
        trainer.step, trainer.micro = progress.step, samples // global_micro
        backend.load_optimizer_state(trainer.params, trainer.optimizer, read_optimizer(path), trainer.step)
        trainer.scheduler.load_state_dict(progress.scheduler)
        for group, lr in zip(trainer.optimizer.param_groups, trainer.scheduler.get_last_lr()):
            group["lr"] = lr
        rng = read_rng(path, backend.rank)
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and trainer.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], trainer.device)
        trainer.resumed = True
        log.info("resumed from %s at step %d", path, trainer.step)

    def rewind_logs(self) -> None:
        """Drop what an interrupted run logged after the checkpoint (the main process, once the
        run really continues)."""
        if self.progress is not None:
            for name in self.LOGS:
                file = self.run_dir / name
                if file.is_file():
                    file.write_text("".join(x + "\n" for x in kept_lines(file, self.progress.step)))
