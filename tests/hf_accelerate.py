"""Launched by ``tests/test_hf.py`` under ``accelerate launch --num_processes 2`` with a config of
``configs/accelerate/``: the Trainer run of ``tests/hf_common.py`` on the model accelerate
placed. Rank 0 writes a JSON report: every rank's losses (its share of each step's loss) and
events, the placement lrx found and accelerate's distributed type."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.* when launched as a script

import torch.distributed as dist  # noqa: E402

from lrx.distributed.zero3 import without_shm_allreduce  # noqa: E402
from tests.dist_common import run  # noqa: E402
from tests.hf_common import hf_trainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        without_shm_allreduce()  # DeepSpeed's CPU inference all-reduce leaks /dev/shm (lrx.distributed.zero3)
    # No accelerate state before the Trainer's arguments make it (with a PartialState made first,
    # without use_cpu, the Trainer saw one process here). The tokenised data is in lrx's cache already.
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gpu = os.environ.get("LRX_HF_GPU") == "1"  # the lead's GPU check of the FSDP2 plugin (CPU in the suite)
    trainer, adapter, callback = hf_trainer(out / "run", rank=rank, world=world, use_cpu=not gpu)  # saves step 3
    mine = {"losses": trainer.losses, "rows_as_planned": trainer.rows == trainer.expected_rows,
            "events": callback.events, "kind": callback.placement.kind,
            "distributed_type": str(trainer.accelerator.distributed_type)}
    adapter.save(out / "adapter")
    # Killed after step 3: a fresh model, wrapped again, resumed from the Trainer's checkpoint.
    resumed, again, _ = hf_trainer(out / "run", rank=rank, world=world, resume=str(out / "run" / "checkpoint-3"),
                                   use_cpu=not gpu)
    mine["resumed_losses"] = resumed.losses
    again.save(out / "adapter_resumed")
    every = [None] * world
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(every))
    dist.barrier()


if __name__ == "__main__":
    run(main)
