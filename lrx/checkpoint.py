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

``CheckpointManager`` is the one owner of saving and resuming, over Stateful parts (as
torchtitan's): the trainer (``Trainer.state_dict``: step, data position, LR schedule; the
typed ``TrainingProgress``), the method (its state, inside the adapter), the optimizer
(``Moments``) and the random states (``RandomState``). It only saves and loads those: the
progress file is checked before anything slow, the adapter is restored layer by layer while
the backend builds the model (``saved_adapter``), the rest once the trainer exists (``load``).
Its final mode (``save(trainer, final=True)``) writes the run's adapter through
``save_final_adapter``, the save ``lrx.Adapter.save`` uses too.
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
from lrx.adapter import WEIGHTS_NAME, SavedAdapter, edit_logs, export_peft_from_adapter, save_adapter
from lrx.diskspace import DiskFull, full_error, is_full, tensor_bytes
from lrx.errors import LrxError
from lrx.fileio import fsync_tree, read_json, read_safetensors, swap_in
from lrx.rundir import claim_run_dir, ended_early

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


class RandomState:
    """This process's random states (torch's CPU generator and, on a GPU, its CUDA one): a
    Stateful part, one file per process."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def load_state_dict(self, rng: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


class Moments:
    """Adam's moments of the trainer's trained tensors, whole and keyed by parameter name (a
    collective to take: gathered from the shards), resharded on load at the trainer's step: a
    Stateful part over the backend's optimizer I/O."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.trainer.backend.optimizer_state(self.trainer.params, self.trainer.optimizer)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        t = self.trainer
        t.backend.load_optimizer_state(t.params, t.optimizer, tensors, t.step)


@dataclass
class AdapterSnapshot:
    """An adapter taken whole for writing: the method state, the trained tensors and the edit
    logs (``take`` is collective where the model is sharded: every process takes it; only the
    one that writes keeps the logs), written by ``write`` in lrx's format (+ a peft export)."""

    model: torch.nn.Module
    method: Any
    state: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    logs: dict[str, torch.Tensor]

    @classmethod
    def take(cls, model, method, gather, keep: bool = True) -> "AdapterSnapshot":
        state = method.state_dict()  # collective
        params = gather(dict(method.trainable_parameters(model)))
        return cls(model, method, state, params, edit_logs(model, gather, keep=keep))  # logs: collective when row-sharded

    def write(self, path: Path, meta: dict[str, Any], peft: Path | None = None) -> Path:
        save_adapter(path, self.model, self.method, meta, self.state, self.params, self.logs)
        if peft is not None:
            export_peft_from_adapter(path, peft)
        return Path(path)


def save_final_adapter(path: str | Path, model, method, meta: dict[str, Any], gather, is_main: bool,
                       peft: str | Path | None = None) -> Path:
    """The one save of a finished adapter (``CheckpointManager.save(final=True)``, ``lrx.Adapter.save``):
    taken whole by every process (collective when sharded), written by the main one, atomically,
    with a peft export at ``peft`` when given."""
    snapshot = AdapterSnapshot.take(model, method, gather, keep=is_main)
    if is_main:
        snapshot.write(Path(path), meta, None if peft is None else Path(peft))
    return Path(path)


def save_checkpoint(run_dir: Path, step: int, *, backend, adapter: AdapterSnapshot, progress: TrainingProgress,
                    moments: dict[str, torch.Tensor], rng: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint ``step`` from the parts' states, taken on every process (collective:
    every process calls it; the main one writes all but its own random states).

    Args:
        run_dir: the run directory (shared by all processes).
        step: optimizer steps done.
        backend: the training backend (rank, barrier).
        adapter: the adapter with the method state (``AdapterSnapshot.take``).
        progress: the training progress to record.
        moments: whole optimizer tensors by name (``Moments``).
        rng: this process's random states (``RandomState``).
        meta: adapter metadata (base model, task ...).
        keep: how many complete checkpoints to keep (older ones are deleted).

    Raises:
        LrxError: the folder cannot be written (permissions, full disk); nothing earlier is lost.
    """
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    error = None
    try:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crash
            tmp.mkdir(parents=True)
        backend.barrier()
        save_file(rng, str(tmp / f"rng-rank{backend.rank}.safetensors"))
        faults.fire(f"checkpoint:{step}", backend.rank)  # tests: a full disk or a signal in the middle of a write
        if backend.is_main:
            adapter.write(tmp / "adapter", meta)
            save_file({k: v.detach().cpu().contiguous() for k, v in moments.items()}, str(tmp / OPTIMIZER),
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
        raise write_error(final, error, tensor_bytes(moments, adapter.params, adapter.logs, adapter.state))
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
        self.saved: SavedAdapter | None = None
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

    def saved_adapter(self, config: dict[str, Any]) -> SavedAdapter | None:
        """The checkpoint's adapter, restored layer by layer while the backend builds the model,
        after its settings are checked again against ``config``, the built method's (which has
        filled in its own: a basis's sha256 must be the checkpoint's); None for a new run."""
        if self.path is None:
            return None
        check_compatible(self.path, config, built=True, progress=self.progress)  # read once, at open
        self.saved = SavedAdapter(adapter_dir(self.path))
        return self.saved

    def save(self, trainer, final: bool = False) -> Path:
        """Write a checkpoint of the trainer's parts at its current step (collective); ``final``:
        the run's adapter instead, ``RUN/adapter`` and its peft export ``RUN/adapter_peft``."""
        backend = trainer.backend
        if final:
            path = save_final_adapter(self.run_dir / "adapter", trainer.module, trainer.method, self.meta,
                                      backend.gather, backend.is_main, peft=self.run_dir / "adapter_peft")
            backend.barrier()
            return path
        return save_checkpoint(
            self.run_dir, trainer.step, backend=backend, keep=self.keep, meta=self.meta,
            adapter=AdapterSnapshot.take(trainer.module, trainer.method, backend.gather, keep=backend.is_main),
            progress=TrainingProgress(**trainer.state_dict(), config=trainer.cfg.to_dict()),
            moments=Moments(trainer).state_dict(), rng=RandomState(backend.device).state_dict())

    def load(self, trainer) -> None:
        """Continue from the opened checkpoint, whose adapter the build restored (nothing for a
        new run): the trainer's state (step, data position, LR schedule), the method state
        (after attach), the optimizer moments (resharded) and the random states.

        Raises:
            LrxError: the checkpoint is at or past the run's last step, or its data position is
                not a whole number of this run's global batches.
        """
        if self.path is None:
            return
        path, progress = self.path, self.progress
        try:
            trainer.load_state_dict({k: getattr(progress, k) for k in ("step", "micro", "global_micro_batch", "scheduler")})
        except LrxError as e:
            raise LrxError(f"{path}: {e}") from None
        self.saved.restore_method_state(trainer.method)
        Moments(trainer).load_state_dict(read_optimizer(path))
        rng = read_rng(path, trainer.backend.rank)
        if rng is not None:
            RandomState(trainer.device).load_state_dict(rng)
        log.info("resumed from %s at step %d", path, progress.step)

    def claim(self, overwrite: bool) -> Path:
        """Make the run folder this run's (the main process, once everything is checked: see
        ``lrx.rundir.claim_run_dir``); resuming, its logs lose what was logged after the checkpoint."""
        run_dir = claim_run_dir(self.run_dir, overwrite, self.path)
        self.rewind_logs()
        return run_dir

    def rewind_logs(self) -> None:
        """Drop what an interrupted run logged after the checkpoint (the main process, once the
        run really continues)."""
        if self.progress is not None:
            for name in self.LOGS:
                file = self.run_dir / name
                if file.is_file():
                    file.write_text("".join(x + "\n" for x in kept_lines(file, self.progress.step)))
