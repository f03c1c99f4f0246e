"""Several ``launch/train.py`` runs in one launch (under torchrun or the deepspeed launcher), for
the multi-process tests: a launch costs every process the imports of torch, transformers and
lrx (~7 s of CPU each), the runs themselves a second or two.

    torchrun --nproc_per_node 2 tests/train_many.py RUNS.json

``RUNS.json`` is a list of ``{"argv": [...], "bf16_engine": false}``: run i is
``lrx.cli.main(argv)`` (``bf16_engine``: with ZeRO-3's bf16 engine on as on a GPU,
``tests/zero3_bf16_engine.py``; ``"count_reduce_scatters": FILE``: counted per step into FILE,
``tests/dist_accumulation.py``; ``"stored_codes": [FOLDER, OUT]``: each rank's piece of the
codes stored quantized checked after every step, ``tests/dist_prequantized.py``; ``"kill_at_step": N``:
rank 0 sends itself SIGKILL right after step N, ``tests/train_killed.py``, which ends the launch: such
a run is its last); or ``{"argv": [], "job": [BACKEND, OUT, OPTIONS...]}``: a job of
``tests/dist_srlora.py`` (its report written to OUT; exit status 0 unless it raises). The runs
share one process group (``one_process_group``).
Every rank writes run i's stdout and stderr (the log included) to ``RUNS.json``'s folder as
``i.rankR.out`` and ``i.rankR.err``; rank 0 writes its exit status to ``i.code``.
"""

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from dist_accumulation import count_reduce_scatters  # beside this script (its folder is the first on sys.path)
from dist_common import one_process_group, run
from dist_prequantized import stored_codes
from train_killed import killed_after
from zero3_bf16_engine import OnAsOnAGPU

from lrx import cli
from lrx.distributed import zero3


def one(index: int, spec: dict, folder: Path, rank: str) -> None:
    plain = zero3.ZeRO3
    with open(folder / f"{index}.rank{rank}.out", "w") as out, open(folder / f"{index}.rank{rank}.err", "w") as err:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root, level = logging.getLogger(), logging.getLogger().level
        root.addHandler(handler)  # before cli's basicConfig, which then adds none of its own
        root.setLevel(logging.INFO)
        zero3.ZeRO3 = OnAsOnAGPU if spec.get("bf16_engine") else plain
        try:
            kill = spec.get("kill_at_step")
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    killed_after(kill) if kill else contextlib.nullcontext():
                counts, codes = spec.get("count_reduce_scatters"), spec.get("stored_codes")
                if counts:
                    code = count_reduce_scatters(spec["argv"], counts)
                elif codes:
                    code = cli.train_main(spec["argv"], callbacks=[stored_codes(*codes)])
                elif "job" in spec:
                    code = srlora_job(*spec["job"])
                else:
                    code = cli.main(spec["argv"])
        finally:
            zero3.ZeRO3 = plain
            root.removeHandler(handler)
            root.setLevel(level)
    if rank == "0":
        (folder / f"{index}.code").write_text(str(code))


def srlora_job(backend: str, out: str, *options: str) -> int:
    """A job of tests/dist_srlora.py in these processes (its report written to ``out``)."""
    from dist_srlora import job

    job(backend, out, list(options))
    return 0


def main() -> None:
    runs = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    rank = os.environ.get("RANK", "0")
    with one_process_group():
        for index, spec in enumerate(json.loads(runs.read_text())):
            one(index, spec, runs.parent, rank)


if __name__ == "__main__":
    run(main)
