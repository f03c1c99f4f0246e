"""Which examples each process trains and evaluates on, and where the training data stands.

``ShardedBatches`` cuts every epoch's seeded permutation into global batches, each process its
slice; ``DataPosition`` counts the micro-batches consumed (a Stateful part of the trainer: a
checkpoint's ``micro`` and ``global_micro_batch``, so a run resumes on another number of
processes); ``EvalShard`` is one process's block of the evaluation set.
"""

from __future__ import annotations

import math

import torch

from lrx.errors import LrxError


class ShardedBatches(torch.utils.data.Sampler):
    """Batches of example indices for one process: every epoch a seeded permutation is cut
    into global batches of ``batch_size * world_size``, and process ``rank`` takes its slice,
    so the union of the ranks' batches is exactly the single-process batch.

    With several processes an incomplete last global batch is dropped: every process must
    run the same number of steps (sharded training steps are collective).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # global batches of this epoch to skip (a resumed run's data position)

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        return math.ceil(self.n / global_batch) if self.world_size == 1 else self.n // global_batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start, len(self)):
            start = b * global_batch + self.rank * self.batch_size
            yield perm[start : min(start + self.batch_size, self.n)]


def planned_steps(tc, n_examples: int, world_size: int = 1) -> int:
    """Optimizer steps a run takes on ``n_examples`` training rows (``Trainer.total_steps``),
    known before the trainer exists so a schedule is checked before anything is written.

    Raises:
        LrxError: not one batch of training data.
    """
    batches = len(ShardedBatches(n_examples, tc.batch_size, tc.seed, 0, world_size))
    if batches == 0:
        raise LrxError("the training set is empty; check data.train_path and data.max_train_samples")
    return tc.max_steps or math.ceil(max(1, batches // tc.grad_accum) * tc.epochs)


class DataPosition:
    """Micro-batches this process has consumed (``micro``) of a loader over ``ShardedBatches``:
    ``batches()`` yields them forever, epoch after epoch (the order reseeded per epoch), from
    the current position. Stateful: saved as ``micro`` and ``global_micro_batch`` (examples in
    one micro-batch over all processes), loaded on any number of processes that keeps the
    global batch."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: ShardedBatches):
        self.loader, self.sampler = loader, sampler
        self.micro = 0

    @property
    def global_micro_batch(self) -> int:
        return self.sampler.batch_size * self.sampler.world_size

    def state_dict(self) -> dict[str, int]:
        return {"micro": self.micro, "global_micro_batch": self.global_micro_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Raises LrxError when the examples consumed are not a whole number of this run's
        global micro-batches."""
        samples = state["micro"] * state["global_micro_batch"]
        if samples % self.global_micro_batch:
            raise LrxError(f"the run consumed {samples} examples per process group, which is not a whole number of "
                           f"batches of {self.global_micro_batch} (train.batch_size x processes); keep the global batch")
        self.micro = samples // self.global_micro_batch

    def batches(self):
        """Micro-batches forever from the position (``micro`` counts what the caller took)."""
        epoch, self.sampler.start = divmod(self.micro, len(self.loader))
        while True:
            self.sampler.epoch = epoch
            yield from self.loader
            self.sampler.start = 0
            epoch += 1


class EvalShard(torch.utils.data.Sampler):
    """This process's part of the evaluation set: a contiguous block of ``ceil(n / world)``
    examples, in batches; every process runs the same number of batches (sharded forwards are
    collective), the last ones padded with repeats of the block's first example, which
    ``real`` leaves out of the metrics."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.block = n, math.ceil(n / world_size)
        self.start = min(rank * self.block, n)
        self.end = min(self.start + self.block, n)
        self.batches = []
        for first in range(0, self.block, batch_size):
            real = list(range(self.start + first, min(self.start + first + batch_size, self.end)))
            pad = min(batch_size, self.block - first) - len(real)
            self.batches.append((real + [min(self.start, n - 1)] * pad, len(real)))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return (indices for indices, _ in self.batches)
