"""The learning rate over a run: warm-up and decay (transformers' schedules) or the plateau
factor of ``train.schedule=plateau``, as one Stateful part of the trainer (``LRSchedule``).

The scheduler that steps may be rebuilt by a backend (ZeRO-3 with an optimizer in its DeepSpeed
config rebuilds the ``LambdaLR`` on DeepSpeed's optimizer, sharing the ``Plateau``): ``use`` takes
the optimizer and scheduler that really step, and state is saved and loaded through them.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler


class Plateau:
    """The learning-rate factor of ``train.schedule=plateau``, as the lambda of a ``LambdaLR``:
    linear warm-up, then ``scale``, which ``observe`` multiplies by ``factor`` once the watched
    value has not improved for more than ``patience`` evaluations (torch's ``ReduceLROnPlateau``
    rule, relative threshold 1e-4, no cooldown). A callable object, not a function: a
    ``LambdaLR``'s state then holds it (``scale``, ``best``, ``bad``), so a checkpoint's scheduler
    state resumes it, and ZeRO-3's rebuilt ``LambdaLR`` shares it."""

    THRESHOLD = 1e-4

    def __init__(self, warmup: int, factor: float, patience: int, lower_is_better: bool):
        self.warmup, self.factor, self.patience, self.lower = warmup, factor, patience, lower_is_better
        self.scale = 1.0
        self.best: float | None = None  # None until the first evaluation (JSON-safe, unlike infinity)
        self.bad = 0  # evaluations since the last improvement

    def __call__(self, step: int) -> float:
        return (step / max(1, self.warmup) if step < self.warmup else 1.0) * self.scale

    def observe(self, value: float) -> bool:
        """Take one evaluation's value; True when it lowers the learning rate."""
        better = self.best is None or (value < self.best * (1 - self.THRESHOLD) if self.lower
                                       else value > self.best * (1 + self.THRESHOLD))
        if better:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad <= self.patience:
            return False
        self.scale *= self.factor
        self.bad = 0
        return True


class LRSchedule:
    """The run's LR scheduler (``train.schedule``, ``warmup_steps`` / ``warmup_ratio``) on
    ``optimizer`` for ``total_steps``; ``lower_is_better`` (plateau only): whether the watched
    metric improves downwards. Stateful: ``state_dict`` is the scheduler's (what
    ``trainer_state.json`` holds as ``scheduler``); ``load_state_dict`` also sets the optimizer's
    learning rates to the resumed ones."""

    def __init__(self, tc, optimizer: torch.optim.Optimizer, total_steps: int, lower_is_better: bool = True):
        warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * total_steps)
        self.plateau = None
        if tc.schedule == "plateau":
            self.plateau = Plateau(warmup, tc.plateau_factor, tc.plateau_patience, lower_is_better)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.plateau)
        else:
            scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        self.use(optimizer, scheduler)

    def use(self, optimizer, scheduler) -> None:
        """Step through these (a backend's rebuilt optimizer and scheduler) from now on."""
        self.optimizer, self.scheduler = optimizer, scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def observe(self, value: float) -> list[float] | None:
        """After an evaluation (plateau only): take its value and, when that lowers the learning
        rate, give the optimizer the new rates at once (``get_last_lr`` reports them, which is
        what a checkpoint resumes with); returns them, or None when nothing changed."""
        if self.plateau is None or not self.plateau.observe(value):
            return None
        lrs = [base * self.plateau(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs  # what LRScheduler.step sets; no public setter
        return lrs
