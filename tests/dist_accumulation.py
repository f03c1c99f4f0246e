"""``launch/train.py`` counting FSDP2's gradient reduce-scatters per optimizer step (for the
accumulation test): rank 0 writes ``{"per_step": [...]}`` to the file given first."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from lrx import cli  # noqa: E402


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    calls, per_step = [0], []

    def counting(real):
        def counted(*args, **kwargs):
            calls[0] += 1
            return real(*args, **kwargs)
        return counted

    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # FSDP2 calls one of them (torch version)
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))

    def record(trainer) -> None:
        per_step.append(calls[0])
        calls[0] = 0

    code = cli.train_main(argv, callbacks=[record])
    if os.environ.get("RANK", "0") == "0":
        out.write_text(json.dumps({"per_step": per_step}))
    return code


if __name__ == "__main__":
    sys.exit(main())
