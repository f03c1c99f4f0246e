"""``launch/train.py`` counting FSDP2's gradient reduce-scatters per optimizer step (for the
accumulation test): rank 0 writes ``{"per_step": [...]}`` to the file given first. A run of
tests/train_many.py with ``"count_reduce_scatters": FILE`` runs it so."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from lrx import cli  # noqa: E402


def count_reduce_scatters(argv: list[str], out: Path) -> int:
    """``launch/train.py argv``, counting the reduce-scatters of every optimizer step; rank 0 writes
    them to ``out``. Returns the run's exit status."""
    calls, per_step = [0], []

    def counting(real):
        def counted(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)
        return counted

    reals = {name: getattr(dist, name) for name in ("reduce_scatter_tensor", "reduce_scatter_single")
             if hasattr(dist, name)}  # FSDP2 calls one of them (torch version)
    for name, real in reals.items():
        setattr(dist, name, counting(real))

    def record(trainer) -> None:
        per_step.append(calls[0])
        calls[0] = 0

    try:
        code = cli.train_main(argv, callbacks=[record])
    finally:
        for name, real in reals.items():  # the next run of a launch (tests/train_many.py) counts nothing
            setattr(dist, name, real)
    if os.environ.get("RANK", "0") == "0":
        Path(out).write_text(json.dumps({"per_step": per_step}))
    return code


def main() -> int:
    return count_reduce_scatters(sys.argv[2:], Path(sys.argv[1]))

if __name__ == "__main__":
    sys.exit(main())
