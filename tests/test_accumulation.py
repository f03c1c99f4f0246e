"""Gradient accumulation under FSDP2: one reduce-scatter per step, not per micro-batch."""

from __future__ import annotations

import json

import pytest

from lrx.cli import main
from tests.conftest import REPO, sharded_runs
from tests.test_cli import TINY_LM
from tests.test_distributed import losses

pytestmark = pytest.mark.distributed

SRLORA = ["--method", "srlora", *TINY_LM, "train.max_steps=6", "method.r=4", "method.r_target=8",
          "data.eval_path=none", "train.log_every=1"]


@sharded_runs
def accumulation_args(root, backend: str) -> dict:
    """2 processes x 4 micro-batches of 1 on FSDP2, its reduce-scatters counted per step (made in the
    ``sharded`` launch of FSDP2, tests/train_many.py)."""
    if backend != "fsdp2":
        return {}
    argv = [str(REPO / "launch" / "train.py"), *SRLORA, "train.batch_size=1", "train.grad_accum=4",
            "distributed.backend=fsdp2", f"logging.output_dir={root / 'fsdp2'}"]
    return {"accumulation": (argv, {"count_reduce_scatters": str(root / "counts.json")})}


def test_fsdp2_accumulates_without_a_reduce_scatter_per_micro_batch(tmp_path, sharded):
    """2 processes x 4 micro-batches of 1 with prompt masking (uneven label tokens) and 2 SRLoRA
    events: FSDP2 reduce-scatters each step's gradients once (set_requires_gradient_sync), the
    importance reads the accumulated gradient, and the losses are one process's on batches of 8."""
    run, out = sharded("fsdp2", "accumulation")
    counts = out.parent / "counts.json"
    assert run.returncode == 0, run.stderr[-3000:]
    per_step = json.loads(counts.read_text())["per_step"]
    assert len(per_step) == 6 and max(per_step) <= 3  # one per FSDP group (2 blocks + root), not 4 x 3
    single = tmp_path / "single"
    assert main([*SRLORA, "train.batch_size=8", "train.grad_accum=1", f"logging.output_dir={single}"]) == 0
    assert losses(out) == pytest.approx(losses(single), abs=1e-5)
    events = [[json.loads(x)["fused_pairs"] for x in (d / "method_events.jsonl").read_text().splitlines()]
              for d in (out, single)]
    assert events[0] == events[1]
