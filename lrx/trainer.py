"""The training loop: AdamW, warm-up + decay (or ReduceLROnPlateau), accumulation, clipping, periodic eval, logging.

The trainer knows nothing about method names: it calls the method's hooks (after the
gradients of a step are complete, after the optimizer step) and trains whatever
``method.trainable_parameters`` yields. The host waits for the device only at logging and
evaluation points: losses and token counts are accumulated as device tensors in between.

The trainer is a Stateful part of its checkpoints (``state_dict`` / ``load_state_dict``: the
step, the data position ``lrx.data.sampling.DataPosition`` and the LR schedule ``lrx.lr.LRSchedule``);
``lrx.checkpoint.CheckpointManager`` saves and loads it with the method, optimizer and random states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lrx import faults
from lrx.config import RunConfig
from lrx.data.collate import IGNORE_INDEX, batch_tokens
from lrx.data.sampling import DataPosition, EvalShard, ShardedBatches, planned_steps
from lrx.errors import LrxError
from lrx.loss import causal_lm_ce_sum, label_tokens
from lrx.lr import LRSchedule
from lrx.methods import Method
from lrx.metrics import compute_metrics
from lrx.speed import keep_dequantized_weights
from lrx.stop import Stopped

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSONL metrics file plus optional TensorBoard scalars (main process only)."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = tensorboard and enabled
        self.writer = None

    def _open_writer(self) -> None:
        """TensorBoard's writer makes its folder: only once something is logged."""
        self.tensorboard = False
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")
        else:
            self.writer = SummaryWriter(str(self.path.parent / "tb"))

    def write(self, split: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tensorboard:
            self._open_writer()
        with self.path.open("a") as f:
            f.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def write_events(self, step: int, records: list[dict]) -> None:
        if not self.enabled:
            return
        with (self.path.parent / "method_events.jsonl").open("a") as f:
            for record in records:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(train: list[dict], evals: list[dict], path: Path) -> None:
    """Training (and evaluation) loss against optimizer steps, as a PNG."""
    if not train:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    # As transformers' Trainer: no weight decay on biases and norm weights (1-D tensors).
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty groups: DeepSpeed drops them from its optimizer, and an LR scheduler built on
    # the client optimizer then no longer matches its groups.
    return [g for g in groups if g["params"]]


class Trainer:
    """The training loop for every backend (one device, FSDP2, ZeRO-3).

    Args:
        config: the resolved run config.
        model: the adapted model, already placed or sharded by ``backend``.
        method: the method that adapted it.
        train_data, eval_data: tokenized datasets (``eval_data`` may be None).
        collate_fn: batches examples into padded tensors.
        task: ``causal_lm``, ``classification`` or ``regression``.
        metric_names: metrics computed at evaluation (classification/regression).
        device: where the model lives.
        run_dir: where metrics are written (by the main process only).
        backend: how batches are split, backward and steps run; default: one device.
        checkpoints: writes the run's checkpoints (``train.save_every`` and the last step);
            None = none are written.
        callbacks: ``callback(trainer)`` after every optimizer step, once its logging,
            evaluation and checkpoint are done (e.g. a test's fault injection).
        stop: a ``lrx.stop.StopRequest``: after every step (but the last) the processes agree
            whether any was asked to stop; if so, a checkpoint and ``Stopped``.
    """

    def __init__(
        self, config: RunConfig, model: nn.Module, method: Method, train_data, eval_data, collate_fn,
        task: str, metric_names: list[str], device: torch.device, run_dir: Path, backend=None,
        checkpoints=None, callbacks=(), stop=None,
    ):
        self.cfg = config
        self.model = model
        self.method = method
        self.task = task
        self.metric_names = metric_names
        self.device = device
        self.run_dir = run_dir
        tc = config.train
        if backend is None:
            from lrx.distributed import SingleDevice

            backend = SingleDevice(str(device))
        self.backend = backend
        self.is_main = backend.is_main
        rank, world = backend.rank, backend.world_size
        self.sampler = ShardedBatches(len(train_data), tc.batch_size, tc.seed, rank, world)
        self.train_loader = DataLoader(train_data, batch_sampler=self.sampler, collate_fn=collate_fn)
        self.eval_loader = None
        if eval_data is not None and len(eval_data):
            self.eval_shard = EvalShard(len(eval_data), tc.eval_batch_size, rank, world)
            self.eval_loader = DataLoader(eval_data, batch_sampler=self.eval_shard, collate_fn=collate_fn)
        if len(self.train_loader) == 0:
            raise LrxError("the training set is empty; check data.train_path and data.max_train_samples")
        self.steps_per_epoch = max(1, len(self.train_loader) // tc.grad_accum)
        self.total_steps = planned_steps(tc, len(train_data), world)
        self.params = list(method.trainable_parameters(model))
        self.optimizer = torch.optim.AdamW(
            _decay_groups(self.params, tc.weight_decay), lr=tc.lr, betas=tuple(tc.adam_betas)
        )
        self.schedule = LRSchedule(tc, self.optimizer, self.total_steps, self._lower_is_better(tc, task, metric_names))
        self.module = model  # the adapted model itself: what method hooks see
        self.model = backend.setup(model, self.optimizer, self.schedule.scheduler, micro_batch=tc.batch_size,
                                   grad_accum=tc.grad_accum, max_grad_norm=tc.max_grad_norm)  # what runs batches
        # What steps: these, or (ZeRO-3 with an optimizer in its DeepSpeed config) what DeepSpeed built.
        self.optimizer, self.scheduler = backend.optimizer, backend.scheduler
        keep_dequantized_weights(model)  # quantized layers of checkpointed blocks: 2 dequantizes a step, not 3
        self.schedule.use(self.optimizer, self.scheduler)
        bf16 = tc.bf16 and device.type == "cuda"
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        # This rank's pieces, now that they exist; with the forward in bf16, edit logs go to the host.
        method.attach(self.module, backend.shards(), torch.bfloat16 if bf16 else None)
        self.metrics = MetricsLog(run_dir, config.logging.tensorboard, enabled=self.is_main)
        self.step = 0
        self.data = DataPosition(self.train_loader, self.sampler)  # the micro-batches consumed
        self.history: list[dict[str, float]] = []
        self.checkpoints, self.callbacks, self.stop = checkpoints, list(callbacks), stop
        self.resumed = False

    def _lower_is_better(self, tc, task: str, metric_names: list[str]) -> bool:
        """Whether the plateau schedule's metric improves downwards, once the run is known to
        evaluate what it watches (True for other schedules)."""
        if tc.schedule != "plateau":
            return True
        if self.eval_loader is None:
            raise LrxError("train.schedule=plateau lowers the learning rate on evaluation results and the "
                           "evaluation set is empty; check data.eval_path and data.max_eval_samples")
        watchable = ["eval_loss", *(["perplexity"] if task == "causal_lm" else metric_names)]
        if tc.plateau_metric not in watchable:
            raise LrxError(f"train.plateau_metric={tc.plateau_metric} is not computed by this run's evaluation; "
                           f"choose one of {', '.join(watchable)}")
        return tc.plateau_metric in ("eval_loss", "perplexity")

    def state_dict(self) -> dict:
        """Where training stands (Stateful; ``trainer_state.json`` holds it): optimizer steps
        done, the data position and the LR schedule."""
        return {"step": self.step, **self.data.state_dict(), "scheduler": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (as ``state_dict`` gave it, from a run with any number of
        processes and the same global batch).

        Raises:
            LrxError: the state is at or past this run's last step, or its data position is not a
                whole number of this run's global micro-batches.
        """
        if state["step"] >= self.total_steps:
            raise LrxError(f"the checkpoint is at step {state['step']} and this run has {self.total_steps} steps: "
                           "nothing is left to train; raise train.max_steps (or train.epochs) to continue it")
        self.data.load_state_dict(state)
        self.step = state["step"]
        self.schedule.load_state_dict(state["scheduler"])
        self.resumed = True

    def _observe(self, record: dict[str, float]) -> None:
        """After an evaluation: the plateau schedule takes its value (and may lower the rate)."""
        metric = self.cfg.train.plateau_metric
        lrs = self.schedule.observe(record[metric]) if self.schedule.plateau is not None else None
        if lrs is not None and self.is_main:
            p = self.schedule.plateau
            log.info("step %d: %s %.4g has not improved on %.4g for %d evaluations; learning rate x %g -> %.3g",
                     self.step, metric, record[metric], p.best, p.patience + 1, p.factor, lrs[0])

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def fit(self) -> list[dict[str, float]]:
        """Train for ``total_steps`` optimizer steps; returns the evaluation records."""
        tc = self.cfg.train
        self.model.train()
        eval_every = tc.eval_every or self.steps_per_epoch
        evals = []
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device, dtype=torch.long)
        t_log = time.perf_counter()
        self.method.on_train_start(self.module, self.optimizer, self.total_steps)
        if self.eval_loader is not None and tc.eval_at_start and not self.resumed:
            evals.append(self.evaluate())
            self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.cfg.logging.progress and self.is_main))
        batches = self.data.batches()
        while self.step < self.total_steps:
            step_batches = [self._to_device(next(batches)) for _ in range(tc.grad_accum)]
            divisor = self._loss_divisor(step_batches)
            for i, batch in enumerate(step_batches):
                with self.autocast:
                    share = self._loss_share(batch, divisor)
                # Backends average gradients over processes: scale the share of the step's loss back up.
                self.backend.backward(share * self.backend.world_size, sync=i == len(step_batches) - 1)
                loss_sum += share.detach()
                tokens += batch_tokens(batch)
                self.data.micro += 1
            self.method.after_backward(self.module, self.step)
            faults.fire(f"step:{self.step + 1}", self.backend.rank)  # tests only (LRX_FAULT)
            self.backend.step(self.optimizer, self.scheduler, [p for _, p in self.params], tc.max_grad_norm)
            self.step += 1
            records = self.method.after_optimizer_step(self.module, self.optimizer, self.step)
            if records:
                self.metrics.write_events(self.step, records)
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == self.total_steps:
                self._log_train(loss_sum, tokens, time.perf_counter() - t_log, bar)
                t_log = time.perf_counter()
            if self.eval_loader is not None and (self.step % eval_every == 0 or self.step == self.total_steps):
                if not evals or evals[-1]["step"] != self.step:
                    evals.append(self.evaluate())
                    self._observe(evals[-1])
                    self.model.train()
            saved = None
            if self.checkpoints is not None and (self.step == self.total_steps or
                                                 (tc.save_every and self.step % tc.save_every == 0)):
                saved = self.checkpoints.save(self)
            for callback in self.callbacks:
                callback(self)
            if self.stop is not None and self.step < self.total_steps:
                self._stop_if_asked(saved)
        bar.close()
        self.metrics.close()
        if self.is_main:
            self.method.on_train_end(self.module, self.run_dir)
            plot_history(self.history, evals, self.run_dir / "loss.png")
        self.backend.barrier()  # the others wait for the plots with the file-writing timeout
        return evals

    def _stop_if_asked(self, saved: Path | None) -> None:
        """After a step, one collective: if any process was asked to stop, all write a complete
        checkpoint of this step (unless it was just written) and raise ``Stopped``."""
        reason = self.stop.agreed(self.backend)
        if reason is not None:
            path = saved or self.checkpoints.save(self)
            self.metrics.close()
            raise Stopped(self.step, path, reason, main=self.is_main)

    def _loss_divisor(self, step_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | float:
        """What one optimizer step's loss is divided by. Causal LM: its label tokens on all
        processes and micro-batches, so the loss is the token mean one process computes over the
        whole global batch (counted before the step's first backward; one small all-reduce per
        step with several processes). Otherwise: examples are means already,
        and equal-sized batches make the step's loss the mean of micro-batches and processes."""
        world = self.backend.world_size
        if self.task != "causal_lm":
            return float(len(step_batches) * world)
        # Counted on the device (the batches are there already): no host sync; a step of prompts only gives 0.
        count = sum(label_tokens(b["labels"]) for b in step_batches)
        if world > 1:
            count = self.backend.all_reduce_sum(count)
        return count.clamp_min(1).float()

    def _loss_share(self, batch: dict[str, torch.Tensor], divisor: torch.Tensor | float) -> torch.Tensor:
        """This micro-batch's part of the step's loss (the parts of all micro-batches and
        processes sum to it): causal LM, the sum of its label tokens' cross-entropy (fp32, as
        transformers computes it) over ``divisor``; otherwise its mean loss over ``divisor``."""
        if self.task != "causal_lm":
            return self.model(**batch).loss / divisor
        return causal_lm_ce_sum(self.model, self.module, batch) / divisor

    def _gather_eval(self, local: torch.Tensor) -> torch.Tensor:
        """The whole evaluation set's values from each process's block (x + 0 == x: exact)."""
        if self.backend.world_size == 1:
            return local
        shard = self.eval_shard
        whole = torch.zeros(shard.n, dtype=torch.float64, device=local.device)
        whole[shard.start : shard.end] = local.double()
        return self.backend.all_reduce_sum(whole).to(local.dtype)

    def _log_train(self, loss_sum: torch.Tensor, tokens: torch.Tensor, elapsed: float, bar) -> None:
        """Log the interval's mean loss, learning rate and throughput (the one host sync of
        training), then zero the accumulators."""
        tc = self.cfg.train
        n_steps = tc.log_every if self.step % tc.log_every == 0 else self.step % tc.log_every
        loss, count = loss_sum, tokens  # loss_sum: each step's share of this process (they sum to the step's loss)
        if self.backend.world_size > 1:
            loss = self.backend.all_reduce_sum(loss_sum)
            count = self.backend.all_reduce_sum(tokens)
        record = {
            "loss": loss.item() / n_steps,  # the host waits for the device here only
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": count.item() / max(elapsed, 1e-9),
            "step_s": elapsed / n_steps,
        }
        if not math.isfinite(record["loss"]):
            raise LrxError(
                f"training loss became {record['loss']} by step {self.step}; lower train.lr or "
                "check the data (no adapter was saved)"
            )
        self.metrics.write("train", self.step, record)
        self.history.append({"step": self.step, **record})
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if bar.disable and self.is_main:  # no bar (batch jobs): one log line per interval
            log.info("step %d/%d loss %.4f lr %.3g tokens/s %.0f", self.step, self.total_steps,
                     record["loss"], record["lr"], record["tokens_per_s"])
        loss_sum.zero_()
        tokens.zero_()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Evaluation loss and task metrics on the eval set, each process evaluating its block
        (``EvalShard``); logged and returned, identical on every process and equal to one
        process's (sums of losses are all-reduced; predictions are gathered whole before the
        metrics, which are not means of per-process values: F1, Matthews, Pearson)."""
        if self.eval_loader is None:
            return {}
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss sum, its weight
        preds, labels = [], []
        for batch, (_, real) in zip(self.eval_loader, self.eval_shard.batches):
            batch = self._to_device(batch)
            if self.task == "causal_lm":  # a token-level mean over the label tokens (fused: no logits)
                target = batch["labels"].masked_fill(torch.arange(len(batch["labels"]), device=self.device)[:, None]
                                                     >= real, IGNORE_INDEX)  # the padding rows score nothing
                with self.autocast:
                    sums[0] += causal_lm_ce_sum(self.model, self.module, {**batch, "labels": target}).double()
                sums[1] += label_tokens(target)
                continue
            with self.autocast:
                logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()[:real]
            target = batch["labels"][:real]
            pred = logits.squeeze(-1) if self.task == "regression" else logits.argmax(-1)
            loss = F.mse_loss(pred, target.to(pred.dtype), reduction="sum") if self.task == "regression" else \
                F.cross_entropy(logits, target, reduction="sum")
            sums += torch.stack([loss.double(), torch.tensor(real, dtype=torch.float64, device=self.device)])
            preds.append(pred)
            labels.append(target)
        if self.backend.world_size > 1:
            sums = self.backend.all_reduce_sum(sums)
        record = {"eval_loss": (sums[0] / sums[1].clamp_min(1)).item()}
        if self.task == "causal_lm":
            record["perplexity"] = math.exp(min(record["eval_loss"], 50.0))
        else:
            pred, label = (self._gather_eval(torch.cat(t)) for t in (preds, labels))
            record.update(compute_metrics(self.metric_names, pred.cpu(), label.cpu()))
        self.metrics.write("eval", self.step, record)
        if self.is_main:
            split = f" ({self.eval_shard.block} of {self.eval_shard.n} examples on each of {self.backend.world_size} " \
                "processes)" if self.backend.world_size > 1 else ""
            log.info("eval at step %d%s: %s", self.step, split, ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
        return {"step": self.step, **record}
